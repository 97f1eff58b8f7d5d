"""Orbax checkpoints of a stage's training state, shared by every stage."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lpd import devices
from lpd.errors import LpdError


def checkpoint_manager(directory: Path) -> ocp.CheckpointManager:
    """Synchronous manager of ``directory/checkpoints`` keeping the last two."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        (directory / "checkpoints").absolute(), options=options
    )


def _on_this_host(template):
    """``template`` with every leaf placed on this host's first device.

    Orbax otherwise restores onto the devices the checkpoint was saved from,
    and fails when the device count differs (a run made with one XLA host
    device per core, read on a GPU host or in a plain Python session). In a
    run over several hosts every device gets the whole array instead.
    """
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if jax.process_count() > 1:  # Every process reads the whole array.
        sharding = devices.replicated()
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), template
    )


def _uncommitted(tree):
    """``tree``'s arrays rebuilt uncommitted (typed PRNG keys included), so
    each jitted step places them as its own shardings say: arrays committed
    to one device clash with a step sharded over several."""

    def rebuild(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = devices.to_host(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jnp.asarray(devices.to_host(x))

    return jax.tree.map(rebuild, tree)


def _quiet_late_reads() -> None:
    """Drops the "Event loop is closed" reports of reads still in flight when
    orbax gives up on a damaged checkpoint: they land on its finished event
    loop from the storage library's threads, before or after our one-line
    error. Installed before the first restore (a failed read can report
    before the exception reaches us); other unraisable exceptions go to the
    hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "_lpd_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        previous(unraisable)

    hook._lpd_quiet = True
    sys.unraisablehook = hook


def _restore(restore_fn, template):
    _quiet_late_reads()
    return _uncommitted(restore_fn(_on_this_host(template)))


def _global(tree):
    """In a run over several hosts, ``tree`` with each array held by one
    process (made by a program that ran on its own devices, or uncommitted)
    placed whole on every device, as orbax needs to save across processes."""
    if jax.process_count() == 1:
        return tree

    everywhere = devices.replicated()

    def place(x):
        if not isinstance(x, jax.Array) or not x.is_fully_addressable:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), everywhere)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), everywhere)

    return jax.tree.map(place, tree)


def save(manager: ocp.CheckpointManager, step: int, state) -> None:
    manager.save(step, args=ocp.args.StandardSave(_global(state)))


def restore(manager: ocp.CheckpointManager, step: int, template, directory: Path):
    """Restores ``step`` against ``template`` (an ``eval_shape`` of the state)."""
    try:
        return _restore(
            lambda t: manager.restore(step, args=ocp.args.StandardRestore(t)), template
        )
    except Exception as e:  # orbax raises many types for damaged files.
        raise LpdError(
            f"checkpoint {step} in {directory / 'checkpoints'} is corrupt or "
            f"incompatible ({type(e).__name__}); delete that directory to restart"
        ) from e


def save_tree(path: Path, tree) -> None:
    """Writes a stage's final pytree to ``path``, replacing a partial one.

    A ``path`` left by an interrupted finish is removed first: the stage's
    ``meta.json``, written after this, is what marks the stage complete.
    """
    path = path.absolute()
    if path.exists() and devices.is_main():
        shutil.rmtree(path)
    devices.sync(f"save {path.name}")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _global(tree))
    devices.sync(f"saved {path.name}")


def stored_structure(path: Path) -> dict:
    """The nested keys (array metadata at the leaves) of a pytree written by
    :func:`save_tree`; empty when ``path`` cannot be read."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.metadata(path.absolute()).item_metadata.tree
    except Exception:  # Unreadable: load_tree names the problem.
        return {}


def load_tree(path: Path, template, what: str):
    """Reads a pytree written by :func:`save_tree` against ``template``."""
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            return _restore(
                lambda t: checkpointer.restore(path.absolute(), t), template
            )
    except Exception as e:  # orbax raises many types for damaged files.
        raise LpdError(
            f"{what} at {path} is missing or corrupt ({type(e).__name__}); "
            "delete its stage directory and run the stage again"
        ) from e
