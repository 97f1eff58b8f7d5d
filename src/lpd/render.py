"""Episodes to watch (``lpd render``, and ``lpd sequence``'s page): Brax's HTML
viewer, or pictures drawn here that need no network (filmstrip PNG, GIF)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from brax.io import html
from PIL import Image

from lpd import archive as archive_lib
from lpd import archive_io, rollouts
from lpd import policy as policy_lib
from lpd.plots import plt  # Agg, set once for every picture.
from lpd.workdir import atomic_path, check_out, write_text

SUFFIXES = (".html", ".png", ".gif")  # Brax's viewer; offline pictures.
FILMSTRIP_FRAMES = 8
GIF_FRAMES = 100  # At most; the GIF shows every k-th step.
_CAPSULE, _CYLINDER = 3, 5  # MuJoCo geom types drawn as segments.


def _rotate(q: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``v`` ``[..., 3]`` rotated by unit quaternions ``q`` ``[..., 4]`` (w first)."""
    w, u = q[..., :1], q[..., 1:]
    t = 2.0 * np.cross(u, v)
    return v + w * t + np.cross(u, t)


def body_segments(sys, pos: np.ndarray, rot: np.ndarray) -> tuple:
    """The body's geoms in world coordinates, from link poses ``pos`` ``[T, L,
    3]`` and ``rot`` ``[T, L, 4]``: capsules and cylinders as segments
    ``[T, G, 2, 3]`` with radii ``[G]``, every other geom (spheres, boxes) as
    a point ``[T, H, 3]`` with a size ``[H]``; the ground plane is left out.
    """
    segments, radii, points, sizes = [], [], [], []
    for g in range(len(sys.geom_type)):
        link = int(sys.geom_bodyid[g]) - 1
        if link < 0:  # The world body: the floor.
            continue
        centre = pos[:, link] + _rotate(rot[:, link], np.asarray(sys.geom_pos[g]))
        size = np.asarray(sys.geom_size[g])
        if int(sys.geom_type[g]) in (_CAPSULE, _CYLINDER):
            axis = _rotate(np.asarray(sys.geom_quat[g]), np.array([0.0, 0.0, size[1]]))
            axis = _rotate(rot[:, link], axis)
            segments.append(np.stack([centre - axis, centre + axis], axis=1))
            radii.append(size[0])
        else:
            points.append(centre)
            sizes.append(size[0])
    stack = lambda xs, shape: np.stack(xs, axis=1) if xs else np.zeros(shape)
    return (
        stack(segments, (len(pos), 0, 2, 3)),
        np.asarray(radii),
        stack(points, (len(pos), 0, 3)),
        np.asarray(sizes),
    )


def _draw_body(ax, segments, radii, points, sizes, contact=None) -> None:
    """One frame seen from the side (x right, z up): the ground, the geoms
    in colours of their own, and which feet touch the ground (``contact``:
    ``x`` down, ``.`` up)."""
    ax.axhline(0.0, color="0.5", lw=1)
    colours = plt.get_cmap("tab10").colors  # One per geom: limbs apart.
    for i, ((a, b), r) in enumerate(zip(segments, radii, strict=True)):
        ax.plot(
            [a[0], b[0]],
            [a[2], b[2]],
            color=colours[i % len(colours)],
            lw=max(2, 60 * r),
            solid_capstyle="round",
        )
    for c, r in zip(points, sizes, strict=True):
        ax.plot(c[0], c[2], "o", color="0.3", ms=max(3, 60 * r))
    if contact is not None:
        ax.set_title(
            "feet " + "".join("x" if c else "." for c in contact),
            fontsize=8,
            loc="right",
        )


def _frame_view(ax, centre_x: float, height: float) -> None:
    ax.set_xlim(centre_x - height, centre_x + height)
    ax.set_ylim(-0.1 * height, 1.1 * height)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def write_picture(sys, states, contacts: np.ndarray, out: Path) -> None:
    """A picture of an episode that needs no network: a filmstrip of
    :data:`FILMSTRIP_FRAMES` moments (``.png``) or an animated GIF (``.gif``),
    drawn from the link poses ``states.x`` ``[T + 1, L, ...]``, each frame
    centred on the body."""
    pos, rot = np.asarray(states.x.pos), np.asarray(states.x.rot)
    segments, radii, points, sizes = body_segments(sys, pos, rot)
    ends = np.concatenate(
        [segments.reshape(len(pos), -1, 3), points.reshape(len(pos), -1, 3)], axis=1
    )
    height = max(1.0, float(ends[..., 2].max()) * 1.1)
    centre = pos[:, 0, 0]  # The root link: the torso.
    steps = len(pos) - 1

    def draw(ax, t):
        contact = contacts[min(t, steps - 1)] if steps else None
        _draw_body(ax, segments[t], radii, points[t], sizes, contact)
        _frame_view(ax, centre[t], height)
        ax.set_xlabel(f"step {t}", fontsize=8)

    with atomic_path(out) as tmp:
        if out.suffix == ".png":
            times = np.linspace(0, steps, FILMSTRIP_FRAMES).round().astype(int)
            fig, axes = plt.subplots(1, len(times), figsize=(2 * len(times), 2.4))
            for ax, t in zip(axes, times, strict=True):
                draw(ax, t)
            fig.tight_layout()
            fig.savefig(tmp, format="png", dpi=100)
        else:
            times = np.arange(0, steps + 1, max(1, -(-steps // GIF_FRAMES)))
            fig, ax = plt.subplots(figsize=(4, 3))
            images = []
            for t in times:
                ax.clear()
                draw(ax, t)
                fig.canvas.draw()
                rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3]
                images.append(Image.fromarray(rgb).quantize(colors=64))
            images[0].save(
                tmp,
                format="GIF",
                save_all=True,
                append_images=images[1:],
                duration=50,
                loop=0,
            )
        plt.close(fig)


def write_episode(env, policy, params, chunks, key, out: Path) -> dict:
    """Writes one episode (see :func:`lpd.rollouts.rollout`) as a Brax HTML
    viewer (``.html``) or as a picture (``.png`` filmstrip, ``.gif``; see
    :func:`write_picture`).

    The episode is cut where it ends (the body fell); returns its length,
    return and mean foot contact.
    """
    run = jax.jit(lambda p, k: rollouts.rollout(env, policy, p, chunks, k, True))
    traj = run(params, key)
    length = int(rollouts.alive_mask(traj["dones"]).sum())
    states = jax.tree.map(lambda x: x[: length + 1], traj["states"])
    contacts = np.asarray(traj["contacts"])[:length]
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".html":
        frames = [jax.tree.map(lambda x, i=i: x[i], states) for i in range(length + 1)]
        write_text(out, html.render(env.sys, frames))
    else:
        write_picture(env.sys, states, contacts > 0.5, out)
    return {
        "steps": length,
        "return": float(np.sum(np.asarray(traj["rewards"])[:length])),
        "descriptor": [round(float(v), 3) for v in contacts.mean(axis=0)],
    }


def render_episode(workdir, flat: dict, seed: int, out) -> dict:
    """Renders one random-reset episode of policy ``flat`` (``{path: [...]}``)
    to ``out`` (``.html``, ``.png`` or ``.gif``)."""
    out = check_out(out, SUFFIXES)
    meta = archive_io.load_meta(workdir)
    env, policy = archive_lib.make_task(meta)
    params = policy_lib.unflatten_params(
        {p: jnp.asarray(x)[None] for p, x in flat.items()}
    )
    chunks = np.zeros(env.episode_length, np.int32)
    return write_episode(env, policy, params, chunks, jax.random.key(seed), out)
