"""Stage 3: train the descriptor-conditioned latent denoiser (``lpd train-diffusion``).

Reads ``<workdir>/codec``; writes ``<workdir>/diffusion/``:

- ``model/``: orbax checkpoint of the EMA denoiser parameters;
- ``guidance_sweep.json``: return and measure error of generated policies per
  guidance scale on a fixed set of the archive's descriptors, and the scale
  picked (lowest measure error), which ``lpd sample`` uses by default;
- ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``config.json``;
- ``meta.json``, written last.

Sampling from the trained model lives in :mod:`lpd.generator`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpd import archive as archive_lib
from lpd import (
    archive_io,
    checkpoints,
    codec_stage,
    diffusion_train,
    evaluation,
    generator,
    rollouts,
)
from lpd import policy as policy_lib
from lpd.config import config_to_dict
from lpd.errors import LpdError
from lpd.workdir import (
    StageClock,
    codec_dir,
    diffusion_dir,
    stage_complete,
    write_json,
)

log = logging.getLogger(__name__)

STAGE_KEY = 2


def validate(config: ml_collections.ConfigDict, latent_dim: int) -> None:
    """One-line errors for a ``config.diffusion`` this stage cannot run."""
    c = config.diffusion
    diffusion_train.validate(c, latent_dim)
    if not c.sweep_guidance or any(g < 0 for g in c.sweep_guidance):
        raise LpdError("diffusion.sweep_guidance must list scales >= 0")
    if c.return_neighbours < 0:
        raise LpdError("diffusion.return_neighbours must be >= 0")
    if c.return_source not in RETURN_SOURCES:
        raise LpdError(
            f"diffusion.return_source must be one of {RETURN_SOURCES}, "
            f"got {c.return_source!r}"
        )
    for name in ("sweep_conditions", "sweep_episodes", "sweep_batch_size"):
        if c[name] <= 0:
            raise LpdError(f"diffusion.{name} must be > 0, got {c[name]}")


def return_quantiles(descriptors, returns, num_neighbours: int) -> np.ndarray:
    """``[N]`` each elite's return rank among its ``num_neighbours`` nearest
    elites in descriptor space (itself included), scaled to ``[0, 1]``: 1 is
    the best return known near that gait, 0 the worst."""
    descriptors = np.asarray(descriptors, np.float32)
    k = min(num_neighbours, len(descriptors))
    if k < 2:
        return np.ones(len(descriptors), np.float32)
    _, near = evaluation.nearest(descriptors, descriptors, k=k)
    neighbour_returns = np.asarray(returns)[np.asarray(near)]  # [N, k]
    below = (neighbour_returns < np.asarray(returns)[:, None]).sum(axis=1)
    return (below / (k - 1)).astype(np.float32)


RETURN_SOURCES = ("stored", "reevaluated")


def ranked_returns(latents: dict, source: str, workdir) -> np.ndarray:
    """``[N]`` the elites' returns the return condition ranks: the archive's
    stored ones (``source="stored"``), or their means over the codec
    check's random-start episodes, the evaluation's protocol
    (``"reevaluated"``)."""
    if source == "stored":
        return latents["fitnesses"]
    if "returns" not in latents:
        raise LpdError(
            f"{codec_dir(workdir)}/latents.npz predates the elites' re-evaluated "
            f"returns; delete {codec_dir(workdir)} and run `lpd train-codec` again"
        )
    return latents["returns"]


def training_conditions(descriptors, returns, num_neighbours: int):
    """The denoiser's conditions ``[N, C]`` and their groups: the descriptor,
    and with ``num_neighbours > 0`` its return quantile
    (:func:`return_quantiles`) as a second group, dropped independently."""
    descriptors = np.asarray(descriptors, np.float32)
    if not num_neighbours:
        return descriptors, ()
    quantiles = return_quantiles(descriptors, returns, num_neighbours)
    groups = (descriptors.shape[1], 1)
    return np.concatenate([descriptors, quantiles[:, None]], axis=1), groups


def run_diffusion_stage(
    config: ml_collections.ConfigDict, workdir, draw: int = 0
) -> Path:
    """Trains (or resumes, or skips when complete) the denoiser; returns its dir.

    ``draw > 0`` trains another draw of the same config (other keys, folded
    from the stage's; :mod:`lpd.draws`); 0 is the pipeline's own denoiser.
    """
    directory = diffusion_dir(workdir)
    config_dict = config_to_dict(config)
    if stage_complete(directory, config_dict, "diffusion"):
        made = json.loads((directory / "meta.json").read_text()).get("draw", 0)
        if made != draw:
            raise LpdError(
                f"{directory} holds denoiser draw {made}, not {draw}; "
                "use another --workdir"
            )
        log.info("diffusion: complete in %s, skipping", directory)
        return directory
    clock = StageClock(directory)
    c = config.diffusion
    data = codec_stage.load_latents(workdir)
    latents = jnp.asarray(data["latents"])
    validate(config, latents.shape[1])
    returns = ranked_returns(data, c.return_source, workdir)
    conditions, groups = training_conditions(
        data["descriptors"], returns, c.return_neighbours
    )
    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    if draw:
        key = jax.random.fold_in(key, draw)
    key_init, key_train, key_sweep = jax.random.split(key, 3)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config_dict)

    ema = diffusion_train.train_denoiser(
        diffusion_train.make_denoiser(c, latents.shape[1], groups, c.cond_frequencies),
        c,
        (latents, jnp.asarray(conditions)),
        (key_init, key_train),
        directory,
        (c.num_steps, c.log_period, "diffusion"),
    )
    checkpoints.save_tree(directory / "model", {"ema": ema})
    sweep = guidance_sweep(config, workdir, key_sweep)
    write_json(directory / "guidance_sweep.json", sweep)
    log.info("diffusion: guidance %s picked (lowest measure error)", sweep["picked"])
    meta = {
        "denoiser_params": policy_lib.count_params(ema),
        "latent_dim": int(latents.shape[1]),
        "guidance": sweep["picked"],
        "draw": draw,
        "wall_time_s": clock.total(),
        "versions": archive_io.package_versions(),
        "config": config_dict,
    }
    write_json(directory / "meta.json", meta)
    return directory


def guidance_sweep(config, workdir, key) -> dict:
    """Rolls out generated policies per guidance scale on fixed conditions.

    The conditions are ``sweep_conditions`` elites' descriptors, evenly
    spread over the archive; each generated policy runs ``sweep_episodes``
    episodes from random resets. Picks the scale of lowest measure error
    (distance between asked and achieved descriptor).
    """
    c = config.diffusion
    gen = generator.load_generator(workdir)
    data = codec_stage.load_latents(workdir)
    descriptors, fitnesses = data["descriptors"], data["fitnesses"]
    pick = np.linspace(0, len(descriptors) - 1, c.sweep_conditions).round().astype(int)
    cond = jnp.asarray(descriptors[pick])
    env, policy = archive_lib.make_task(gen.archive_meta)
    eval_fn = jax.jit(
        rollouts.make_episodes_eval_fn(
            env,
            policy,
            gen.archive_meta["episode_length"],
            c.sweep_episodes,
            c.sweep_batch_size,
        )
    )
    key_sample, key_eval = jax.random.split(key)
    sample_fn = generator.make_sample_fn(gen)
    rows = []
    for guidance in c.sweep_guidance:
        flat = evaluation.map_in_batches(
            functools.partial(sample_fn, guidance=jnp.float32(guidance)),
            cond,
            c.sweep_batch_size,
            key_sample,
        )
        returns, achieved = evaluation.map_in_batches(
            eval_fn,
            policy_lib.unflatten_params(flat),
            c.sweep_batch_size,
            key_eval,
            f"diffusion: guidance {guidance:g}",
        )
        rows.append(
            {
                "guidance": float(guidance),
                "mean_return": float(np.mean(returns)),
                "archive_mean_return": float(np.mean(fitnesses[pick])),
                "measure_error": float(
                    np.mean(np.linalg.norm(achieved - np.asarray(cond), axis=-1))
                ),
            }
        )
    best = min(rows, key=lambda r: r["measure_error"])
    return {
        "conditions": int(len(pick)),
        "episodes": c.sweep_episodes,
        "sample_steps": c.sample_steps,
        "rows": rows,
        "picked": best["guidance"],
    }
