"""``lpd render``: one episode of a policy as a Brax HTML viewer."""

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


def rollout(env, policy, params, key):
    """One episode of ``env.episode_length`` steps from a random reset.

    Returns the stacked pipeline states ``[T + 1, ...]``, rewards ``[T]``,
    foot contacts ``[T, D]`` and done flags ``[T]``.
    """

    def step(state, _):
        action = policy.apply(params, state.obs)
        next_state = env.step(state, action)
        out = (
            next_state.pipeline_state,
            next_state.reward,
            next_state.info["state_descriptor"],
            next_state.done,
        )
        return next_state, out

    state = env.reset(key)
    _, (pipeline, rewards, contacts, dones) = jax.lax.scan(
        step, state, None, length=env.episode_length
    )
    first = jax.tree.map(lambda x: x[None], state.pipeline_state)
    pipeline = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, pipeline)
    return pipeline, rewards, contacts, dones


def render_to_html(workdir, flat: dict, seed: int, out) -> dict:
    """Renders one random-reset episode of policy ``flat`` (``{path: [...]}``).

    The episode is cut where it ends (the body fell); returns its length,
    return and mean foot contact (QDax's descriptor for that episode).
    """
    out = Path(out)
    if out.suffix != ".html":
        raise LpdError(f"--out must end in .html, got {out}")
    if out.exists():
        raise LpdError(f"{out} already exists; choose another --out or delete it")
    meta = archive_io.load_meta(workdir)
    env, policy = archive_lib.make_task(meta)
    params = policy_lib.unflatten_params(flat)
    pipeline, rewards, contacts, dones = jax.jit(
        lambda p, k: rollout(env, policy, p, k)
    )(params, jax.random.key(seed))
    dones = np.asarray(dones)
    length = int(np.argmax(dones) + 1) if dones.any() else len(dones)
    states = [jax.tree.map(lambda x, i=i: x[i], pipeline) for i in range(length + 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html.render(env.sys, states))
    tmp.replace(out)
    return {
        "steps": length,
        "return": float(np.sum(np.asarray(rewards)[:length])),
        "descriptor": [round(float(v), 3) for v in np.mean(contacts[:length], axis=0)],
    }
