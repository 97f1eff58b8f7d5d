"""Brax HTML viewers of episodes (``lpd render``, and ``lpd sequence``'s page)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from brax.io import html

from lpd import archive as archive_lib
from lpd import archive_io, rollouts
from lpd import policy as policy_lib
from lpd.workdir import check_out, write_text


def write_html(env, policy, params, chunks, key, out: Path) -> dict:
    """Writes one episode (see :func:`lpd.rollouts.rollout`) as a Brax HTML
    viewer.

    The episode is cut where it ends (the body fell); returns its length,
    return and mean foot contact.
    """
    run = jax.jit(lambda p, k: rollouts.rollout(env, policy, p, chunks, k, True))
    traj = run(params, key)
    length = int(rollouts.alive_mask(traj["dones"]).sum())
    states = traj["states"]
    frames = [jax.tree.map(lambda x, i=i: x[i], states) for i in range(length + 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, html.render(env.sys, frames))
    contacts = np.asarray(traj["contacts"])[:length]
    return {
        "steps": length,
        "return": float(np.sum(np.asarray(traj["rewards"])[:length])),
        "descriptor": [round(float(v), 3) for v in contacts.mean(axis=0)],
    }


def render_to_html(workdir, flat: dict, seed: int, out) -> dict:
    """Renders one random-reset episode of policy ``flat`` (``{path: [...]}``)."""
    out = check_out(out, ".html")
    meta = archive_io.load_meta(workdir)
    env, policy = archive_lib.make_task(meta)
    params = policy_lib.unflatten_params(
        {p: jnp.asarray(x)[None] for p, x in flat.items()}
    )
    chunks = np.zeros(env.episode_length, np.int32)
    return write_html(env, policy, params, chunks, jax.random.key(seed), out)
