"""Latent diffusion core: cosine schedule, conditional denoiser, loss, samplers.

Pure functions and modules, tested on toy data; the stages
(``lpd.diffusion_stage``, ``lpd.text_stage``) train and sample with them.

Shapes: latents ``[L]`` per example (``[B, L]`` batched), conditions ``[C]``
(a descriptor, a descriptor and a return quantile, or a 384-d sentence
embedding for the text model), timesteps integers in ``[0, T)``. A condition
is made of *groups* (``cond_groups``, their sizes; default one group), each
replaced by its own learned null vector when dropped, so any group can be
left out of an ask. Guidance follows
``out = out_cond + w * (out_cond - out_uncond)``, so ``w = 0`` is plain
conditional sampling; the unconditional branch drops every group, trained
by dropping each group independently (``cond_dropout``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
    """Noise schedule over ``T`` steps: ``betas [T]``, ``alphas_cumprod [T]``."""

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def cosine_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999):
    """Nichol & Dhariwal's cosine schedule: ``abar(t) = f(t) / f(0)``.

    ``f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2)``, ``beta_t = 1 -
    abar(t + 1) / abar(t)`` clipped to ``max_beta``; entry ``t`` of the
    result describes the step from ``t`` to ``t + 1`` noise levels.
    """
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(
        jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32)
    )


def add_noise(schedule: Schedule, x0, t, noise):
    """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``x0 [B, L]``, ``t [B]``."""
    abar = schedule.alphas_cumprod[t][:, None]
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
    """Sinusoidal embedding ``[..., dim]`` of (integer or real) timesteps."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half) / half)
    angles = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def fourier_features(x: jax.Array, frequencies: int) -> jax.Array:
    """``[C]`` -> ``[C (1 + 2F)]``: ``x``, then ``sin`` and ``cos`` of
    ``2^k pi x`` for ``k < F``; ``x`` itself when F is 0."""
    if not frequencies:
        return x
    angles = jnp.pi * x[None, :] * (2.0 ** jnp.arange(frequencies))[:, None]
    return jnp.concatenate([x, jnp.sin(angles).ravel(), jnp.cos(angles).ravel()])


class Conditioner(nn.Module):
    """Condition ``[C]`` -> conditioning vector ``[features]``: the sum over the
    condition's groups of a learned two-layer projection of the group, or of
    the group's learned null vector where ``drop`` ``[G]`` (or a scalar, for
    every group) is true.

    With ``frequencies`` F > 0 each group enters as itself and its sines and
    cosines at ``2^k pi`` for ``k < F`` (Fourier features): a small MLP on raw
    descriptors in ``[0, 1]`` is smooth across many of the grid's cells.

    Attributes:
        features: output size.
        groups: sizes of the groups, summing to C; empty: one group.
        frequencies: Fourier octaves per input (0: the raw group).
    """

    features: int
    groups: tuple[int, ...] = ()
    frequencies: int = 0

    @nn.compact
    def __call__(self, cond: jax.Array, drop: jax.Array) -> jax.Array:
        sizes = self.groups or (cond.shape[-1],)
        drop = jnp.broadcast_to(drop, (len(sizes),))
        out, start = 0.0, 0
        for g, size in enumerate(sizes):
            # Group 0 keeps the names of the one-group conditioner.
            names = (
                ("null", "Dense_0", "Dense_1")
                if g == 0
                else (f"null_{g}", f"Dense_in_{g}", f"Dense_out_{g}")
            )
            null = self.param(names[0], nn.initializers.normal(0.02), (self.features,))
            h = nn.gelu(
                nn.Dense(self.features, name=names[1])(
                    fourier_features(cond[start : start + size], self.frequencies)
                )
            )
            h = nn.Dense(self.features, name=names[2])(h)
            out = out + jnp.where(drop[g], null, h)
            start += size
        return out


class AdaLNBlock(nn.Module):
    """Transformer block whose layer norms are shifted, scaled and gated by ``c``."""

    width: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        mod = nn.Dense(6 * self.width, kernel_init=nn.initializers.zeros)(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6)
        h = nn.LayerNorm(use_scale=False, use_bias=False)(x) * (1 + scale1) + shift1
        x = x + gate1 * nn.MultiHeadDotProductAttention(self.num_heads)(h)
        h = nn.LayerNorm(use_scale=False, use_bias=False)(x) * (1 + scale2) + shift2
        h = nn.Dense(self.width)(nn.gelu(nn.Dense(4 * self.width)(h)))
        return x + gate2 * h


