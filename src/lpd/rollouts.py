"""Running policies in their env: scored episodes, observations, swapped policies.

- :func:`make_episodes_eval_fn`: each policy of a batch on several random-reset
  episodes, scored by QDax's Brax scoring function (the one that built the
  archive), averaged: what the evaluation, the codec's reconstruction report,
  the guidance sweep and the labels use;
- :func:`collect_observations`: states from each policy's own rollout, for
  the codec's action-matching term; :func:`observation_stats` for normalisers;
- :func:`rollout`: one episode whose acting policy changes at given steps,
  without a reset, for ``lpd sequence`` and ``lpd render``.
- :func:`lookahead_rollout`: the same, with the acting policy re-picked
  among candidates by looking ahead from the current state.

The QDax calls themselves are in :mod:`lpd.qd`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lpd import qd
from lpd.devices import batch_sharding


def make_episodes_eval_fn(
    env,
    policy,
    episode_length: int,
    num_episodes: int,
    batch_size: int,
    episode_fraction: bool = False,
) -> Callable:
    """``(params [B], key) -> (returns [B], descriptors [B, D])``, traceable.

    Each policy runs ``num_episodes`` episodes from random resets with QDax's
    Brax scoring function in its stochastic form; returns and descriptors are
    averaged over the episodes. The batch is sharded over the local devices.
    Jit it, or call it inside a jitted program. With ``episode_fraction``, a
    third output ``[B]`` is the mean fraction of the episode's steps taken
    before it ended (1: never fell).
    """
    scoring_fn = qd.episodes_scoring_fn(
        env, policy, episode_length, num_episodes, batch_sharding(batch_size)
    )

    def eval_fn(params, key):
        returns, descriptors, extra = scoring_fn(params, key)
        out = returns.mean(axis=1), descriptors.mean(axis=1)
        if episode_fraction:  # Transitions are [B, T, episodes].
            out += (qd.valid_steps(extra["transitions"]).mean(axis=(1, 2)),)
        return out

    return eval_fn


def rollout_bytes_per_policy(env, policy, params, episode_length, num_episodes):
    """Bytes of the trajectory QDax keeps for one policy's ``num_episodes``.

    Measured by tracing the scoring function on one policy (``params``: leaves
    ``[1, ...]``), no compile; this is what bounds the evaluation batch.
    """
    scoring_fn = qd.episodes_scoring_fn(env, policy, episode_length, num_episodes)
    _, _, extra = jax.eval_shape(scoring_fn, params, jax.random.key(0))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(extra))


def observation_stats(transitions) -> tuple[jax.Array, jax.Array]:
    """Mean and log-std ``[obs]`` of the observations of the steps that count."""
    valid = qd.valid_steps(transitions)
    obs = transitions.obs
    weights = valid[..., None] / jnp.sum(valid)
    steps = tuple(range(obs.ndim - 1))  # [B, T] or [B, T, episodes].
    mean = jnp.sum(obs * weights, axis=steps)
    var = jnp.sum(jnp.square(obs - mean) * weights, axis=steps)
    return mean, 0.5 * jnp.log(var + 1e-8)


def collect_observations(scoring_fn: Callable, params, num_obs: int, key):
    """``[B, num_obs, obs]`` observations sampled from each policy's own rollouts.

    ``scoring_fn`` is a QDax scoring function returning ``transitions``
    (``[B, T, ...]``, or ``[B, T, E, ...]`` for E episodes per policy); the
    observations are drawn uniformly (with replacement) from the steps before
    each episode ended.
    """
    key_score, key_pick = jax.random.split(key)
    _, _, extra = scoring_fn(params, key_score)
    transitions = extra["transitions"]
    num = transitions.obs.shape[0]
    obs = transitions.obs.reshape(num, -1, transitions.obs.shape[-1])
    valid = qd.valid_steps(transitions).reshape(num, -1)
    keys = jax.random.split(key_pick, num)

    def pick(obs, weights, key):
        idx = jax.random.choice(
            key, obs.shape[0], (num_obs,), p=weights / weights.sum()
        )
        return obs[idx]

    return jax.vmap(pick)(obs, valid, keys)


def rollout(env, policy, params, chunks, key, keep_states: bool = False):
    """One episode from a random reset in which step t is acted by policy
    ``chunks[t]``, swapped without a reset.

    Args:
        params: policy variables with leaves ``[K, ...]``.
        chunks: ``[T]`` int policy index per step (T = the episode length).
        key: reset key.
        keep_states: also return the pipeline states ``[T + 1, ...]``.

    Returns:
        ``{"rewards" [T], "contacts" [T, D], "dones" [T], "actions" [T, A]}``
        and, with ``keep_states``, ``"states"``.
    """

    def step(state, k):
        acting = jax.tree.map(lambda x: x[k], params)
        action = policy.apply(acting, state.obs)
        next_state = env.step(state, action)
        out = {
            "rewards": next_state.reward,
            "contacts": next_state.info["state_descriptor"],
            "dones": next_state.done,
            "actions": action,
        }
        if keep_states:
            out["states"] = next_state.pipeline_state
        return next_state, out

    state = env.reset(key)
    _, out = jax.lax.scan(step, state, jnp.asarray(chunks))
    if keep_states:
        first = jax.tree.map(lambda x: x[None], state.pipeline_state)
        out["states"] = jax.tree.map(
            lambda a, b: jnp.concatenate([a, b]), first, out["states"]
        )
    return out


def alive_mask(dones) -> np.ndarray:
    """``[..., T]`` whether each step still belongs to the episode: every step
    up to and including the first done (the env keeps stepping after it)."""
    dones = np.asarray(dones, bool)
    return (np.cumsum(dones, axis=-1) - dones) == 0


def lookahead_rollout(env, policy, candidates, asks, segments, horizon: int, key):
    """One episode from a random reset, cut into equal segments, in which the
    acting policy is re-chosen at the start of every segment by looking ahead.

    Segment n belongs to chunk ``segments[n]``; at its start each of that
    chunk's C candidates is rolled out ``horizon`` steps from a copy of the
    current state, and the one that stays up longest acts the segment, ties
    broken by the distance between its look-ahead's mean foot contact and
    the chunk's ask. Brax's bodies step deterministically, so the look-ahead
    sees exactly what the candidate would do from there.

    Args:
        candidates: policy variables with leaves ``[K, C, ...]``.
        asks: ``[K, D]`` the descriptor each chunk asks for.
        segments: ``[N]`` int chunk of each segment; the episode has
            ``env.episode_length`` steps, a multiple of N.
        horizon: look-ahead steps (> 0).

    Returns:
        ``{"rewards" [T], "contacts" [T, D], "dones" [T], "actions" [T, A],
        "picked" [N]}``: :func:`rollout`'s keys and the candidate that acted
        each segment.
    """
    segments = jnp.asarray(segments)
    seg_steps = env.episode_length // len(segments)
    width = 2.0 * jnp.sqrt(asks.shape[-1])  # Above any contact distance.

    def run(params, state, num):
        def step(state, _):
            action = policy.apply(params, state.obs)
            state = env.step(state, action)
            info = state.info["state_descriptor"]
            return state, (state.reward, info, state.done, action)

        return jax.lax.scan(step, state, None, length=num)

    def score(params, state, ask):
        _, (_, contacts, dones, _) = run(params, state, horizon)
        up = jnp.cumprod(1.0 - dones)
        contact = (up[:, None] * contacts).sum(0) / jnp.maximum(up.sum(), 1.0)
        return up.sum() - jnp.linalg.norm(contact - ask) / width

    def segment(state, k):
        chunk = jax.tree.map(lambda x: x[k], candidates)
        scores = jax.vmap(score, in_axes=(0, None, None))(chunk, state, asks[k])
        pick = jnp.argmax(scores)
        acting = jax.tree.map(lambda x: x[pick], chunk)
        state, (rewards, contacts, dones, actions) = run(acting, state, seg_steps)
        return state, (rewards, contacts, dones, actions, pick)

    _, out = jax.lax.scan(segment, env.reset(key), segments)
    rewards, contacts, dones, actions, picked = out
    flat = lambda x: x.reshape(-1, *x.shape[2:])
    return {
        "rewards": flat(rewards),
        "contacts": flat(contacts),
        "dones": flat(dones),
        "actions": flat(actions),
        "picked": picked,
    }
