"""Training the weight codec: loss, optimiser and a jitted chunk of steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from lpd import codec as codec_lib
from lpd import policy as policy_lib
from lpd import training


class LossWeights(NamedTuple):
    """Static loss settings (hashable, closed over by the compiled step)."""

    kl: float
    input_noise: float
    latent_noise: float
    functional: float


@flax.struct.dataclass
class CodecData:
    """What the codec trains on, kept on device.

    Attributes:
        inputs: flat dict of standardised tensors ``[N, ...]``.
        obs: ``[N, K, obs]`` observations from each elite's own rollout.
        actions: ``[N, K, act]`` the elite's actions at those observations.
    """

    inputs: dict
    obs: jax.Array
    actions: jax.Array


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState


def loss_fn(params, model, policy, stats, batch: CodecData, weights, key):
    """Per-tensor MSE (summed over tensors) + KL + optional action matching.

    Returns:
        ``(loss, metrics)``; metrics hold each term and each tensor's MSE.
    """
    key_in, key_z, key_latent = jax.random.split(key, 3)
    inputs = batch.inputs
    leaves, treedef = jax.tree.flatten(inputs)
    noise_keys = jax.random.split(key_in, len(leaves))
    noisy = jax.tree.unflatten(
        treedef,
        [
            x + weights.input_noise * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, noise_keys, strict=True)
        ],
    )
    mean, logvar = jax.vmap(lambda f: model.apply(params, f, method="encode"))(noisy)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key_z, mean.shape)
    z = z + weights.latent_noise * jax.random.normal(key_latent, z.shape)
    decoded = jax.vmap(lambda v: model.apply(params, v, method="decode"))(z)
    reconstruction, per_tensor = reconstruction_error(decoded, inputs)
    kl = jnp.mean(0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    loss = reconstruction + weights.kl * kl
    metrics = {"reconstruction": reconstruction, "kl": kl}
    if weights.functional > 0:
        functional = action_error(policy, stats, decoded, batch.obs, batch.actions)
        loss = loss + weights.functional * functional
        metrics["functional"] = functional
    metrics["loss"] = loss
    metrics.update({f"mse/{p}": v for p, v in per_tensor.items()})
    return loss, metrics


def reconstruction_error(decoded, inputs) -> tuple[jax.Array, dict]:
    """Sum over tensors of each tensor's mean squared error, and the terms.

    Each tensor's error is averaged over its own elements, so a bias of six
    numbers counts as much as a 128 x 128 kernel.
    """
    per_tensor = {p: jnp.mean(jnp.square(decoded[p] - inputs[p])) for p in inputs}
    return sum(per_tensor.values()), per_tensor


def action_error(policy, stats, decoded, obs, actions) -> jax.Array:
    """Mean squared action difference of decoded policies on ``obs [B, K, O]``."""
    policies = policy_lib.unflatten_params(codec_lib.unstandardise(stats, decoded))
    predicted = jax.vmap(policy.apply)(policies, obs)
    return jnp.mean(jnp.square(predicted - actions))


def make_train_chunk(
    model, policy, optimizer, weights: LossWeights, num_steps: int, batch_size: int
) -> Callable:
    """Jitted ``(state, (data, stats), start, key) -> (state, mean metrics)``.

    Step ``s`` draws its minibatch and noise from ``fold_in(key, s)``, so a
    resumed run repeats an uninterrupted one.
    """

    def train_step(state: TrainState, inputs, step, key):
        data, stats = inputs
        key_step = jax.random.fold_in(key, step)
        key_batch, key_loss = jax.random.split(key_step)
        num = data.obs.shape[0]
        idx = jax.random.randint(key_batch, (batch_size,), 0, num)
        batch = jax.tree.map(lambda x: x[idx], data)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, metrics), grads = grad_fn(
            state.params, model, policy, stats, batch, weights, key_loss
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return TrainState(params, opt_state), metrics

    return training.scan_steps(train_step, num_steps)