class Denoiser(nn.Module):
    """Noisy latent ``[L]``, timestep and condition -> predicted noise (or v) ``[L]``.

    The latent is cut into ``num_tokens`` tokens that attend to each other;
    the timestep and the condition modulate every block (adaptive layer norm).
    """

    latent_dim: int
    num_tokens: int = 8
    width: int = 64
    depth: int = 3
    num_heads: int = 4
    cond_groups: tuple[int, ...] = ()
    cond_frequencies: int = 0

    @nn.compact
    def __call__(self, x, t, cond, drop):
        if self.latent_dim % self.num_tokens:
            raise ValueError("latent_dim must be a multiple of num_tokens")
        token_size = self.latent_dim // self.num_tokens
        tokens = nn.Dense(self.width)(x.reshape(self.num_tokens, token_size))
        position = self.param(
            "position", nn.initializers.normal(0.02), (self.num_tokens, self.width)
        )
        tokens = tokens + position
        c = nn.Dense(self.width)(
            nn.silu(nn.Dense(self.width)(timestep_embedding(t, self.width)))
        )
        conditioner = Conditioner(
            self.width, self.cond_groups, self.cond_frequencies, name="conditioner"
        )
        c = c + conditioner(cond, drop)
        for _ in range(self.depth):
            tokens = AdaLNBlock(self.width, self.num_heads)(tokens, c)
        shift, scale = jnp.split(
            nn.Dense(2 * self.width, kernel_init=nn.initializers.zeros)(nn.silu(c)), 2
        )
        tokens = nn.LayerNorm(use_scale=False, use_bias=False)(tokens)
        tokens = tokens * (1 + scale) + shift
        out = nn.Dense(token_size, kernel_init=nn.initializers.zeros)(tokens)
        return out.reshape(self.latent_dim)


class FiLMResBlock(nn.Module):
    """1-D residual block; the conditioning vector shifts and scales its middle."""

    channels: int

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        h = nn.Conv(self.channels, (3,))(nn.silu(nn.GroupNorm(num_groups=8)(x)))
        scale, shift = jnp.split(nn.Dense(2 * self.channels)(nn.silu(c)), 2)
        h = nn.GroupNorm(num_groups=8)(h) * (1 + scale) + shift
        h = nn.Conv(self.channels, (3,), kernel_init=nn.initializers.zeros)(nn.silu(h))
        if x.shape[-1] != self.channels:
            x = nn.Conv(self.channels, (1,))(x)
        return x + h


class UNet1D(nn.Module):
    """Noisy latent ``[L]`` as a one-channel signal through a 1-D U-Net.

    Same inputs and output as :class:`Denoiser`; the timestep and the
    condition reach every residual block through FiLM.
    """

    latent_dim: int
    channels: tuple[int, ...] = (32, 64)
    width: int = 64
    cond_groups: tuple[int, ...] = ()
    cond_frequencies: int = 0

    @nn.compact
    def __call__(self, x, t, cond, drop):
        if self.latent_dim % 2 ** len(self.channels):
            raise ValueError("latent_dim must be divisible by 2 ** len(channels)")
        time = timestep_embedding(t, self.width)
        c = nn.Dense(self.width)(nn.silu(nn.Dense(self.width)(time)))
        conditioner = Conditioner(
            self.width, self.cond_groups, self.cond_frequencies, name="conditioner"
        )
        c = c + conditioner(cond, drop)
        h = nn.Conv(self.channels[0], (3,))(x[:, None])
        skips = []
        for channels in self.channels:
            h = FiLMResBlock(channels)(h, c)
            skips.append(h)
            h = nn.avg_pool(h, (2,), strides=(2,))
        h = FiLMResBlock(self.channels[-1])(h, c)
        for channels, skip in zip(
            reversed(self.channels), reversed(skips), strict=True
        ):
            h = jnp.repeat(h, 2, axis=0)
            h = FiLMResBlock(channels)(jnp.concatenate([h, skip], axis=-1), c)
        out = nn.Conv(1, (3,), kernel_init=nn.initializers.zeros)(nn.silu(h))
        return out[:, 0]


def diffusion_loss(params, model, schedule, x0, cond, key, prediction, cond_dropout):
    """DDPM objective on ``x0 [B, L]`` with conditions ``cond [B, C]``.

    Each example gets a uniform timestep, Gaussian noise, and each group of
    its condition dropped (replaced by that group's null vector) with
    probability ``cond_dropout`` (a scalar, or one rate per group),
    independently. ``prediction`` is "epsilon" or "v".
    """
    key_t, key_noise, key_drop = jax.random.split(key, 3)
    batch = x0.shape[0]
    t = jax.random.randint(key_t, (batch,), 0, schedule.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape)
    groups = max(1, len(model.cond_groups))
    rates = jnp.broadcast_to(jnp.asarray(cond_dropout, jnp.float32), (groups,))
    drop = jax.random.bernoulli(key_drop, rates, (batch, groups))
    xt = add_noise(schedule, x0, t, noise)
    out = jax.vmap(lambda *a: model.apply(params, *a))(xt, t, cond, drop)
    if prediction == "epsilon":
        target = noise
    else:
        abar = schedule.alphas_cumprod[t][:, None]
        target = jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0
    return jnp.mean(jnp.square(out - target))


