"""Training a latent denoiser: the model a config describes, a jitted chunk of
steps, and the resumable loop. The descriptor stage (``lpd train-diffusion``)
and the text stage (``lpd train-text``) both train through
:func:`train_denoiser`; they differ only in the conditions.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lpd import diffusion as diffusion_lib
from lpd import training
from lpd.errors import LpdError

ARCHITECTURES = ("transformer", "unet")
PREDICTIONS = ("epsilon", "v")


def make_denoiser(
    c: ml_collections.ConfigDict, latent_dim: int, cond_groups=(), frequencies=0
):
    """The transformer (default) or 1-D U-Net denoiser of ``config.diffusion``,
    for conditions made of groups of sizes ``cond_groups`` (empty: one), fed
    through ``frequencies`` Fourier octaves (0: raw)."""
    if c.architecture == "unet":
        return diffusion_lib.UNet1D(
            latent_dim=latent_dim,
            channels=tuple(c.unet_channels),
            width=c.width,
            cond_groups=tuple(cond_groups),
            cond_frequencies=frequencies,
        )
    return diffusion_lib.Denoiser(
        latent_dim=latent_dim,
        num_tokens=c.num_tokens,
        width=c.width,
        depth=c.depth,
        num_heads=c.num_heads,
        cond_groups=tuple(cond_groups),
        cond_frequencies=frequencies,
    )


def validate(c: ml_collections.ConfigDict, latent_dim: int) -> None:
    """One-line errors for a ``config.diffusion`` that cannot train."""
    training.check_schedule(c, "diffusion")
    if c.architecture not in ARCHITECTURES:
        raise LpdError(f"diffusion.architecture must be one of {ARCHITECTURES}")
    if c.prediction not in PREDICTIONS:
        raise LpdError(f"diffusion.prediction must be one of {PREDICTIONS}")
    for name in ("num_timesteps", "width", "batch_size", "sample_steps"):
        if c[name] <= 0:
            raise LpdError(f"diffusion.{name} must be > 0, got {c[name]}")
    if c.sample_steps > c.num_timesteps:
        raise LpdError("diffusion.sample_steps must be <= diffusion.num_timesteps")
    if not 0.0 <= c.cond_dropout < 1.0:
        raise LpdError("diffusion.cond_dropout must lie in [0, 1)")
    if c.get("return_dropout") is not None and not 0.0 <= c.return_dropout < 1.0:
        raise LpdError("diffusion.return_dropout must lie in [0, 1) (or be None)")
    if not 0.0 <= c.ema_decay < 1.0:
        raise LpdError("diffusion.ema_decay must lie in [0, 1)")
    if c.get("cond_frequencies", 0) < 0:
        raise LpdError("diffusion.cond_frequencies must be >= 0 (0: raw descriptors)")
    if c.architecture == "unet":
        if latent_dim % 2 ** len(c.unet_channels):
            raise LpdError(
                f"the latent ({latent_dim}) must be divisible by 2 ** "
                f"len(diffusion.unet_channels) for the U-Net"
            )
        if any(ch <= 0 or ch % 8 for ch in c.unet_channels):
            raise LpdError("diffusion.unet_channels must be positive multiples of 8")
        return
    if c.depth <= 0 or c.num_tokens <= 0 or c.num_heads <= 0:
        raise LpdError("diffusion.depth, num_tokens and num_heads must be > 0")
    if latent_dim % c.num_tokens:
        raise LpdError(
            f"the latent ({latent_dim}) must split into diffusion.num_tokens "
            f"({c.num_tokens}) equal tokens"
        )
    if c.width % c.num_heads:
        raise LpdError(
            f"diffusion.num_heads ({c.num_heads}) must divide diffusion.width "
            f"({c.width})"
        )


def group_dropouts(c: ml_collections.ConfigDict, num_groups: int) -> tuple:
    """The drop rate of each condition group while training: ``cond_dropout``
    for the first (the descriptor, or the text), ``return_dropout`` for the
    return rank after it (None: ``cond_dropout`` as well)."""
    rates = [c.cond_dropout]
    if num_groups > 1:
        rate = c.get("return_dropout")
        rates.append(c.cond_dropout if rate is None else rate)
    return tuple(rates)


def make_train_chunk(model, schedule, optimizer, c, num_steps):
    """Jitted ``(state, (latents [N, L], conditions [N, C]), start, key)``.

    ``c`` holds ``batch_size``, ``prediction``, the dropout rates
    (:func:`group_dropouts`) and ``ema_decay``.
    """
    dropouts = group_dropouts(c, len(model.cond_groups))

    def train_step(state, data, step, key):
        latents, conditions = data
        key_batch, key_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.randint(key_batch, (c.batch_size,), 0, latents.shape[0])
        loss, grads = jax.value_and_grad(diffusion_lib.diffusion_loss)(
            state["params"],
            model,
            schedule,
            latents[idx],
            conditions[idx],
            key_loss,
            c.prediction,
            dropouts,
        )
        updates, opt_state = optimizer.update(
            grads, state["opt_state"], state["params"]
        )
        params = optax.apply_updates(state["params"], updates)
        ema = optax.incremental_update(params, state["ema"], 1.0 - c.ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "ema": ema, "opt_state": opt_state}, metrics

    return training.scan_steps(train_step, num_steps)


def train_denoiser(model, c, data, keys, directory: Path, steps) -> dict:
    """Trains (or resumes) ``model`` on ``data``; returns the EMA parameters.

    Args:
        model: the denoiser (:func:`make_denoiser`).
        c: ``config.diffusion`` (optimiser, batch, dropout, EMA).
        data: ``(latents [N, L], conditions [N, C])``, on device.
        keys: ``(key_init, key_train)``.
        directory: the stage's directory (checkpoints, metrics).
        steps: ``(num_steps, log_period, stage name)``; the name is for the
            progress bar and errors.
    """
    latents, conditions = data
    key_init, key_train = keys
    num_steps, log_period, stage = steps
    schedule = diffusion_lib.cosine_schedule(c.num_timesteps)
    optimizer = training.make_optimizer(
        c.learning_rate, c.warmup_steps, num_steps, c.weight_decay, c.grad_clip
    )
    chunk_fn = make_train_chunk(model, schedule, optimizer, c, log_period)

    def init_state():
        params = model.init(key_init, latents[0], 0, conditions[0], False)
        ema = jax.tree.map(jnp.copy, params)  # Its own buffers: the state is donated.
        return {"params": params, "ema": ema, "opt_state": optimizer.init(params)}

    state = training.run_chunks(
        directory,
        init_state,
        lambda s, start: chunk_fn(s, data, start, key_train),
        (num_steps, log_period),
        stage,
        "diffusion",
    )
    return state["ema"]
