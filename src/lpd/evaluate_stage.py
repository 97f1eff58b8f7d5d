"""Last stage: measure the generator against the archive (``lpd evaluate``).

The protocol (README, "The evaluation stage"): every policy (original
elite, codec reconstruction, generated) runs ``config.evaluate.episodes``
episodes from random resets with QDax's scoring function, batch ``b`` of
every set on the same keys, so policy i of each set meets the same
episodes. Generated policies come from one jitted program that samples
latents for the asked descriptors, decodes them and finds the nearest elite
in weight space; the one rollout program that scores every set runs them.
The text metric asks the text-conditioned denoiser (``lpd train-text``) for
each of :func:`lpd.labels.metric_prompts` and counts the generated policies
whose achieved descriptor lies in the prompt's region.

Writes ``<workdir>/report/``: ``report.json``, ``report.md``,
``heatmaps.png``, ``descriptors.png``, ``returns.png``, ``parts/`` (each
batch's results, so an interrupted run resumes where it stopped),
``config.json`` and ``meta.json`` (last).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpd import archive as archive_lib
from lpd import (
    archive_io,
    codec_stage,
    devices,
    evaluation,
    generator,
    labels,
    qd,
    report,
    rollouts,
    text,
)
from lpd import baselines as baselines_lib
from lpd import policy as policy_lib
from lpd.config import config_to_dict
from lpd.errors import LpdError
from lpd.workdir import StageClock, report_dir, stage_complete, write_json

log = logging.getLogger(__name__)

STAGE_KEY = 3
ROLLOUT_MEMORY_FACTOR = 3  # Working memory of a rollout / its stored trajectory.
# Auto batches on CPU hold at most this many episodes per device: Brax steps
# more env steps per second on small batches there (README, "The evaluation
# stage": 1.33x the memory-bound batch's on the default protocol).
CPU_EPISODES_PER_DEVICE = 128


def validate(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a ``config.evaluate`` that cannot run."""
    c = config.evaluate
    if c.episodes <= 0 or c.text_samples <= 0:
        raise LpdError("evaluate.episodes and evaluate.text_samples must be > 0")
    if c.batch_size < 0 or c.uniform_conditions < 0:
        raise LpdError(
            "evaluate.batch_size and evaluate.uniform_conditions must be >= 0"
        )
    if not 0 < c.memory_fraction <= 1:
        raise LpdError("evaluate.memory_fraction must lie in (0, 1]")


class Scoring(NamedTuple):
    """What every scored set shares: one protocol, one batch size, one cache."""

    batch: int
    parts: Path  # Per-set caches of batch results, for resuming.
    score: Callable  # (flat params [B], key) -> (returns [B], achieved [B, D]).
    generate: Callable  # (descriptors [B, D], key) -> generate fn's outputs.
    top_generate: Callable | None  # The same at the top return quantile.
    text_generate: Callable  # (embeddings [B, 384], key) -> the same.
    decode: Callable  # (unit-variance latents [B, L], key) -> flat params [B].
    elites: jax.Array  # [N, P] the elites' parameters as vectors.


