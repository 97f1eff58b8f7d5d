"""Stage 1: quality-diversity search that fills an archive of policies.

QDax's MAP-Elites (isoline variation, or PGA-ME) runs on a Brax feet-contact
task. The iterations run as jitted ``lax.scan`` chunks of ``log_period``
steps with the state donated; between chunks the host logs, draws the
progress bar and writes an orbax checkpoint. Iteration ``i`` uses
``fold_in(key, i)``, so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from lpd import archive_io, checkpoints, devices, evaluation, plots, qd, rollouts
from lpd import policy as policy_lib
from lpd.config import config_to_dict
from lpd.devices import batch_sharding
from lpd.errors import LpdError
from lpd.logs import MetricsWriter
from lpd.workdir import (
    StageClock,
    archive_dir,
    atomic_path,
    stage_complete,
    write_json,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """Everything static about a QD search; hashable so compiled code is reused."""

    env_name: str
    backend: str
    episode_length: int
    hidden_sizes: tuple[int, ...]
    normalise_obs: bool
    emitter: str
    batch_size: int
    num_ancestors: int
    scoring_episodes: int
    iso_sigma: float
    line_sigma: float
    pga: tuple[tuple[str, object], ...]
    dcrl: tuple[tuple[str, object], ...]
    log_period: int
    seed: int


def _search_steps(c) -> int:
    """The search's episode length: ``archive.search_episode_length`` if set,
    else ``archive.episode_length`` (``c`` is ``config.archive``)."""
    return c.search_episode_length or c.episode_length


def spec_from_config(config: ml_collections.ConfigDict) -> SearchSpec:
    """Reads the archive part of an experiment config into a ``SearchSpec``."""
    c = config.archive

    def settings(group):
        return tuple(
            (k, tuple(v) if isinstance(v, (list, tuple)) else v)
            for k, v in sorted(group.items())
        )

    return SearchSpec(
        env_name=c.env,
        backend=c.backend,
        episode_length=_search_steps(c),
        hidden_sizes=tuple(c.policy_hidden_sizes),
        normalise_obs=c.normalise_obs,
        emitter=c.emitter,
        batch_size=c.batch_size,
        num_ancestors=c.num_ancestors,
        scoring_episodes=c.scoring_episodes,
        iso_sigma=c.iso_sigma,
        line_sigma=c.line_sigma,
        pga=settings(c.pga),
        dcrl=settings(c.dcrl),
        log_period=c.log_period,
        seed=config.seed,
    )


class SearchFns(NamedTuple):
    """The task, the policy and the two compiled functions of a search."""

    env: object
    policy: policy_lib.Policy
    scoring_fn: Callable
    init_fn: (
        Callable  # (genotypes, centroids, key) -> (repertoire, emitter_state, metrics)
    )
    chunk_fn: Callable  # (repertoire, emitter_state, start, key) -> (..., metrics [P])


@functools.lru_cache(maxsize=4)
def make_search_fns(spec: SearchSpec) -> SearchFns:
    """Builds (once per spec and process) the task and the jitted search steps."""
    env = qd.make_env(spec.env_name, spec.episode_length, spec.backend)
    policy = policy_lib.Policy(spec.hidden_sizes, env.action_size, spec.normalise_obs)
    key_reset = jax.random.fold_in(jax.random.key(spec.seed), 0)
    sharding = batch_sharding(spec.batch_size)
    scoring_fn = qd.make_scoring_fn(
        env,
        policy,
        spec.episode_length,
        key_reset,
        sharding,
        spec.scoring_episodes,
        dcrl_transitions=spec.emitter == "dcrl_me",
    )
    emitter = qd.make_emitter(
        spec.emitter,
        spec.batch_size,
        {"iso_sigma": spec.iso_sigma, "line_sigma": spec.line_sigma},
        dict(spec.dcrl if spec.emitter == "dcrl_me" else spec.pga),
        policy,
        env,
    )
    offset = qd.fitness_offset(spec.env_name, spec.episode_length)
    map_elites = qd.make_map_elites(scoring_fn, emitter, offset)

    def init_fn(genotypes, centroids, key):
        key_stats, key_init = jax.random.split(key)
        if spec.normalise_obs:
            _, _, extra = scoring_fn(genotypes, key_stats)
            mean, log_std = rollouts.observation_stats(extra["transitions"])
            inner = dict(genotypes["params"])
            inner["obs_mean"] = jnp.broadcast_to(mean, inner["obs_mean"].shape)
            inner["obs_log_std"] = jnp.broadcast_to(log_std, inner["obs_log_std"].shape)
            genotypes = {**genotypes, "params": inner}
        return map_elites.init(genotypes, centroids, key_init)

    def chunk_fn(repertoire, emitter_state, start, key):
        def step(carry, iteration):
            repertoire, emitter_state = carry
            key_iteration = jax.random.fold_in(key, iteration)
            repertoire, emitter_state, metrics = map_elites.update(
                repertoire, emitter_state, key_iteration
            )
            return (repertoire, emitter_state), metrics

        iterations = start + jnp.arange(spec.log_period)
        (repertoire, emitter_state), metrics = jax.lax.scan(
            step, (repertoire, emitter_state), iterations
        )
        return repertoire, emitter_state, metrics

    return SearchFns(
        env=env,
        policy=policy,
        scoring_fn=scoring_fn,
        init_fn=jax.jit(init_fn),
        chunk_fn=jax.jit(chunk_fn, donate_argnums=(0, 1)),
    )


def make_task(meta: dict) -> tuple[object, policy_lib.Policy]:
    """The env and policy module an archive's metadata describes."""
    env = qd.make_env(meta["env"], int(meta["episode_length"]), meta["backend"])
    hidden = tuple(int(h) for h in meta["policy"]["hidden_sizes"])
    normalise = bool(meta["policy"].get("normalise_obs", False))
    return env, policy_lib.Policy(hidden, env.action_size, normalise)


