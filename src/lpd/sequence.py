"""Behaviour sequencing (``lpd sequence``): one episode, K policies in turn.

The episode is cut into K chunks; chunk k is driven by a policy generated
for the k-th asked descriptor (or sentence, by the text model), swapped in
at the chunk boundary without a reset. The whole episode is one jitted
program, vmapped over seeds; the baseline runs the archive elites nearest
to each ask through the same program with the same keys.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lpd import archive as archive_lib
from lpd import (
    archive_io,
    devices,
    evaluation,
    generator,
    plots,
    render,
    rollouts,
    text_stage,
)
from lpd import policy as policy_lib
from lpd.devices import batch_sharding
from lpd.errors import LpdError
from lpd.workdir import text_dir, write_json

SUCCESS_FRACTION = 0.8  # "Still up": the episode lasted > 80% of its steps.


def chunk_index(num_steps: int, num_chunks: int) -> np.ndarray:
    """``[T]`` the chunk each step belongs to: K near-equal consecutive runs."""
    return np.minimum(
        np.arange(num_steps) * num_chunks // num_steps, num_chunks - 1
    ).astype(np.int32)


def chunk_metrics(rewards, contacts, dones, chunks, num_chunks: int) -> dict:
    """Per-seed, per-chunk return and mean foot contact over the steps alive.

    Args:
        rewards ``[S, T]``, contacts ``[S, T, D]``, dones ``[S, T]``,
        chunks ``[T]``.

    Returns:
        ``returns [S, K]``, ``descriptors [S, K, D]`` (NaN for a chunk the
        body never reached alive), ``alive_steps [S]``.
    """
    alive = rollouts.alive_mask(dones).astype(np.float64)
    onehot = np.eye(num_chunks)[chunks]  # [T, K]
    returns = np.einsum("st,tk->sk", np.asarray(rewards) * alive, onehot)
    steps = np.einsum("st,tk->sk", alive, onehot)
    sums = np.einsum("st,std,tk->skd", alive, np.asarray(contacts), onehot)
    with np.errstate(invalid="ignore", divide="ignore"):
        descriptors = sums / steps[..., None]
    return {
        "returns": returns,
        "descriptors": np.where(steps[..., None] > 0, descriptors, np.nan),
        "alive_steps": alive.sum(axis=1),
    }


def _alive_contacts(traj) -> np.ndarray:
    """``[S, T, D]`` foot contacts, NaN once the episode has ended."""
    alive = rollouts.alive_mask(traj["dones"])
    return np.where(alive[..., None], np.asarray(traj["contacts"]), np.nan)


def parse_sequence(text: str, meta: dict) -> np.ndarray:
    """``[K, D]`` asks from ``"a,b;c,d;..."``, checked against the env."""
    rows = text.split(";")
    if any(not r.strip() for r in rows):
        raise LpdError(f"--descriptors {text!r}: give descriptors as 'a,b;c,d;...'")
    return np.concatenate(
        [generator.parse_descriptors(r.strip(), None, meta) for r in rows]
    )


def _summarise(metrics: dict, asked: np.ndarray, episode_length: int) -> dict:
    achieved = metrics["descriptors"]  # [S, K, D]
    error = np.linalg.norm(achieved - asked[None], axis=-1)  # [S, K]
    chunks = []
    for k in range(len(asked)):
        reached = np.isfinite(error[:, k])
        chunks.append(
            {
                "asked": np.float64(asked[k]).round(4).tolist(),
                "achieved_mean": np.nanmean(achieved[:, k], axis=0).round(4).tolist()
                if reached.any()
                else None,
                "measure_error": float(np.nanmean(error[:, k]))
                if reached.any()
                else None,
                "reached_fraction": float(reached.mean()),
                "mean_return": float(metrics["returns"][:, k].mean()),
            }
        )
    success = metrics["alive_steps"] > SUCCESS_FRACTION * episode_length
    return {
        "chunks": chunks,
        "success_rate": float(success.mean()),
        "mean_return": float(metrics["returns"].sum(axis=1).mean()),
        "mean_episode_steps": float(metrics["alive_steps"].mean()),
    }


def parse_texts(text: str) -> list[str]:
    """Prompts from ``"first|second|..."``; one-line error for an empty one."""
    prompts = [p.strip() for p in text.split("|")]
    if any(not p for p in prompts):
        raise LpdError(
            f"--texts {text!r}: give non-empty sentences separated by '|', e.g. "
            "'hop on the left foot|walk with an even gait'"
        )
    return prompts


def _label_matches(workdir, embeddings, fitnesses) -> tuple:
    """For each prompt embedding, the archive label closest in meaning and
    the best elite carrying it: ``(labels [K], elite indices [K])``."""
    path = text_dir(workdir) / "embeddings.npz"
    with np.load(path) as data:
        texts, label_emb = data["texts"], data["embeddings"]
        pair_elite, pair_text = data["pair_elite"], data["pair_text"]
    best = np.argmax(np.asarray(embeddings) @ label_emb.T, axis=1)
    picks = []
    for u in best:
        carriers = pair_elite[pair_text == u]
        picks.append(int(carriers[np.argmax(fitnesses[carriers])]))
    return [str(texts[u]) for u in best], np.asarray(picks)


def _asks(workdir, asked, texts, archive, idx):
    """The conditions, the reference descriptor of each chunk ``[K, D]``, the
    baseline elite per chunk ``[K]`` and what the summary adds for texts."""
    stored = np.asarray(archive.descriptors)[idx]
    if texts is None:
        _, near = evaluation.nearest(jnp.asarray(asked), jnp.asarray(stored))
        return asked, asked, np.asarray(near)[:, 0], {}
    cond = text_stage.encode_prompts(texts, "--texts")
    fitnesses = np.asarray(archive.fitnesses).ravel()[idx]
    matched, near = _label_matches(workdir, cond, fitnesses)
    return cond, stored[near], near, {"texts": list(texts), "matched_labels": matched}


def _policies(gen, guidance, asks, elite_flat, num_seeds: int, key) -> dict:
    """Per method, policy parameters with leaves ``[S, K, ...]``: one
    generated policy per seed and chunk for the conditions, and the baseline
    elites; ``asks`` is ``(conditions [K, C], baseline elite indices [K])``."""
    cond, near = asks
    num_chunks = len(near)
    sample_fn = generator.make_sample_fn(gen)
    cond = jnp.asarray(np.tile(cond, (num_seeds, 1)), jnp.float32)  # [S * K, C]
    flat = sample_fn(cond, key, jnp.float32(guidance))
    generated = jax.tree.map(
        lambda x: x.reshape(num_seeds, num_chunks, *x.shape[1:]),
        policy_lib.unflatten_params(flat),
    )
    baseline = policy_lib.unflatten_params(
        {
            p: jnp.asarray(np.broadcast_to(x[near], (num_seeds, *x[near].shape)))
            for p, x in elite_flat.items()
        }
    )
    return {"generated": generated, "nearest_elites": baseline}


def _roll_out(env, policy, chunks, methods: dict, keys) -> dict:
    """Trajectories ``[S, T, ...]`` of each method, seeds sharded over devices."""
    sharding = batch_sharding(len(keys))

    @jax.jit
    def many(params, keys):
        params, keys = jax.lax.with_sharding_constraint((params, keys), sharding)
        return jax.vmap(lambda p, k: rollouts.rollout(env, policy, p, chunks, k))(
            params, keys
        )

    return {name: devices.to_host(many(p, keys)) for name, p in methods.items()}


def run_sequence(workdir, asked, options: dict, out, texts=None) -> dict:
    """Sequences generated policies and the nearest elites; writes ``out/``.

    ``asked``: descriptors ``[K, D]``; or ``texts``, K prompts for the
    text-conditioned denoiser, whose baseline is the best elite carrying the
    archive label closest in meaning (embedding cosine) to each prompt, and
    whose reference descriptor per chunk is that elite's. ``options``:
    ``seeds`` (episodes), ``guidance`` (None: the sweep's pick), ``seed``.
    ``out/sequence.json`` (per-chunk asked vs achieved, return, success for
    both), ``out/contacts.png`` (foot contact over time against the asks) and
    ``out/episode.html`` (seed 0 of the generated sequence).
    """
    out = Path(out)
    if out.exists():
        raise LpdError(f"{out} already exists; choose another --out or delete it")
    num_seeds = options["seeds"]
    if num_seeds <= 0:
        raise LpdError(f"--seeds must be > 0, got {num_seeds}")
    guidance = generator.picked_guidance(workdir, options["guidance"])
    gen = generator.load_generator(workdir, text=texts is not None)
    archive, meta = archive_io.load_archive(workdir)
    idx, elite_flat = archive_io.elites(archive)
    cond, reference, near, extra = _asks(workdir, asked, texts, archive, idx)
    env, policy = archive_lib.make_task(meta)
    num_chunks, length = len(reference), int(meta["episode_length"])
    if num_chunks > length:
        raise LpdError(f"at most {length} chunks: one step each")
    chunks = chunk_index(length, num_chunks)
    key_sample, key_reset = jax.random.split(jax.random.key(options["seed"]))
    methods = _policies(gen, guidance, (cond, near), elite_flat, num_seeds, key_sample)
    keys = jax.random.split(key_reset, num_seeds)
    trajectories = _roll_out(env, policy, chunks, methods, keys)
    summaries = {
        name: _summarise(
            chunk_metrics(
                traj["rewards"], traj["contacts"], traj["dones"], chunks, num_chunks
            ),
            reference,
            length,
        )
        for name, traj in trajectories.items()
    }
    out.mkdir(parents=True)
    summary = {
        **extra,
        "asked": np.float64(reference).round(4).tolist(),
        "chunk_steps": np.bincount(chunks).tolist(),
        "seeds": num_seeds,
        "guidance": guidance,
        "success_threshold_steps": SUCCESS_FRACTION * length,
        "descriptor_names": meta["descriptor_names"],
        "nearest_elite_descriptors": np.float64(
            np.asarray(archive.descriptors)[idx][near]
        )
        .round(4)
        .tolist(),
        **summaries,
    }
    write_json(out / "sequence.json", summary)
    plots.plot_sequence_contacts(
        {name: _alive_contacts(traj) for name, traj in trajectories.items()},
        reference,
        chunks,
        meta["descriptor_names"],
        out / "contacts.png",
    )
    first = jax.tree.map(lambda x: x[0], methods["generated"])
    render.write_episode(env, policy, first, chunks, keys[0], out / "episode.html")
    return summary


def format_summary(summary: dict) -> str:
    """A table of the asks, what each method achieved, and success rates."""
    lines = [
        "chunk  asked         generated: achieved (error, return)   nearest elites"
    ]
    for k, asked in enumerate(summary["asked"]):
        cells = []
        for name in ("generated", "nearest_elites"):
            c = summary[name]["chunks"][k]
            if c["achieved_mean"] is None:
                cells.append("fallen before")
            else:
                achieved = ",".join(f"{v:.2f}" for v in c["achieved_mean"])
                cells.append(
                    f"{achieved} ({c['measure_error']:.2f}, {c['mean_return']:.0f})"
                )
        ask = ",".join(f"{v:.2f}" for v in asked)
        if "texts" in summary:
            lines.append(
                f"{k:5d}  {summary['texts'][k]!r} (closest label: "
                f"{summary['matched_labels'][k]!r}, its elite {ask})"
            )
            ask = ""
        lines.append(f"{k:5d}  {ask:12s}  {cells[0]:36s}  {cells[1]}")
    lines.append(
        f"success (up after {summary['success_threshold_steps']:.0f} steps): "
        f"generated {summary['generated']['success_rate']:.2f}, nearest elites "
        f"{summary['nearest_elites']['success_rate']:.2f} over {summary['seeds']} seeds"
    )
    return "\n".join(lines)
