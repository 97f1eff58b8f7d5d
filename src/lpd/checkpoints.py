"""Orbax checkpoints of a stage's training state, shared by every stage."""

from __future__ import annotations

from pathlib import Path

import orbax.checkpoint as ocp

from lpd.errors import LpdError


def checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """Synchronous manager of ``directory/checkpoints`` keeping the last two."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        (directory / "checkpoints").absolute(), options=options
    )


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(state))


def restore(manager: ocp.CheckpointManager, step: int, template, directory: Path):
    """Restores ``step`` against ``template`` (an ``eval_shape`` of the state)."""
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(template))
    except Exception as e:  # orbax raises many types for damaged files.
        raise LpdError(
            f"checkpoint {step} in {directory / 'checkpoints'} is corrupt or "
            f"incompatible ({type(e).__name__}); delete that directory to restart"
        ) from e
