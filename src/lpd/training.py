"""The host loop every trained stage shares: chunks, checkpoints, logs, NaN stop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lpd import checkpoints, devices
from lpd.errors import LpdError
from lpd.logs import MetricsWriter
from lpd.workdir import StageClock

log = logging.getLogger(__name__)


def make_optimizer(
    learning_rate: float,
    warmup_steps: int,
    num_steps: int,
    weight_decay: float,
    grad_clip: float,
) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay and global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(num_steps, warmup_steps + 1)
    )
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, weight_decay=weight_decay),
    )


def check_schedule(c, section: str) -> None:
    """One-line errors for a section's steps, chunking and optimiser numbers."""
    if c.num_steps <= 0 or c.log_period <= 0 or c.num_steps % c.log_period:
        raise LpdError(
            f"{section}.num_steps ({c.num_steps}) must be a positive multiple of "
            f"{section}.log_period ({c.log_period})"
        )
    for name in ("learning_rate", "grad_clip"):
        if name in c and c[name] <= 0:
            raise LpdError(f"{section}.{name} must be > 0, got {c[name]}")
    for name in ("warmup_steps", "weight_decay"):
        if name in c and c[name] < 0:
            raise LpdError(f"{section}.{name} must be >= 0, got {c[name]}")


def scan_steps(train_step: Callable, num_steps: int) -> Callable:
    """Jitted ``chunk(state, data, start, key) -> (state, mean metrics)``.

    Runs ``train_step(state, data, step, key)`` for ``step`` in ``start ..
    start + num_steps - 1`` as one ``lax.scan``, with ``state`` donated; the
    step draws its randomness from ``fold_in(key, step)``, so a resumed run
    repeats an uninterrupted one.
    """

    def chunk(state, data, start, key):
        def body(state, step):
            return train_step(state, data, step, key)

        state, metrics = jax.lax.scan(body, state, start + jnp.arange(num_steps))
        return state, jax.tree.map(jnp.mean, metrics)

    return jax.jit(chunk, donate_argnums=(0,))


def run_chunks(
    directory: Path,
    init_state: Callable[[], dict],
    chunk_fn: Callable,
    steps: tuple[int, int],
    stage: str,
    section: str,
):
    """Trains from step 0, or from the last checkpoint, to ``num_steps``.

    Args:
        directory: the stage's directory (checkpoints, metrics, TensorBoard).
        init_state: makes the initial state, a dict pytree; also traced with
            ``eval_shape`` to restore a checkpoint against.
        chunk_fn: ``(state, start_step) -> (state, metrics)`` running
            ``log_period`` steps; ``metrics`` holds scalars, ``loss`` among them.
        steps: ``(num_steps, log_period)``, total steps and steps per chunk.
        stage: name for the progress bar, log lines and errors.
        section: the config section whose optimiser settings a diverging
            loss should make the user change.

    Returns:
        The final state.
    """
    num_steps, log_period = steps
    clock = StageClock(directory)
    with checkpoints.checkpoint_manager(directory) as manager:
        start = manager.latest_step()
        if start is None:
            state, start = init_state(), 0
            checkpoints.save(manager, 0, state)
        else:
            template = jax.eval_shape(init_state)
            state = checkpoints.restore(manager, start, template, directory)
            log.info("%s: resuming from step %d", stage, start)
        writer = MetricsWriter(directory, resume_step=start)
        bar = tqdm(
            total=num_steps,
            initial=start,
            desc=stage,
            unit="step",
            disable=not devices.is_main(),
        )
        try:
            for chunk_start in range(start, num_steps, log_period):
                state, metrics = chunk_fn(state, jnp.int32(chunk_start))
                metrics = devices.to_host(metrics)
                end = chunk_start + log_period
                if not np.isfinite(metrics["loss"]):
                    raise LpdError(
                        f"{stage}: loss is {metrics['loss']} at step {end}; lower "
                        f"config.{section}.learning_rate or raise "
                        f"config.{section}.grad_clip, then delete {directory} "
                        "and rerun"
                    )
                checkpoints.save(manager, end, state)
                clock.save()
                writer.write(end, metrics)
                shown = {k: v for k, v in metrics.items() if "/" not in k}
                bar.set_postfix({k: f"{v:.4g}" for k, v in sorted(shown.items())})
                bar.update(log_period)
        finally:
            bar.close()
            writer.close()
    return state
