"""Last stage: measure the generator against the archive (``lpd evaluate``).

The protocol of ``shared/method.md`` section 5. Every policy (original elite,
codec reconstruction, generated) runs ``config.evaluate.episodes`` episodes
from random resets with QDax's scoring function, batch ``b`` of every set on
the same keys, so policy i of each set meets the same episodes. Generated
policies come from one jitted program per batch: sample latents for the
asked descriptors, decode, roll out, and find the nearest elite in weight
space. The text metric asks the text-conditioned denoiser (``lpd
train-text``) for each of :func:`lpd.labels.metric_prompts` and counts the
generated policies whose achieved descriptor lies in the prompt's region.

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
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpd import archive as archive_lib
from lpd import (
    archive_io,
    codec_stage,
    diffusion_stage,
    evaluation,
    labels,
    qd,
    report,
    text,
)
from lpd import policy as policy_lib
from lpd.config import config_to_dict, stage_complete
from lpd.errors import LpdError
from lpd.logs import write_json_atomic

log = logging.getLogger(__name__)

STAGE_KEY = 3
ROLLOUT_MEMORY_FACTOR = 3  # Working memory of a rollout / its stored trajectory.


def report_dir(workdir) -> Path:
    return Path(workdir) / "report"


def memory_budget(fraction: float) -> float:
    """Bytes the evaluation may fill: ``fraction`` of all local device memory.

    Accelerators report their limit; CPU devices share the host's RAM.
    """
    devices = jax.local_devices()
    stats = devices[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return fraction * stats["bytes_limit"] * len(devices)
    return fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_batch_size(requested: int, num: int, bytes_per_policy: int, budget) -> int:
    """Policies per jitted call: ``requested``, or the most that fit ``budget``.

    Auto batches are multiples of the device count (even shards), no larger
    than ``num`` rounded up to one, and at least one policy per device.
    """
    devices = len(jax.local_devices())
    if requested:
        return requested
    fit = int(budget // max(bytes_per_policy, 1)) // devices * devices
    return max(devices, min(fit, math.ceil(num / devices) * devices))


def make_generate_fn(gen, eval_fn) -> callable:
    """Jitted ``(conditions [B, D], key, guidance, elites [N, P])``.

    Returns ``(returns [B], achieved [B, D], nearest-elite distance [B],
    nearest-elite index [B])``; episodes use ``key`` itself (as the original
    elites' do), sampling ``fold_in(key, 1)``.
    """
    sample_fn = diffusion_stage.make_sample_fn(gen)

    def generate(cond, key, guidance, elites):
        flat = sample_fn(cond, jax.random.fold_in(key, 1), guidance)
        returns, achieved = eval_fn(policy_lib.unflatten_params(flat), key)
        dist, index = evaluation.nearest(evaluation.flat_vectors(flat), elites)
        return returns, achieved, dist[:, 0], index[:, 0]

    return jax.jit(generate)


def _codec_reconstructions(gen, workdir, cells, batch_size: int) -> dict:
    """Each elite decoded from its stored latent: flat params ``{path: [N, ...]}``.

    ``cells``: ``[N]`` archive cells of the elites, which the latents must match.
    """
    latents = codec_stage.load_latents(workdir, cells)["latents"]  # Unit variance.
    decode = jax.jit(lambda z, _: diffusion_stage.decode_latents(gen, z))
    return evaluation.map_in_batches(decode, latents, batch_size, jax.random.key(0))


def _uniform_conditions(meta: dict, num: int, key) -> np.ndarray:
    low, high = np.asarray(meta["descriptor_low"]), np.asarray(meta["descriptor_high"])
    u = jax.random.uniform(key, (num, len(low)))
    return np.asarray(low + (high - low) * np.asarray(u), np.float32)


def _text_metric(text_generate, generate, meta, samples, batch, key, parts):
    """Scores ``samples`` policies per metric prompt from the text model
    (``text_generate``), and as many from the descriptor model (``generate``)
    asked each region's centre.

    Returns ``(prompts, samples, by_text, by_descriptor)`` for
    :func:`lpd.report.text_summary`.
    """
    prompts = labels.metric_prompts(meta["descriptor_names"])
    embeddings = text.encode(text.load_text_encoder(), [p["prompt"] for p in prompts])
    centres = [(np.asarray(p["low"]) + np.asarray(p["high"])) / 2 for p in prompts]
    by_text = evaluation.map_in_batches(
        text_generate,
        np.repeat(embeddings, samples, axis=0).astype(np.float32),
        batch,
        key,
        "evaluate: text prompts",
        parts / "text",
    )
    by_descriptor = evaluation.map_in_batches(
        generate,
        np.repeat(np.stack(centres), samples, axis=0).astype(np.float32),
        batch,
        key,
        "evaluate: prompt regions",
        parts / "text_regions",
    )
    return prompts, samples, by_text, by_descriptor


def _parts_dir(directory: Path, batch: int) -> Path:
    """``<report>/parts``, emptied when its batches were cut to another size
    (another machine's memory): batch results only resume at one size."""
    parts = directory / "parts"
    stamp = parts / "batch_size.json"
    if stamp.exists() and json.loads(stamp.read_text())["batch_size"] != batch:
        log.info("evaluate: batch size changed, recomputing %s", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, {"batch_size": batch})
    return parts


def run_evaluate_stage(config: ml_collections.ConfigDict, workdir) -> Path:
    """Evaluates (or resumes, or skips when complete); returns the report dir."""
    started = time.monotonic()
    directory = report_dir(workdir)
    config_dict = config_to_dict(config)
    if stage_complete(directory, config_dict, "evaluate"):
        log.info("evaluate: complete in %s, skipping", directory)
        return directory
    c = config.evaluate
    if (
        c.episodes <= 0
        or c.text_samples <= 0
        or c.batch_size < 0
        or c.uniform_conditions < 0
    ):
        raise LpdError(
            "evaluate.episodes and evaluate.text_samples must be > 0, "
            "evaluate.batch_size and evaluate.uniform_conditions >= 0"
        )
    guidance = diffusion_stage.picked_guidance(workdir, c.guidance)
    gen = diffusion_stage.load_generator(workdir)
    text_gen = diffusion_stage.load_generator(workdir, text=True)
    archive, meta = archive_io.load_archive(workdir)
    idx, flat = archive_io.elites(archive)
    asked = np.asarray(archive.descriptors)[idx]
    centroids = np.asarray(archive.centroids)
    env, policy = archive_lib.make_task(meta)

    one = policy_lib.unflatten_params({p: x[:1] for p, x in flat.items()})
    rollout_bytes = qd.rollout_bytes_per_policy(
        env, policy, one, meta["episode_length"], c.episodes
    )
    batch = choose_batch_size(
        c.batch_size,
        len(idx),
        ROLLOUT_MEMORY_FACTOR * rollout_bytes,
        memory_budget(c.memory_fraction),
    )
    log.info(
        "evaluate: %d elites, %d episodes each, %d policies per call",
        len(idx),
        c.episodes,
        batch,
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "config.json", config_dict)
    parts = _parts_dir(directory, batch)

    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    key_eval, key_uniform_eval, key_uniform, key_text = jax.random.split(key, 4)
    eval_fn = qd.make_episodes_eval_fn(
        env, policy, meta["episode_length"], c.episodes, batch
    )
    score = jax.jit(lambda f, k: eval_fn(policy_lib.unflatten_params(f), k))
    elites = evaluation.flat_vectors({p: jnp.asarray(x) for p, x in flat.items()})
    generate, text_generate = (
        functools.partial(
            make_generate_fn(g, eval_fn), guidance=jnp.float32(guidance), elites=elites
        )
        for g in (gen, text_gen)
    )

    original = evaluation.map_in_batches(
        score, flat, batch, key_eval, "evaluate: original elites", parts / "original"
    )
    codec_flat = _codec_reconstructions(gen, workdir, idx, batch)
    codec_only = evaluation.map_in_batches(
        score, codec_flat, batch, key_eval, "evaluate: codec only", parts / "codec"
    )
    generated = evaluation.map_in_batches(
        generate, asked, batch, key_eval, "evaluate: generated", parts / "generated"
    )
    uniform_asked = _uniform_conditions(
        meta, c.uniform_conditions or len(idx), key_uniform
    )
    uniform = evaluation.map_in_batches(
        generate,
        uniform_asked,
        batch,
        key_uniform_eval,
        "evaluate: uniform sweep",
        parts / "uniform",
    )
    text_scores = _text_metric(
        text_generate, generate, meta, c.text_samples, batch, key_text, parts
    )
    reference, _ = evaluation.map_in_batches(
        lambda e, _: evaluation.nearest(e, elites, k=2), elites, batch, key
    )
    results = report.Results(
        asked=asked,
        original=original,
        codec_only=codec_only,
        generated=generated,
        uniform_asked=uniform_asked,
        uniform=uniform,
        elite_distances=reference[:, 1],
    )
    summary = report.summarise(results, centroids, meta, report.model_sizes(gen, flat))
    summary.update(
        text=report.text_summary(*text_scores, original),
        episodes=c.episodes,
        guidance=float(guidance),
        sample_steps=gen.config.diffusion.sample_steps,
        batch_size=batch,
        devices=[str(d) for d in jax.local_devices()],
        wall_time_s=report.stage_times(workdir, time.monotonic() - started),
        versions=archive_io.package_versions(),
        config=config_dict,
    )
    report.write(directory, summary, results, centroids, meta)
    log.info(
        "evaluate: reward ratio %.3f, coverage ratio %.3f, compression %.1fx",
        summary["reward_ratio"],
        summary["coverage_ratio"],
        summary["compression_ratio"],
    )
    write_json_atomic(
        directory / "meta.json",
        {"versions": summary["versions"], "config": config_dict},
    )
    return directory
