"""Behaviour sequencing (``lpd sequence``): one episode, K policies in turn.

The episode is cut into K chunks; chunk k is driven by a policy generated
for the k-th asked descriptor (or sentence, by the text model), swapped in
at the chunk boundary without a reset. The whole episode is one jitted
program, vmapped over seeds; the baseline runs the archive elites nearest
to each ask through the same program with the same keys.

:func:`run_benchmark` does the same over many random sequences of asks the
elites reach (``benchmarks/bench_sequence.py``).
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


def chunk_metrics(rewards, contacts, dones, chunks, num_chunks: int, settle=0) -> dict:
    """Per-seed, per-chunk return and mean foot contact over the steps alive.

    Args:
        rewards ``[S, T]``, contacts ``[S, T, D]``, dones ``[S, T]``,
        chunks ``[T]``; ``settle``: the first steps of each chunk left out of
        its foot contact (the new policy takes over the old one's gait), not
        of its return.

    Returns:
        ``returns [S, K]``, ``descriptors [S, K, D]`` (NaN for a chunk the
        body never reached alive past its settling steps), ``alive_steps [S]``.
    """
    chunks = np.asarray(chunks)
    alive = rollouts.alive_mask(dones).astype(np.float64)
    onehot = np.eye(num_chunks)[chunks]  # [T, K]
    starts = np.searchsorted(chunks, chunks)  # First step of each step's chunk.
    measured = alive * (np.arange(len(chunks)) - starts >= settle)
    returns = np.einsum("st,tk->sk", np.asarray(rewards) * alive, onehot)
    steps = np.einsum("st,tk->sk", measured, onehot)
    sums = np.einsum("st,std,tk->skd", measured, np.asarray(contacts), onehot)
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


def _outcome(metrics: dict, asks: np.ndarray, episode_steps: int) -> dict:
    """What sequenced episodes achieved against their ``asks`` (``[S, K, D]``,
    or ``[K, D]`` for the same asks in every episode), from
    :func:`chunk_metrics`: the success rate (still up after
    ``SUCCESS_FRACTION`` of the steps), the measure error over the chunks
    reached alive past their settling steps (overall and per chunk, None
    where none was), the share of episodes reaching each chunk, the mean
    return and the mean episode steps."""
    error = np.linalg.norm(metrics["descriptors"] - asks, axis=-1)  # [S, K]
    reached = np.isfinite(error)
    counts = reached.sum(axis=0)
    per_chunk = np.where(reached, error, 0).sum(axis=0) / np.maximum(counts, 1)
    return {
        "success": float(
            np.mean(metrics["alive_steps"] > SUCCESS_FRACTION * episode_steps)
        ),
        "measure_error": float(np.nanmean(error)) if reached.any() else None,
        "measure_error_per_chunk": [
            float(e) if n else None for e, n in zip(per_chunk, counts, strict=True)
        ],
        "reached_per_chunk": reached.mean(axis=0).tolist(),
        "mean_return": float(metrics["returns"].sum(axis=1).mean()),
        "mean_episode_steps": float(metrics["alive_steps"].mean()),
    }


def _summarise(metrics: dict, asked: np.ndarray, episode_length: int) -> dict:
    achieved = metrics["descriptors"]  # [S, K, D]
    outcome = _outcome(metrics, asked, episode_length)
    chunks = []
    for k in range(len(asked)):
        reached = outcome["measure_error_per_chunk"][k] is not None
        chunks.append(
            {
                "asked": np.float64(asked[k]).round(4).tolist(),
                "achieved_mean": np.nanmean(achieved[:, k], axis=0).round(4).tolist()
                if reached
                else None,
                "measure_error": outcome["measure_error_per_chunk"][k],
                "reached_fraction": outcome["reached_per_chunk"][k],
                "mean_return": float(metrics["returns"][:, k].mean()),
            }
        )
    return {
        "chunks": chunks,
        "success_rate": outcome["success"],
        "mean_return": outcome["mean_return"],
        "mean_episode_steps": outcome["mean_episode_steps"],
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


def _policies(gen, guidance, asks, elite_flat, key, top=None) -> dict:
    """Per method, policy parameters with leaves ``[S, K, ...]`` (or
    ``[S, K, C, ...]``, C candidates per chunk): a generated policy for each
    seed's condition of each chunk, and the baseline elites; ``asks`` is
    ``(conditions [S, K, (C,) cond], baseline elite indices [S, K, (C)])``;
    ``top``: None, or the return quantile every generated policy is also
    asked for."""
    cond, near = asks
    cond = jnp.asarray(cond.reshape(-1, cond.shape[-1]), jnp.float32)
    returns = None if top is None else jnp.full(len(cond), top, jnp.float32)
    sample_fn = generator.make_sample_fn(gen)
    flat = sample_fn(cond, key, jnp.float32(guidance), returns)
    generated = jax.tree.map(
        lambda x: x.reshape(*near.shape, *x.shape[1:]),
        policy_lib.unflatten_params(flat),
    )
    baseline = policy_lib.unflatten_params(
        {p: jnp.asarray(x[near]) for p, x in elite_flat.items()}
    )
    return {"generated": generated, "nearest_elites": baseline}


def _roll_out(env, policy, chunks, methods: dict, keys, lookahead=None) -> dict:
    """Trajectories ``[S, T, ...]`` of each method, seeds sharded over devices.

    ``lookahead``: None, or ``(asks [S, K, D], segment steps, horizon)`` for
    :func:`rollouts.lookahead_rollout` over candidates ``[S, K, C, ...]``.
    """
    sharding = batch_sharding(len(keys))
    if lookahead is None:
        one = lambda p, k, _: rollouts.rollout(env, policy, p, chunks, k)
        asks = np.zeros(len(keys))
    else:
        asks, seg_steps, horizon = lookahead
        segments = np.asarray(chunks)[::seg_steps]
        one = lambda p, k, a: rollouts.lookahead_rollout(
            env, policy, p, jnp.asarray(a), segments, horizon, k
        )

    @jax.jit
    def many(params, keys, asks):
        params, keys, asks = jax.lax.with_sharding_constraint(
            (params, keys, asks), sharding
        )
        return jax.vmap(one)(params, keys, asks)

    asks = jnp.asarray(asks, jnp.float32)
    return {name: devices.to_host(many(p, keys, asks)) for name, p in methods.items()}


def _candidate_asks(asks, neighbours):
    """``[..., C, D]`` what each chunk's C generated candidates are asked
    for: the chunk's ask ``[..., D]``, then the descriptors of the elites
    nearest it (``neighbours`` ``[..., C, D]``, nearest first), so the
    candidates spread over the ask's neighbourhood as the nearest elites do
    (measured on the default workdir: 0.74 success against 0.69 with all C
    asked for the ask itself)."""
    return np.concatenate([asks[..., None, :], neighbours[..., 1:, :]], axis=-2)


def _candidates(cond, reference, stored, num_cands: int, neighbourhood: bool):
    """Conditions ``[..., C, cond]`` and baseline elites ``[..., C]`` of C
    candidates per ask (``[..., cond]`` and ``[...]`` for C = 1): the C
    elites whose ``stored`` descriptors are nearest each ``reference``
    ``[..., D]``; the generated ones asked for the ask and, with
    ``neighbourhood``, those elites' descriptors (:func:`_candidate_asks`),
    else C times for the ask."""
    lead = reference.shape[:-1]
    flat = jnp.asarray(reference.reshape(-1, reference.shape[-1]))
    near = np.asarray(evaluation.nearest(flat, jnp.asarray(stored), num_cands)[1])
    near = near.reshape(*lead, num_cands)
    if neighbourhood:
        cond = _candidate_asks(cond, stored[near])
    else:
        cond = np.broadcast_to(cond[..., None, :], (*near.shape, cond.shape[-1]))
    return (cond[..., 0, :], near[..., 0]) if num_cands == 1 else (cond, near)


def _lookahead_options(options: dict, steps: int, what: str) -> tuple:
    """``(candidates, replan, horizon)`` from ``options``, checked: with more
    than one candidate, ``replan`` must divide ``steps`` (``what``'s)."""
    num, replan, horizon = (options[k] for k in ("candidates", "replan", "horizon"))
    if num <= 0:
        raise LpdError(f"--candidates must be > 0, got {num}")
    if num > 1 and (replan <= 0 or steps % replan or horizon <= 0):
        raise LpdError(
            f"--replan must divide {what}'s {steps} steps and --horizon be > 0, "
            f"got {replan} and {horizon}"
        )
    return num, replan, horizon


def _lookahead_record(num: int, replan: int, horizon: int) -> dict:
    """The look-ahead's settings as the summaries record them."""
    on = num > 1
    return {
        "candidates": num,
        "replan_steps": replan if on else None,
        "horizon_steps": horizon if on else None,
    }


def _sequence_chunks(options: dict, length: int, num_chunks: int) -> tuple:
    """``(candidates, replan, horizon, chunks [T])`` for ``lpd sequence``:
    near-equal chunks, starting on multiples of ``replan`` with a look-ahead."""
    num_cands, replan, horizon = _lookahead_options(options, length, "the episode")
    step = 1 if num_cands == 1 else replan
    if num_chunks > length // step:
        raise LpdError(f"at most {length // step} chunks of {step} step(s) each")
    chunks = np.repeat(chunk_index(length // step, num_chunks), step)
    return num_cands, replan, horizon, chunks


def _write_outputs(out, task, trajectories, methods, reference, chunks, key, replan):
    """``out/contacts.png`` for both methods and ``out/episode.html``, seed
    0 of the generated sequence as it was acted (the look-ahead's picks)."""
    env, policy, meta = task
    plots.plot_sequence_contacts(
        {name: _alive_contacts(traj) for name, traj in trajectories.items()},
        reference,
        chunks,
        meta["descriptor_names"],
        out / "contacts.png",
    )
    first, acting = jax.tree.map(lambda x: x[0], methods["generated"]), chunks
    if "picked" in trajectories["generated"]:
        picked = trajectories["generated"]["picked"][0]
        first, acting = _acted(first, chunks, picked, replan)
    render.write_episode(env, policy, first, acting, key, out / "episode.html")


def _acted(params, chunks, picked, replan: int):
    """One episode's acting policies ``[N, ...]``, one per segment of
    ``replan`` steps, from candidates ``[K, C, ...]`` and the look-ahead's
    ``picked`` ``[N]``; and the ``[T]`` segment index of each step."""
    seg_chunks = np.asarray(chunks)[::replan]
    acted = jax.tree.map(lambda x: x[seg_chunks, np.asarray(picked)], params)
    return acted, np.repeat(np.arange(len(seg_chunks), dtype=np.int32), replan)


def run_sequence(workdir, asked, options: dict, out, texts=None) -> dict:
    """Sequences generated policies and the nearest elites; writes ``out/``.

    ``asked``: descriptors ``[K, D]``; or ``texts``, K prompts for the
    text-conditioned denoiser, whose baseline is the best elite carrying the
    archive label closest in meaning (embedding cosine) to each prompt, and
    whose reference descriptor per chunk is that elite's. ``options``:
    ``seeds`` (episodes), ``guidance`` (None: the sweep's pick), ``seed``,
    ``candidates`` (C > 1: C generated policies per chunk and the C elites
    nearest its reference, re-picked every ``replan`` steps by a look-ahead
    of ``horizon`` steps, :func:`rollouts.lookahead_rollout`; the chunks
    then start on those steps), ``return`` (None, or a return quantile the
    generated policies are also asked for).
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
    num_cands, replan, horizon, chunks = _sequence_chunks(options, length, num_chunks)
    stored = np.asarray(archive.descriptors)[idx]
    lookahead = None
    if num_cands > 1:  # A sentence has no neighbourhood: C samples for it.
        cond, near = _candidates(cond, reference, stored, num_cands, texts is None)
        lookahead = (np.broadcast_to(reference, (num_seeds, *reference.shape)),)
        lookahead += (replan, horizon)
    key_sample, key_reset = jax.random.split(jax.random.key(options["seed"]))
    tile = lambda x: np.broadcast_to(x, (num_seeds, *x.shape))
    asks = (tile(cond), tile(near))
    methods = _policies(gen, guidance, asks, elite_flat, key_sample, options["return"])
    keys = jax.random.split(key_reset, num_seeds)
    trajectories = _roll_out(env, policy, chunks, methods, keys, lookahead)
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
        "return": options["return"],
        **_lookahead_record(num_cands, replan, horizon),
        "success_threshold_steps": SUCCESS_FRACTION * length,
        "descriptor_names": meta["descriptor_names"],
        "nearest_elite_descriptors": np.float64(
            stored[near.reshape(num_chunks, -1)[:, 0]]
        )
        .round(4)
        .tolist(),
        **summaries,
    }
    write_json(out / "sequence.json", summary)
    task = (env, policy, meta)
    _write_outputs(out, task, trajectories, methods, reference, chunks, keys[0], replan)
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


def reachable_descriptors(meta: dict, elite_flat: dict, key) -> np.ndarray:
    """``[M, D]`` foot-contact patterns the archive holds from a random start:
    each elite's over one random-reset episode of the archive's length, kept
    where the elite stayed up to the end."""
    env, policy = archive_lib.make_task(meta)
    num = len(next(iter(elite_flat.values())))
    batch = num + -num % jax.device_count()  # One call, on every device.
    task = (env, policy, int(meta["episode_length"]))
    _, descriptors, lasted = evaluation.reevaluate(task, elite_flat, 1, batch, key)
    return descriptors[lasted == 1]


def run_benchmark(workdir, options: dict) -> dict:
    """Random sequences of asks the archive can reach, generated policies
    against the nearest elites switched the same way.

    ``options``: ``sequences`` (one episode each, its own asks and reset),
    ``chunks`` (asks per sequence), ``chunk_steps`` (None: the archive's
    episode length, so episodes are ``chunks`` times longer than the
    archive's), ``settle`` (steps after each switch left out of the chunk's
    measure error), ``seed`` (draws the asks, samples and resets),
    ``guidance`` (None: the sweep's pick), ``candidates`` (1: one policy per
    ask; C > 1: C generated policies, and the C nearest elites, of which a
    look-ahead of ``horizon`` steps re-picks one every ``replan`` steps, see
    :func:`rollouts.lookahead_rollout`), ``return`` (None, or a return
    quantile the generated policies are also asked for). The asks are drawn, with
    replacement, from :func:`reachable_descriptors`. Returns, per method
    (``generated``, ``nearest_elite``): the success rate (still up after
    ``SUCCESS_FRACTION`` of the episode), the measure error over the chunks
    reached alive past their settling steps (and per chunk), the share of
    sequences reaching each chunk, the mean return and episode steps.
    """
    num_seqs, num_chunks, settle = (
        options[k] for k in ("sequences", "chunks", "settle")
    )
    if num_seqs <= 0 or num_chunks <= 0:
        raise LpdError(
            f"--sequences and --chunks must be > 0, got {num_seqs}, {num_chunks}"
        )
    guidance = generator.picked_guidance(workdir, options["guidance"])
    gen = generator.load_generator(workdir, text=False)
    archive, meta = archive_io.load_archive(workdir)
    chunk_steps = options["chunk_steps"] or int(meta["episode_length"])
    if not 0 <= settle < chunk_steps:
        raise LpdError(f"--settle must lie in [0, {chunk_steps}), got {settle}")
    num_cands, replan, horizon = _lookahead_options(options, chunk_steps, "a chunk")
    idx, elite_flat = archive_io.elites(archive)
    key_reach, key_asks, key_sample, key_reset = jax.random.split(
        jax.random.key(options["seed"]), 4
    )
    reachable = reachable_descriptors(meta, elite_flat, key_reach)
    if not len(reachable):
        raise LpdError(
            f"no elite of {workdir} stays up from a random start: nothing to ask"
        )
    pick = jax.random.choice(key_asks, len(reachable), (num_seqs, num_chunks))
    asks = reachable[np.asarray(pick)]  # [S, K, D]
    stored = np.asarray(archive.descriptors)[idx]
    cond, near = _candidates(asks, asks, stored, num_cands, neighbourhood=True)
    methods = _policies(
        gen, guidance, (cond, near), elite_flat, key_sample, options["return"]
    )
    episode_steps = num_chunks * chunk_steps
    env, policy = archive_lib.make_task({**meta, "episode_length": episode_steps})
    chunks = np.repeat(np.arange(num_chunks, dtype=np.int32), chunk_steps)
    lookahead = None if num_cands == 1 else (asks, replan, horizon)
    keys = jax.random.split(key_reset, num_seqs)
    trajectories = _roll_out(env, policy, chunks, methods, keys, lookahead)
    metrics = lambda t: chunk_metrics(
        t["rewards"], t["contacts"], t["dones"], chunks, num_chunks, settle
    )
    return {
        "generated": _outcome(metrics(trajectories["generated"]), asks, episode_steps),
        "nearest_elite": _outcome(
            metrics(trajectories["nearest_elites"]), asks, episode_steps
        ),
        "sequences": num_seqs,
        "chunks": num_chunks,
        "chunk_steps": chunk_steps,
        "archive_episode_length": int(meta["episode_length"]),
        "settle_steps": settle,
        **_lookahead_record(num_cands, replan, horizon),
        "seed": options["seed"],
        "guidance": guidance,
        "return": options["return"],
        "reachable_elites": len(reachable),
        "elites": len(idx),
        "success_threshold_steps": SUCCESS_FRACTION * episode_steps,
    }