def guided_eps_fn(
    params, model, schedule, cond, guidance, prediction, keep=None, clip_x0=None
) -> Callable:
    """``eps_fn(x [B, L], t [B]) -> (eps, x0)`` with classifier-free guidance.

    The conditional branch sees the groups of ``cond [B, C]`` that ``keep``
    ``[B, G]`` marks (default: all) and the null vector for the others; the
    unconditional branch drops every group.

    With epsilon prediction, ``x0 = (x - sqrt(1 - abar) eps) / sqrt(abar)``
    amplifies the model's error where ``abar`` is near zero (the first
    sampling steps of a cosine schedule); ``clip_x0`` bounds ``x0`` there and
    recomputes ``eps`` from it. v prediction needs no clipping.
    """

    def eps_fn(x, t):
        batch = x.shape[0]
        run = jax.vmap(lambda *a: model.apply(params, *a))
        dropped = jnp.zeros(batch, bool) if keep is None else ~keep
        out_c = run(x, t, cond, dropped)
        out_u = run(x, t, cond, jnp.ones(batch, bool))
        out = out_c + guidance * (out_c - out_u)
        abar = schedule.alphas_cumprod[t][:, None]
        if prediction == "epsilon":
            eps = out
            x0 = (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)
        else:
            x0 = jnp.sqrt(abar) * x - jnp.sqrt(1.0 - abar) * out
            eps = jnp.sqrt(1.0 - abar) * x + jnp.sqrt(abar) * out
        if clip_x0 is not None:
            x0 = jnp.clip(x0, -clip_x0, clip_x0)
            eps = (x - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
        return eps, x0

    return eps_fn


def ddim_sample(eps_fn, schedule: Schedule, x_T, num_steps: int, eta: float, key):
    """DDIM from ``x_T [B, L]`` over ``num_steps`` evenly spaced timesteps.

    ``eta = 0`` is deterministic; ``eta = 1`` with every step is DDPM's
    ancestral sampler. One ``lax.scan``.
    """
    total = schedule.num_timesteps
    times = jnp.round(jnp.linspace(total - 1, 0, num_steps)).astype(jnp.int32)
    prev_times = jnp.concatenate([times[1:], jnp.array([-1], jnp.int32)])
    batch = x_T.shape[0]

    def step(x, inputs):
        t, t_prev, k = inputs
        eps, x0 = eps_fn(x, jnp.full((batch,), t))
        abar = schedule.alphas_cumprod[t]
        abar_prev = jnp.where(t_prev >= 0, schedule.alphas_cumprod[t_prev], 1.0)
        sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
        direction = jnp.sqrt(jnp.maximum(1 - abar_prev - sigma**2, 0.0)) * eps
        noise = jax.random.normal(k, x.shape)
        x = jnp.sqrt(abar_prev) * x0 + direction + sigma * noise
        return x, None

    keys = jax.random.split(key, num_steps)
    x, _ = jax.lax.scan(step, x_T, (times, prev_times, keys))
    return x


def ddpm_sample(eps_fn, schedule: Schedule, x_T, key):
    """Ancestral DDPM from ``x_T [B, L]`` over every timestep, one ``lax.scan``."""
    total = schedule.num_timesteps
    batch = x_T.shape[0]

    def step(x, inputs):
        t, k = inputs
        _, x0 = eps_fn(x, jnp.full((batch,), t))
        abar = schedule.alphas_cumprod[t]
        abar_prev = jnp.where(
            t > 0, schedule.alphas_cumprod[jnp.maximum(t - 1, 0)], 1.0
        )
        beta = schedule.betas[t]
        mean = (
            jnp.sqrt(abar_prev) * beta / (1 - abar) * x0
            + jnp.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x
        )
        var = beta * (1 - abar_prev) / (1 - abar)
        noise = jnp.where(t > 0, 1.0, 0.0) * jax.random.normal(k, x.shape)
        return mean + jnp.sqrt(var) * noise, None

    keys = jax.random.split(key, total)
    x, _ = jax.lax.scan(step, x_T, (jnp.arange(total - 1, -1, -1), keys))
    return x