def describe_config(c: ml_collections.ConfigDict) -> dict:
    """The metadata ``config.archive`` implies (see :func:`describe_env`)."""
    return describe_env(
        {
            "env": c.env,
            "backend": c.backend,
            "episode_length": c.episode_length,
            "policy": {
                "hidden_sizes": list(c.policy_hidden_sizes),
                "normalise_obs": c.normalise_obs,
            },
        }
    )


def describe_env(meta: dict) -> dict:
    """Adds to ``meta`` what the env and policy settings determine."""
    env, policy = make_task(meta)
    hidden, normalise = policy.hidden_sizes, policy.normalise_obs
    layout = policy_lib.policy_layout(policy, env.observation_size)
    names = qd.descriptor_names(env)
    return {
        **meta,
        "episode_length": int(meta["episode_length"]),
        "descriptor_names": names,
        "descriptor_low": [0.0] * len(names),
        "descriptor_high": [1.0] * len(names),
        "fitness_offset": qd.fitness_offset(meta["env"], int(meta["episode_length"])),
        "policy": {
            "hidden_sizes": list(hidden),
            "normalise_obs": normalise,
            "obs_size": int(env.observation_size),
            "action_size": int(env.action_size),
            "params_per_policy": policy_lib.count_params(
                policy_lib.layout_template(layout)
            ),
        },
        "layout": {path: list(shape) for path, shape in layout.items()},
    }


def disk_bytes(config: ml_collections.ConfigDict) -> int:
    """About the disk the archive stage fills: the repertoire and the two
    checkpoints it keeps, each every cell's float32 genotype (measured: 229 MB
    for 1,600 cells of 19,590 parameters, against 376 MB by this count)."""
    c = config.archive
    cells = np.prod(c.grid_shape) if c.tessellation == "grid" else c.num_cvt_cells
    env = qd.make_env(c.env, c.episode_length, c.backend)
    hidden = tuple(c.policy_hidden_sizes)
    policy = policy_lib.Policy(hidden, env.action_size, c.normalise_obs)
    layout = policy_lib.policy_layout(policy, env.observation_size)
    params = sum(int(np.prod(shape)) for shape in layout.values())
    return 3 * int(cells) * params * 4


