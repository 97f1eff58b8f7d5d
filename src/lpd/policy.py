"""The policy every stage shares: a small deterministic MLP, and its layout.

A policy's parameters are a Flax variables dict ``{"params": {...}}`` holding
``Dense_0 .. Dense_L`` (``kernel [in, out]``, ``bias [out]``) and, when the
policy normalises observations, ``obs_mean [obs]`` and ``obs_log_std [obs]``
(the log of the scale: any value, mutated or not, is a valid normaliser).
A *layout* maps each leaf's ``/``-joined path to its shape for one policy.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

# Floor on the normaliser's scale, so an observation that barely varies in
# the rollouts the normaliser was fitted on is not scaled up without bound.
MIN_OBS_STD = 1e-3


class Policy(nn.Module):
    """obs -> [normalise] -> (Dense, tanh) x len(hidden_sizes) -> Dense -> tanh.

    Attributes:
        hidden_sizes: widths of the hidden layers.
        action_size: number of actions; actions lie in [-1, 1].
        normalise_obs: whether the policy carries an observation normaliser
            (``obs_mean``, ``obs_std``) as part of its parameters.
    """

    hidden_sizes: tuple[int, ...]
    action_size: int
    normalise_obs: bool = False

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        """Maps observations ``[..., obs]`` to actions ``[..., act]``."""
        if self.normalise_obs:
            size = obs.shape[-1:]
            mean = self.param("obs_mean", nn.initializers.zeros, size)
            log_std = self.param("obs_log_std", nn.initializers.zeros, size)
            # The normaliser is fitted from data, never trained by gradients.
            mean, log_std = jax.lax.stop_gradient((mean, log_std))
            obs = (obs - mean) / jnp.maximum(jnp.exp(log_std), MIN_OBS_STD)
        x = obs
        init = nn.initializers.lecun_uniform()
        for size in self.hidden_sizes:
            x = jnp.tanh(nn.Dense(size, kernel_init=init)(x))
        return jnp.tanh(nn.Dense(self.action_size, kernel_init=init)(x))


def flatten_params(params: Mapping) -> dict[str, jax.Array]:
    """Nested parameter dict -> ``{"params/Dense_0/kernel": array, ...}``."""
    return traverse_util.flatten_dict(params, sep="/")


def unflatten_params(flat: Mapping[str, jax.Array]) -> dict:
    """Inverse of :func:`flatten_params`."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def policy_layout(policy: Policy, obs_size: int) -> dict[str, tuple[int, ...]]:
    """Leaf path -> shape of one policy's parameters, in sorted path order."""
    shapes = jax.eval_shape(policy.init, jax.random.key(0), jnp.zeros((obs_size,)))
    flat = flatten_params(shapes)
    return {path: tuple(flat[path].shape) for path in sorted(flat)}


def layout_template(layout: Mapping, leading: tuple[int, ...] = ()) -> dict:
    """``{path: ShapeDtypeStruct((*leading, *shape), float32)}`` of a layout."""
    return {
        path: jax.ShapeDtypeStruct((*leading, *shape), jnp.float32)
        for path, shape in layout.items()
    }


def count_params(tree) -> int:
    """Numbers in a pytree whose leaves have a ``shape`` (arrays, shape structs)."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(tree)))


def init_policies(policy: Policy, obs_size: int, num: int, key: jax.Array) -> dict:
    """``num`` independently initialised policies; leaves ``[num, ...]``."""
    keys = jax.random.split(key, num)
    obs = jnp.zeros((obs_size,))
    return jax.vmap(lambda k: policy.init(k, obs))(keys)
