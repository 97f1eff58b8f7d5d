"""Stage 2 model: a per-tensor autoencoder of policy weights, and its standardiser.

A policy is handled as a *flat* dict ``{path: tensor}`` (see
:func:`lpd.policy.flatten_params`). Each tensor is standardised element-wise
with statistics fitted on the archive, encoded by its own small encoder, and
the features are joined into a Gaussian latent ``[L]``. The decoder is kept
compact: a shared trunk maps the latent to ``h``; each tensor, viewed as
``rows x cols`` (a kernel ``[in, out]``, or a vector as one row), is generated
row by row, ``row_i = Dense_out(gelu(Dense_mod(h) + e_i))``, with a learned
embedding ``e_i`` per row and weights shared by all rows; its size grows
with ``rows + cols``, not ``rows * cols``. Optionally (``basis_dim > 0``) a
linear head adds ``basis_dim`` learned full-size basis tensors per tensor,
mixed by the trunk: exact-weight fidelity at ``basis_dim x params`` cost.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Layout = tuple[tuple[str, tuple[int, ...]], ...]


def as_layout(layout: Mapping[str, tuple[int, ...]]) -> Layout:
    """A hashable, sorted layout (path -> shape) for use as a module field."""
    return tuple((path, tuple(shape)) for path, shape in sorted(layout.items()))


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """How a tensor is generated: ``rows x cols`` (vectors are one row)."""
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(np.prod(shape[1:]))


def _name(path: str) -> str:
    return path.replace("/", "_")


@flax.struct.dataclass
class Standardiser:
    """Element-wise statistics of every tensor over the archive's elites.

    Attributes:
        mean: flat dict path -> ``[*shape]``.
        std: flat dict path -> ``[*shape]``, floored so it is never zero.
    """

    mean: dict
    std: dict


def fit_standardiser(flat: Mapping[str, jax.Array], min_std: float = 1e-6):
    """Fits per-element mean and std over the leading (elite) axis ``[N, ...]``."""
    mean = {p: jnp.mean(x, axis=0) for p, x in flat.items()}
    std = {p: jnp.maximum(jnp.std(x, axis=0), min_std) for p, x in flat.items()}
    return Standardiser(mean=mean, std=std)


def standardise(stats: Standardiser, flat: Mapping[str, jax.Array]) -> dict:
    """``(x - mean) / std`` per element; works with or without a batch axis."""
    return {p: (x - stats.mean[p]) / stats.std[p] for p, x in flat.items()}


def unstandardise(stats: Standardiser, flat: Mapping[str, jax.Array]) -> dict:
    """Inverse of :func:`standardise`."""
    return {p: x * stats.std[p] + stats.mean[p] for p, x in flat.items()}


class Encoder(nn.Module):
    """One policy's standardised tensors -> latent mean and log-variance ``[L]``."""

    layout: Layout
    features: int
    hidden: int
    latent_dim: int

    @nn.compact
    def __call__(self, flat: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        parts = [
            nn.gelu(nn.Dense(self.features, name=f"enc_{_name(p)}")(flat[p].ravel()))
            for p, _ in self.layout
        ]
        h = nn.gelu(nn.Dense(self.hidden)(jnp.concatenate(parts)))
        stats = nn.Dense(2 * self.latent_dim)(h)
        mean, logvar = jnp.split(stats, 2)
        return mean, jnp.clip(logvar, -30.0, 10.0)


class Decoder(nn.Module):
    """Latent ``[L]`` -> one policy's standardised tensors, generated per row."""

    layout: Layout
    hidden: int
    row_features: int
    basis_dim: int = 0

    @nn.compact
    def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
        h = nn.gelu(nn.Dense(self.hidden)(z))
        h = nn.gelu(nn.Dense(self.hidden)(h))
        basis = nn.Dense(self.basis_dim, name="basis")(h) if self.basis_dim else None
        out = {}
        for path, shape in self.layout:
            rows, cols = matrix_shape(shape)
            name = _name(path)
            modulation = nn.Dense(self.row_features, name=f"{name}_mod")(h)
            rows_embedding = self.param(
                f"{name}_rows", nn.initializers.normal(1.0), (rows, self.row_features)
            )
            features = nn.gelu(rows_embedding + modulation)
            values = nn.Dense(cols, name=f"{name}_out")(features).reshape(shape)
            if basis is not None:
                full = nn.Dense(rows * cols, use_bias=False, name=f"{name}_basis")(
                    basis
                )
                values = values + full.reshape(shape)
            out[path] = values
        return out


class Codec(nn.Module):
    """Encoder and decoder together, so one ``init`` makes both."""

    layout: Layout
    latent_dim: int = 64
    encoder_features: int = 64
    encoder_hidden: int = 256
    decoder_hidden: int = 256
    row_features: int = 128
    basis_dim: int = 0

    def setup(self):
        self.encoder = Encoder(
            self.layout, self.encoder_features, self.encoder_hidden, self.latent_dim
        )
        self.decoder = Decoder(
            self.layout, self.decoder_hidden, self.row_features, self.basis_dim
        )

    def __call__(self, flat):
        mean, _ = self.encode(flat)
        return self.decode(mean)

    def encode(self, flat):
        return self.encoder(flat)

    def decode(self, z):
        return self.decoder(z)