def validate(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a ``config.archive`` that cannot run (checked before
    anything is written)."""
    c = config.archive
    for field, value, choices in (
        ("env", c.env, sorted(qd.ENVS)),
        ("backend", c.backend, list(qd.BACKENDS)),
        ("emitter", c.emitter, list(qd.EMITTERS)),
        ("tessellation", c.tessellation, ["grid", "cvt"]),
    ):
        if value not in choices:
            raise LpdError(f"unknown {field} {value!r}; choose one of {choices}")
    if c.num_iterations <= 0 or c.log_period <= 0:
        raise LpdError("archive.num_iterations and archive.log_period must be > 0")
    if c.num_iterations % c.log_period:
        raise LpdError(
            f"archive.num_iterations ({c.num_iterations}) must be a multiple of "
            f"archive.log_period ({c.log_period})"
        )
    if c.batch_size <= 0 or c.episode_length <= 0:
        raise LpdError("archive.batch_size and archive.episode_length must be > 0")
    if c.search_episode_length is not None and c.search_episode_length <= 0:
        raise LpdError(
            f"archive.search_episode_length must be > 0 (or unset), got "
            f"{c.search_episode_length}"
        )
    if not c.policy_hidden_sizes or any(h <= 0 for h in c.policy_hidden_sizes):
        raise LpdError(
            "archive.policy_hidden_sizes must list positive layer widths, got "
            f"{tuple(c.policy_hidden_sizes)}"
        )
    if not 0 <= c.num_ancestors <= c.batch_size:
        raise LpdError(
            f"archive.num_ancestors must lie in [0, batch_size={c.batch_size}], got "
            f"{c.num_ancestors}"
        )
    if c.scoring_episodes < 1 or c.reeval_episodes < 0:
        raise LpdError(
            "archive.scoring_episodes must be >= 1 and archive.reeval_episodes "
            f">= 0, got {c.scoring_episodes} and {c.reeval_episodes}"
        )
    if c.scoring_episodes > 1 and c.emitter != "map_elites":
        raise LpdError(
            f"archive.scoring_episodes > 1 works with emitter 'map_elites' only, "
            f"not {c.emitter!r}; set archive.scoring_episodes=1"
        )
    if c.emitter == "dcrl_me":
        _validate_dcrl(c)
    if c.emitter in ("pga_me", "dcrl_me"):
        # QDax inserts every offspring's whole episode at once.
        group = "dcrl" if c.emitter == "dcrl_me" else "pga"
        size = c[group].replay_buffer_size
        needed = c.batch_size * _search_steps(c)
        if size < needed:
            raise LpdError(
                f"archive.{group}.replay_buffer_size ({size}) must hold one "
                f"iteration's transitions, batch_size x the search's episode "
                f"length = {needed}; raise it to at least that"
            )
    if c.iso_sigma < 0 or c.line_sigma < 0:
        raise LpdError("archive.iso_sigma and archive.line_sigma must be >= 0")
    if c.tessellation == "grid" and any(n <= 0 for n in c.grid_shape):
        raise LpdError(
            f"archive.grid_shape must be positive cell counts, got "
            f"{tuple(c.grid_shape)}"
        )
    if c.tessellation == "cvt" and c.num_cvt_cells <= 0:
        raise LpdError(f"archive.num_cvt_cells must be > 0, got {c.num_cvt_cells}")


def _validate_dcrl(c: ml_collections.ConfigDict) -> None:
    """One-line errors for DCRL-ME settings that cannot run."""
    if c.normalise_obs:
        raise LpdError(
            "archive.emitter 'dcrl_me' builds policies from its actor, which has "
            "no observation normaliser; set archive.normalise_obs=false"
        )
    injected = c.dcrl.dcrl_batch_size + c.dcrl.ai_batch_size
    if min(c.dcrl.dcrl_batch_size, c.dcrl.ai_batch_size) < 1 or injected >= (
        c.batch_size
    ):
        raise LpdError(
            "archive.dcrl.dcrl_batch_size and archive.dcrl.ai_batch_size must be "
            f">= 1 and sum below archive.batch_size ({c.batch_size}: the rest "
            f"are GA offspring), got {c.dcrl.dcrl_batch_size} and "
            f"{c.dcrl.ai_batch_size}"
        )


def _imported(directory: Path) -> bool:
    """Whether ``directory`` holds a complete archive this stage did not make
    (``lpd import-archive`` writes no ``config.json``)."""
    return (directory / "meta.json").exists() and not (
        directory / "config.json"
    ).exists()


def run_archive_stage(config: ml_collections.ConfigDict, workdir) -> Path:
    """Runs (or resumes, or skips when complete) the archive stage.

    An imported archive is used as it is, whatever ``config.archive`` says.

    Returns:
        ``<workdir>/archive``.
    """
    directory = archive_dir(workdir)
    if _imported(directory):
        source = archive_io.load_meta(workdir).get("source", "imported")
        log.info(
            "archive: using %s (%s); config.archive is not used", directory, source
        )
        return directory
    config_dict = config_to_dict(config)
    if stage_complete(directory, config_dict, "archive"):
        log.info("archive: complete in %s, skipping", directory)
        return directory
    clock = StageClock(directory)
    validate(config)
    c = config.archive
    spec = spec_from_config(config)
    fns = make_search_fns(spec)  # Checks env, backend, emitter names.
    meta = describe_config(c)
    if c.search_episode_length:
        meta["search_episode_length"] = int(c.search_episode_length)
    key = jax.random.key(config.seed)
    key_cells, key_policies, key_init, key_search = jax.random.split(key, 4)
    num_dims = len(meta["descriptor_names"])
    centroids = qd.make_centroids(
        c.tessellation, tuple(c.grid_shape), c.num_cvt_cells, num_dims, key_cells
    )
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config_dict)

    repertoire, emitter_state, start = _start_or_resume(
        fns, spec, meta, centroids, (key_policies, key_init), directory
    )
    repertoire, emitter_state = _search(
        fns, (repertoire, emitter_state), start, c, key_search, directory
    )

    archive = archive_io.Archive(
        params=repertoire.genotypes,
        fitnesses=repertoire.fitnesses.reshape(-1),
        descriptors=repertoire.descriptors,
        centroids=repertoire.centroids,
    )
    if c.reeval_episodes:
        meta["reevaluation"] = reevaluate(archive, meta, c, key)
    meta.update(
        format=archive_io.FORMAT,
        source="lpd archive",
        num_cells=int(centroids.shape[0]),
        num_elites=int(jnp.sum(archive.filled)),
        grid_shape=list(c.grid_shape) if c.tessellation == "grid" else None,
        iterations=c.num_iterations,
        wall_time_s=clock.total(),
        versions=archive_io.package_versions(),
        config=config_dict,
    )
    actor = None
    if c.emitter == "dcrl_me":  # QDax's state: (DCRL emitter's, GA's).
        actor = emitter_state.emitter_states[0].actor_params
        meta["actor"] = archive_io.actor_meta(actor)
    archive_io.save_archive(
        directory, archive, meta, plots.plot_archive_heatmap, actor=actor
    )
    return directory


def reevaluate(archive, meta: dict, c, key) -> dict:
    """How the stored elites fare re-run from ``c.reeval_episodes`` random
    starts each (the evaluation's protocol): the cells their mean foot
    contact fills (QDax insertion by mean return) against the cells stored,
    that archive's QD score, the share of elites that stayed up in every
    episode and their mean return."""
    idx, flat = archive_io.elites(archive)
    env, policy = make_task(meta)  # The protocol's length, not the search's.
    task = (env, policy, int(meta["episode_length"]))
    returns, descriptors, lasted = evaluation.reevaluate(
        task,
        flat,
        c.reeval_episodes,
        c.batch_size,
        jax.random.fold_in(key, 1),
        "archive: re-evaluation",
    )
    filled = evaluation.archive_summary(
        returns, descriptors, archive.centroids, meta["fitness_offset"]
    )
    result = {
        "episodes": c.reeval_episodes,
        "stored_cells": len(idx),
        "filled_cells": filled["filled_cells"],
        "qd_score": filled["qd_score"],
        "stayed_up_fraction": float(np.mean(lasted == 1)),
        "mean_return": filled["mean_return"],
    }
    log.info(
        "archive: re-run from %d random starts each, the elites of %d cells "
        "fill %d; %.2f of them stayed up in every episode",
        result["episodes"],
        result["stored_cells"],
        result["filled_cells"],
        result["stayed_up_fraction"],
    )
    return result


# What an import interrupted before imports were atomic could leave behind.
_IMPORT_LEFTOVERS = {"repertoire", "heatmap.png", "meta.json.tmp"}


def import_archive(npz, workdir) -> dict:
    """``lpd import-archive``: validates ``npz`` and writes ``<workdir>/archive``
    whole or not at all (built beside it, then renamed). Returns its meta."""
    target = archive_dir(workdir)
    if target.exists():
        names = {p.name for p in target.iterdir()}
        if "meta.json" in names:
            raise LpdError(
                f"{target} already holds an archive; import into another --workdir"
            )
        if not names <= _IMPORT_LEFTOVERS:
            raise LpdError(
                f"{target} holds an unfinished archive search; finish it with "
                "`lpd archive` or import into another --workdir"
            )
    archive, meta, actor = archive_io.read_npz(npz, describe_env)
    if target.exists():  # An interrupted import's leftovers: replaced.
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        archive_io.save_archive(
            tmp, archive, meta, plots.plot_archive_heatmap, actor=actor
        )
    return meta


def initial_population(policy, obs_size: int, spec: SearchSpec, key) -> dict:
    """``spec.batch_size`` initial policies: independently initialised, or
    with ``spec.num_ancestors`` > 0 that many, each repeated (variation then
    grows the archive from them)."""
    if not spec.num_ancestors:
        return policy_lib.init_policies(policy, obs_size, spec.batch_size, key)
    ancestors = policy_lib.init_policies(policy, obs_size, spec.num_ancestors, key)
    pick = jnp.arange(spec.batch_size) % spec.num_ancestors
    return jax.tree.map(lambda x: x[pick], ancestors)


def _start_or_resume(fns, spec, meta, centroids, keys, directory):
    """Initial state (checkpointed as step 0), or the last checkpoint's."""
    key_policies, key_init = keys
    genotypes = initial_population(
        fns.policy, meta["policy"]["obs_size"], spec, key_policies
    )
    with checkpoints.checkpoint_manager(directory) as manager:
        step = manager.latest_step()
        if step is None:
            repertoire, emitter_state, metrics = fns.init_fn(
                genotypes, centroids, key_init
            )
            state = {"repertoire": repertoire, "emitter_state": emitter_state}
            checkpoints.save(manager, 0, state)
            writer = MetricsWriter(directory)
            writer.write(0, devices.to_host(metrics))
            writer.close()
            return repertoire, emitter_state, 0
        template = jax.eval_shape(fns.init_fn, genotypes, centroids, key_init)[:2]
        template = {"repertoire": template[0], "emitter_state": template[1]}
        state = checkpoints.restore(manager, step, template, directory)
    log.info("archive: resuming from iteration %d", step)
    return state["repertoire"], state["emitter_state"], step


def _search(fns, state, start, c, key, directory):
    """Runs chunks from iteration ``start`` to the end; returns the
    repertoire and the emitter state."""
    repertoire, emitter_state = state
    writer = MetricsWriter(directory, resume_step=start)
    clock = StageClock(directory)
    bar = tqdm(
        total=c.num_iterations,
        initial=start,
        desc="archive",
        unit="it",
        disable=not devices.is_main(),
    )
    try:
        with checkpoints.checkpoint_manager(directory) as manager:
            for chunk_start in range(start, c.num_iterations, c.log_period):
                repertoire, emitter_state, metrics = fns.chunk_fn(
                    repertoire, emitter_state, jnp.int32(chunk_start), key
                )
                end = chunk_start + c.log_period
                state = {"repertoire": repertoire, "emitter_state": emitter_state}
                checkpoints.save(manager, end, state)
                clock.save()
                metrics = devices.to_host(metrics)
                if not np.isfinite(metrics["qd_score"]).all():
                    raise LpdError(
                        f"archive: QD score is not finite at iteration {end}"
                    )
                for i in range(c.log_period):
                    writer.write(
                        chunk_start + i + 1, {k: v[i] for k, v in metrics.items()}
                    )
                last = {k: float(v[-1]) for k, v in metrics.items()}
                bar.set_postfix(
                    coverage=f"{last['coverage']:.1f}%",
                    qd_score=f"{last['qd_score']:.3g}",
                    max_fitness=f"{last['max_fitness']:.1f}",
                )
                bar.update(c.log_period)
    finally:
        bar.close()
        writer.close()
    return repertoire, emitter_state
