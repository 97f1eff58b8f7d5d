"""Episodes of policies, policies swapped in chunks, and Brax HTML viewers."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from brax.io import html

from lpd import archive as archive_lib
from lpd import archive_io
from lpd import policy as policy_lib
from lpd.errors import LpdError


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


def write_html(env, policy, params, chunks, key, out: Path) -> dict:
    """Writes one episode (see :func:`rollout`) as a Brax HTML viewer.

    The episode is cut where it ends (the body fell); returns its length,
    return and mean foot contact.
    """
    traj = jax.jit(lambda p, k: rollout(env, policy, p, chunks, k, True))(params, key)
    length = int(alive_mask(traj["dones"]).sum())
    states = traj["states"]
    frames = [jax.tree.map(lambda x, i=i: x[i], states) for i in range(length + 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html.render(env.sys, frames))
    tmp.replace(out)
    contacts = np.asarray(traj["contacts"])[:length]
    return {
        "steps": length,
        "return": float(np.sum(np.asarray(traj["rewards"])[:length])),
        "descriptor": [round(float(v), 3) for v in contacts.mean(axis=0)],
    }


def render_to_html(workdir, flat: dict, seed: int, out) -> dict:
    """Renders one random-reset episode of policy ``flat`` (``{path: [...]}``)."""
    out = Path(out)
    if out.suffix != ".html":
        raise LpdError(f"--out must end in .html, got {out}")
    if out.exists():
        raise LpdError(f"{out} already exists; choose another --out or delete it")
    meta = archive_io.load_meta(workdir)
    env, policy = archive_lib.make_task(meta)
    params = policy_lib.unflatten_params(
        {p: jnp.asarray(x)[None] for p, x in flat.items()}
    )
    chunks = np.zeros(env.episode_length, np.int32)
    return write_html(env, policy, params, chunks, jax.random.key(seed), out)