def memory_budget(fraction: float) -> float:
    """Bytes the evaluation may fill: ``fraction`` of all device memory, over
    every host of the run.

    Accelerators report their limit; CPU devices share each host's RAM.
    """
    local = jax.local_devices()
    stats = local[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return fraction * stats["bytes_limit"] * len(jax.devices())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return fraction * ram * jax.process_count()


def choose_batch_size(
    requested: int, num: int, bytes_per_policy: int, budget, per_device=None
) -> int:
    """Policies per jitted call: ``requested``, or the most that fit ``budget``
    (and, with ``per_device``, at most that many per device).

    Auto batches are multiples of the device count (even shards), no larger
    than ``num`` rounded up to one, and at least one policy per device.
    """
    count = len(jax.devices())
    if requested:
        return requested
    fit = int(budget // max(bytes_per_policy, 1)) // count
    if per_device:
        fit = min(fit, per_device)
    return max(count, min(fit * count, math.ceil(num / count) * count))


def make_ask_fn(gen) -> callable:
    """Jitted ``(conditions [B, D], key, guidance, elites [N, P], top)`` ->
    ``(flat params {path: [B, ...]}, nearest-elite distance [B],
    nearest-elite index [B])``: sampling and the nearest-elite search.

    Where the boolean ``top`` is true each descriptor is also asked at the
    top return quantile; one compile serves both.
    """
    sample_fn = generator.make_sample_fn(gen)

    def ask(cond, key, guidance, elites, top):
        returns = None
        if gen.returns:
            returns = jnp.where(top, 1.0, jnp.nan) * jnp.ones(cond.shape[0])
        flat = sample_fn(cond, key, guidance, returns)
        dist, index = evaluation.nearest(evaluation.flat_vectors(flat), elites)
        return flat, dist[:, 0], index[:, 0]

    return jax.jit(ask)


def make_score_fn(eval_fn) -> callable:
    """``(flat params {path: [B, ...]}, key) -> (returns [B], achieved [B, D])``:
    ``eval_fn`` (a rollout of unflattened params) jitted once for every scored
    set.

    The weights go to the host first, whichever program made them: archive
    arrays, decoded or sampled device arrays and baseline weights then share
    one input sharding, so the rollout compiles once.
    """
    rollout = jax.jit(lambda f, k: eval_fn(policy_lib.unflatten_params(f), k))

    def score(flat, key):
        return rollout(devices.to_host(flat), key)

    score.rollout = rollout  # Its ``_cache_size()`` counts the compiles.
    return score


def make_generate_fn(ask_fn, score) -> callable:
    """``(conditions [B, D], key, guidance, elites [N, P], top)`` ->
    ``(returns [B], achieved [B, D], nearest-elite distance [B],
    nearest-elite index [B])``.

    ``ask_fn`` (:func:`make_ask_fn`) samples from ``fold_in(key, 1)``;
    ``score`` (:func:`make_score_fn`), which scores every other set, rolls the
    policies out on the episodes of ``key`` itself, as the original elites'
    are.
    """

    def generate(cond, key, guidance, elites, top):
        flat, dist, index = ask_fn(
            cond, jax.random.fold_in(key, 1), guidance, elites, top
        )
        returns, achieved = score(flat, key)
        return returns, achieved, dist, index

    return generate


def _uniform_conditions(meta: dict, num: int, key) -> np.ndarray:
    low, high = np.asarray(meta["descriptor_low"]), np.asarray(meta["descriptor_high"])
    u = jax.random.uniform(key, (num, len(low)))
    return np.asarray(low + (high - low) * np.asarray(u), np.float32)


def _text_metric(s: Scoring, meta, samples: int, key):
    """Scores ``samples`` policies per metric prompt from the text model, and
    as many from the descriptor model asked each region's centre.

    Returns ``(prompts, samples, by_text, by_descriptor)`` for
    :func:`lpd.report.text_summary`.
    """
    prompts = labels.metric_prompts(meta["descriptor_names"])
    embeddings = text.encode(text.load_text_encoder(), [p["prompt"] for p in prompts])
    centres = [(np.asarray(p["low"]) + np.asarray(p["high"])) / 2 for p in prompts]
    by_text = evaluation.map_in_batches(
        s.text_generate,
        np.repeat(embeddings, samples, axis=0).astype(np.float32),
        s.batch,
        key,
        "evaluate: text prompts",
        s.parts / "text",
    )
    by_descriptor = evaluation.map_in_batches(
        s.generate,
        np.repeat(np.stack(centres), samples, axis=0).astype(np.float32),
        s.batch,
        key,
        "evaluate: prompt regions",
        s.parts / "text_regions",
    )
    return prompts, samples, by_text, by_descriptor


def _parts_dir(directory: Path, batch: int) -> Path:
    """``<report>/parts``, emptied when its batches were cut to another size
    (another machine's memory): batch results only resume at one size."""
    parts = directory / "parts"
    stamp = parts / "batch_size.json"
    if stamp.exists() and json.loads(stamp.read_text())["batch_size"] != batch:
        log.info("evaluate: batch size changed, recomputing %s", parts)
        if devices.is_main():
            shutil.rmtree(parts)
    devices.sync("evaluate parts")
    parts.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {"batch_size": batch})
    return parts


def _batch_size(c, env, policy, flat, meta) -> int:
    """Policies per jitted call: ``c.batch_size``, or what fits in memory (on
    CPU, at most :data:`CPU_EPISODES_PER_DEVICE` episodes per device)."""
    one = policy_lib.unflatten_params({p: x[:1] for p, x in flat.items()})
    rollout_bytes = rollouts.rollout_bytes_per_policy(
        env, policy, one, meta["episode_length"], c.episodes
    )
    num = next(iter(flat.values())).shape[0]
    per_device = None
    if jax.default_backend() == "cpu":
        per_device = max(1, CPU_EPISODES_PER_DEVICE // c.episodes)
    return choose_batch_size(
        c.batch_size,
        num,
        ROLLOUT_MEMORY_FACTOR * rollout_bytes,
        memory_budget(c.memory_fraction),
        per_device,
    )


def _make_scoring(c, gens, guidance, task, flat, batch, parts) -> Scoring:
    """The scoring functions of one evaluation; ``task`` is ``(env, policy,
    episode_length)``, ``gens`` the descriptor and text generators."""
    env, policy, episode_length = task
    eval_fn = rollouts.make_episodes_eval_fn(
        env, policy, episode_length, c.episodes, batch
    )
    elites = evaluation.flat_vectors({p: jnp.asarray(x) for p, x in flat.items()})
    score = make_score_fn(eval_fn)
    descriptor_fn, text_fn = (make_generate_fn(make_ask_fn(g), score) for g in gens)
    generate, top_generate, text_generate = (
        functools.partial(
            fn, guidance=jnp.float32(guidance), elites=elites, top=jnp.bool_(top)
        )
        for fn, top in ((descriptor_fn, False), (descriptor_fn, True), (text_fn, False))
    )
    return Scoring(
        batch=batch,
        parts=parts,
        score=score,
        generate=generate,
        top_generate=top_generate if gens[0].returns else None,
        text_generate=text_generate,
        decode=jax.jit(lambda z, _: generator.decode_latents(gens[0], z)),
        elites=elites,
    )


def _score_sets(
    s: Scoring, elites: tuple, latents, asks: tuple, extras: tuple
) -> report.Results:
    """Every policy set under the protocol: originals, codec reconstructions
    (each elite decoded from its stored unit-variance latent ``[N, L]``),
    generated policies (and at the top return), the uniform sweep and, from
    ``extras = (with_baselines, actor)``, the copy-and-perturb baselines
    and a DCRL actor (None: none) conditioned on both ask sets.

    Args:
        elites: ``(flat params {path: [N, ...]}, stored descriptors [N, D],
            qd_score_fn((returns, achieved)) -> QD score)``.
        asks: ``(key_eval, key_uniform_eval, uniform descriptors [U, D])``;
            every archive-ask set uses the first key, the uniform ones the
            second.
    """
    flat, asked, qd_score_fn = elites
    key_eval, key_uniform_eval, uniform_asked = asks

    def run(fn, inputs, which, name):
        key = key_eval if which == "archive" else key_uniform_eval
        desc = f"evaluate: {name.replace('_', ' ')}"
        return evaluation.map_in_batches(fn, inputs, s.batch, key, desc, s.parts / name)

    original = run(s.score, flat, "archive", "original")
    codec_flat = evaluation.map_in_batches(
        s.decode, latents, s.batch, jax.random.key(0)
    )
    codec_only = run(s.score, codec_flat, "archive", "codec")
    generated = run(s.generate, asked, "archive", "generated")
    uniform = run(s.generate, uniform_asked, "uniform", "uniform")
    top = None
    if s.top_generate is not None:
        top = run(s.top_generate, asked, "archive", "top_return")
    reference, _ = evaluation.map_in_batches(
        lambda e, _: evaluation.nearest(e, s.elites, k=2),
        s.elites,
        s.batch,
        key_eval,
    )
    with_baselines, actor = extras
    dcrl_actor = None
    if actor is not None:
        as_policies = jax.jit(
            lambda d: policy_lib.flatten_params(qd.actor_as_policies(actor, d))
        )
        actor_fn = lambda d, key: s.score(as_policies(d), key)
        dcrl_actor = {
            "archive": run(actor_fn, asked, "archive", "dcrl_actor")[:2],
            "uniform": run(actor_fn, uniform_asked, "uniform", "dcrl_uniform")[:2],
        }
    baselines = None
    if with_baselines:
        baselines = baselines_lib.run_baselines(
            run,
            s.score,
            (flat, asked),
            (uniform_asked, generated[2], uniform[2], qd_score_fn),
        )
    return report.Results(
        asked=asked,
        original=original,
        codec_only=codec_only,
        generated=generated,
        uniform_asked=uniform_asked,
        uniform=uniform,
        elite_distances=reference[:, 1],
        top_return=top,
        baselines=baselines,
        dcrl_actor=dcrl_actor,
    )


def run_evaluate_stage(config: ml_collections.ConfigDict, workdir) -> Path:
    """Evaluates (or resumes, or skips when complete); returns the report dir."""
    directory = report_dir(workdir)
    config_dict = config_to_dict(config)
    if stage_complete(directory, config_dict, "evaluate"):
        log.info("evaluate: complete in %s, skipping", directory)
        return directory
    clock = StageClock(directory)
    validate(config)
    c = config.evaluate
    guidance = generator.picked_guidance(workdir, c.guidance)
    gens = [generator.load_generator(workdir, text=t) for t in (False, True)]
    archive, meta = archive_io.load_archive(workdir)
    cells, flat = archive_io.elites(archive)
    latents = codec_stage.load_latents(workdir, cells)["latents"]
    env, policy = archive_lib.make_task(meta)
    batch = _batch_size(c, env, policy, flat, meta)
    log.info(
        "evaluate: %d elites, %d episodes each, %d policies per call",
        len(cells),
        c.episodes,
        batch,
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config_dict)
    task = (env, policy, meta["episode_length"])
    scoring = _make_scoring(
        c, gens, guidance, task, flat, batch, _parts_dir(directory, batch)
    )
    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    key_eval, key_uniform_eval, key_uniform, key_text = jax.random.split(key, 4)
    uniform_asked = _uniform_conditions(
        meta, c.uniform_conditions or len(cells), key_uniform
    )
    asked = np.asarray(archive.descriptors)[cells]
    centroids = np.asarray(archive.centroids)
    qd_score_fn = lambda scored: evaluation.archive_summary(
        *scored[:2], centroids, meta["fitness_offset"]
    )["qd_score"]
    results = _score_sets(
        scoring,
        (flat, asked, qd_score_fn),
        latents,
        (key_eval, key_uniform_eval, uniform_asked),
        (c.baselines, archive_io.load_actor(workdir)),
    )
    text_scores = _text_metric(scoring, meta, c.text_samples, key_text)
    summary = report.summarise(
        results, centroids, meta, report.model_sizes(gens[0], flat)
    )
    summary.update(
        text=report.text_summary(*text_scores, results.original),
        episodes=c.episodes,
        guidance=float(guidance),
        sample_steps=gens[0].config.diffusion.sample_steps,
        batch_size=batch,
        devices=[str(d) for d in jax.devices()],
        wall_time_s=report.stage_times(workdir, clock.total()),
        versions=archive_io.package_versions(),
        config=config_dict,
    )
    report.write(directory, summary, results, centroids, meta)
    log.info(
        "evaluate: %s, compression %.1fx",
        evaluation.format_ratios(summary),
        summary["compression_ratio"],
    )
    write_json(
        directory / "meta.json",
        {"versions": summary["versions"], "config": config_dict},
    )
    return directory
