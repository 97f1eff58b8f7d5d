"""Stage 2: train the weight codec on the archive's elites (``lpd train-codec``).

Reads ``<workdir>/archive``; writes ``<workdir>/codec/``:

- ``model/``: orbax checkpoint of ``{"params": codec params, "stats": Standardiser}``;
- ``latents.npz``: ``latents [N, L]`` (encoder means times ``scale``, so unit
  variance), ``scale`` (scalar), ``cells [N]`` (archive cell of each elite),
  ``descriptors [N, D]``, ``fitnesses [N]`` (the archive's stored returns),
  ``returns [N]`` (each elite's mean return over the reconstruction check's
  random-start episodes: the evaluation's protocol, which the diffusion
  stage ranks for its return condition);
- ``reconstruction.json``: decoded elites rolled out beside the originals;
- ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``config.json``;
- ``meta.json``, written last: its presence marks the stage complete.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpd import archive as archive_lib
from lpd import archive_io, checkpoints, codec_train, evaluation, qd, rollouts, training
from lpd import codec as codec_lib
from lpd import policy as policy_lib
from lpd.config import config_to_dict
from lpd.devices import batch_sharding
from lpd.errors import LpdError
from lpd.workdir import StageClock, atomic_path, codec_dir, stage_complete, write_json

log = logging.getLogger(__name__)

STAGE_KEY = 1  # fold_in(seed key, STAGE_KEY): this stage's keys differ from others'.


def make_model(c: ml_collections.ConfigDict, layout) -> codec_lib.Codec:
    """The codec module a config's ``codec`` section describes."""
    return codec_lib.Codec(
        layout=codec_lib.as_layout(layout),
        latent_dim=c.latent_dim,
        encoder_features=c.encoder_features,
        encoder_hidden=c.encoder_hidden,
        decoder_hidden=c.decoder_hidden,
        row_features=c.row_features,
        basis_dim=c.basis_dim,
    )


def validate(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a ``config.codec`` that cannot run."""
    c = config.codec
    training.check_schedule(c, "codec")
    positive = (
        "latent_dim",
        "encoder_features",
        "encoder_hidden",
        "decoder_hidden",
        "row_features",
        "batch_size",
        "obs_per_policy",
        "eval_episodes",
        "eval_batch_size",
    )
    for name in positive:
        if c[name] <= 0:
            raise LpdError(f"codec.{name} must be > 0, got {c[name]}")
    for name in (
        "basis_dim",
        "kl_weight",
        "input_noise",
        "latent_noise",
        "obs_episodes",
        "visit_period",
    ):
        if c[name] < 0:
            raise LpdError(f"codec.{name} must be >= 0, got {c[name]}")
    if c.visit_period % c.log_period:
        raise LpdError(
            f"codec.visit_period ({c.visit_period}) must be a multiple of "
            f"codec.log_period ({c.log_period})"
        )
    if c.visit_period and c.functional_weight <= 0:
        raise LpdError("codec.visit_period needs codec.functional_weight > 0")
    if c.functional_weight < 0:
        raise LpdError(
            f"codec.functional_weight must be >= 0, got {c.functional_weight}"
        )


def run_codec_stage(config: ml_collections.ConfigDict, workdir) -> Path:
    """Trains (or resumes, or skips when complete) the codec; returns its dir."""
    directory = codec_dir(workdir)
    config_dict = config_to_dict(config)
    if stage_complete(directory, config_dict, "codec"):
        log.info("codec: complete in %s, skipping", directory)
        return directory
    clock = StageClock(directory)
    validate(config)
    c = config.codec
    archive, archive_meta = archive_io.load_archive(workdir)
    idx, flat = archive_io.elites(archive)
    if len(idx) < 2:
        raise LpdError(f"the archive holds {len(idx)} elites; the codec needs >= 2")
    env, policy = archive_lib.make_task(archive_meta)
    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    key_obs, key_init, key_train, key_eval = jax.random.split(key, 4)

    stats = codec_lib.fit_standardiser(flat)
    obs, actions = _behaviour_data(c, archive_meta, env, policy, flat, key_obs)
    data = codec_train.CodecData(codec_lib.standardise(stats, flat), obs, actions)
    model = make_model(c, archive_meta["layout"])
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config_dict)

    refresh = None
    if c.visit_period:
        key_visit = jax.random.fold_in(key_obs, 1)
        visit = _make_visit(c, (model, policy, stats), env, archive_meta)
        originals = policy_lib.unflatten_params(flat)
        refresh = lambda params, start: evaluation.map_in_batches(
            lambda b, k: visit(b, k, params),
            {"inputs": data.inputs, "original": originals},
            c.eval_batch_size,
            jax.random.fold_in(key_visit, start),
        )
    params = _train(
        c, (model, policy, stats), data, (key_init, key_train), directory, refresh
    )
    checkpoints.save_tree(directory / "model", {"params": params, "stats": stats})
    report, returns = reconstruction_report(
        c, model, params, stats, flat, archive_meta, archive, key_eval
    )
    scale = _write_latents(model, params, data, (archive, idx, returns), directory)
    report["archive_elites"] = int(len(idx))
    write_json(directory / "reconstruction.json", report)
    log.info(
        "codec: %s, decoder %d params",
        evaluation.format_ratios(report),
        report["decoder_params"],
    )
    meta = {
        "latent_dim": c.latent_dim,
        "latent_scale": scale,
        "num_elites": int(len(idx)),
        "layout": archive_meta["layout"],
        "decoder_params": report["decoder_params"],
        "standardiser_params": report["standardiser_params"],
        "wall_time_s": clock.total(),
        "versions": archive_io.package_versions(),
        "config": config_dict,
    }
    write_json(directory / "meta.json", meta)
    return directory


def _behaviour_data(c, archive_meta, env, policy, flat, key):
    """Observations from each elite's own rollouts and its actions there.

    The rollouts are ``c.obs_episodes`` random-reset episodes per elite (the
    evaluation's kind), or with 0 the one episode from the archive's fixed
    start state. Without the functional loss term, placeholders of one zero
    observation.
    """
    num = next(iter(flat.values())).shape[0]
    if c.functional_weight <= 0:
        obs_size = archive_meta["policy"]["obs_size"]
        act_size = archive_meta["policy"]["action_size"]
        return jnp.zeros((num, 1, obs_size)), jnp.zeros((num, 1, act_size))
    key_reset, key_collect = jax.random.split(key)
    batch, length = c.eval_batch_size, archive_meta["episode_length"]
    sharding = batch_sharding(batch)
    if c.obs_episodes:
        scoring_fn = qd.episodes_scoring_fn(
            env, policy, length, c.obs_episodes, sharding
        )
    else:
        scoring_fn = qd.make_scoring_fn(env, policy, length, key_reset, sharding)

    @jax.jit
    def collect(params, key):
        obs = rollouts.collect_observations(scoring_fn, params, c.obs_per_policy, key)
        return obs, jax.vmap(policy.apply)(params, obs)

    params = policy_lib.unflatten_params(flat)
    obs, actions = evaluation.map_in_batches(
        collect, params, batch, key_collect, "codec: collect observations"
    )
    return jnp.asarray(obs), jnp.asarray(actions)


def _make_visit(c, task, env, archive_meta):
    """Jitted ``(batch {"inputs" [B, ...], "original" params [B]}, key, codec
    params) -> (obs [B, K, O], actions [B, K, A])``: states the *decoded*
    policies visit in a random-reset episode each, labelled with the original
    elites' actions there (DAgger's data)."""
    model, policy, stats = task
    length = archive_meta["episode_length"]
    score = qd.episodes_scoring_fn(
        env, policy, length, 1, batch_sharding(c.eval_batch_size)
    )

    def visit(batch, key, params):
        decoded = jax.vmap(lambda x: model.apply(params, x))(batch["inputs"])
        decoded = policy_lib.unflatten_params(codec_lib.unstandardise(stats, decoded))
        obs = rollouts.collect_observations(score, decoded, c.obs_per_policy, key)
        return obs, jax.vmap(policy.apply)(batch["original"], obs)

    return jax.jit(visit)


def _train(c, task, data, keys, directory, refresh=None):
    """Runs (or resumes) training in jitted chunks; returns the final params.

    ``task`` is ``(model, policy, stats)``. With ``refresh(params, step) ->
    (obs, actions)``, every ``c.visit_period`` steps the action-matching term
    also covers the states the decoded policies visit (kept in the
    checkpointed state, so a resumed run repeats an uninterrupted one).
    """
    model, policy, stats = task
    key_init, key_train = keys
    optimizer = training.make_optimizer(
        c.learning_rate, c.warmup_steps, c.num_steps, c.weight_decay, c.grad_clip
    )
    weights = codec_train.LossWeights(
        c.kl_weight, c.input_noise, c.latent_noise, c.functional_weight
    )
    chunk_fn = codec_train.make_train_chunk(
        model, policy, optimizer, weights, c.log_period, c.batch_size
    )
    example = jax.tree.map(lambda x: x[0], data.inputs)

    def init_state():
        params = model.init(key_init, example)
        state = {"params": params, "opt_state": optimizer.init(params)}
        if refresh is not None:  # Until the first visit: the elites' own states.
            state["visited"] = (jnp.copy(data.obs), jnp.copy(data.actions))
        return state

    def run_chunk(state, start):
        train_data = data
        if refresh is not None:
            if start and start % c.visit_period == 0:
                visited = refresh(state["params"], int(start))
                state["visited"] = tuple(jnp.asarray(x) for x in visited)
            obs, actions = state["visited"]
            train_data = data.replace(
                obs=jnp.concatenate([data.obs, obs], axis=1),
                actions=jnp.concatenate([data.actions, actions], axis=1),
            )
        trained, metrics = chunk_fn(
            codec_train.TrainState(state["params"], state["opt_state"]),
            (train_data, stats),
            start,
            key_train,
        )
        return {**state, **trained._asdict()}, metrics

    state = training.run_chunks(
        directory,
        init_state,
        run_chunk,
        (c.num_steps, c.log_period),
        "codec",
        "codec",
    )
    return state["params"]


def encode_means(model, params, inputs) -> jax.Array:
    """Latent means ``[N, L]`` of standardised inputs ``[N, ...]``."""
    encode = jax.jit(jax.vmap(lambda x: model.apply(params, x, method="encode")[0]))
    return encode(inputs)


def _write_latents(model, params, data, elites, directory) -> float:
    """Writes ``latents.npz`` (unit-variance latents) for ``elites``
    ``(archive, indices [N], re-evaluated returns [N])``; returns the scale."""
    archive, idx, returns = elites
    means = np.asarray(encode_means(model, params, data.inputs))
    scale = float(1.0 / np.std(means))
    with atomic_path(directory / "latents.npz") as tmp, tmp.open("wb") as f:
        np.savez(
            f,
            latents=(means * scale).astype(np.float32),
            scale=np.float32(scale),
            cells=idx.astype(np.int32),
            descriptors=np.asarray(archive.descriptors)[idx],
            fitnesses=np.asarray(archive.fitnesses)[idx],
            returns=np.asarray(returns, np.float32),
        )
    return scale


def load_latents(workdir, cells=None) -> dict:
    """The arrays of a complete codec stage's ``latents.npz`` (numpy).

    With ``cells`` (the archive's elite cells ``[N]``), checks the latents
    were made from that archive.
    """
    directory = codec_dir(workdir)
    if not (directory / "meta.json").exists():
        raise LpdError(
            f"no complete codec in {directory}: run `lpd train-codec` with this "
            "--workdir first"
        )
    path = directory / "latents.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            latents = dict(data)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise LpdError(
            f"{path} is missing or corrupt ({type(e).__name__}); delete {directory} "
            "and run `lpd train-codec` again"
        ) from None
    if cells is not None and not np.array_equal(latents["cells"], cells):
        raise LpdError(f"{directory} was made from another archive; rerun the codec")
    return latents


def reconstruction_report(c, model, params, stats, flat, meta, archive, key) -> dict:
    """Decodes every elite and rolls both sets out with the same episodes.

    Returns the fidelity metrics (:func:`lpd.evaluation.fidelity`; the asked
    descriptors are the elites' stored ones), per-tensor relative error and
    parameter counts; and ``[N]`` the originals' mean returns there.
    """
    env, policy = archive_lib.make_task(meta)
    inputs = codec_lib.standardise(stats, flat)
    reconstruct = jax.jit(
        lambda x: codec_lib.unstandardise(
            stats, jax.vmap(lambda v: model.apply(params, v))(x)
        )
    )
    decoded = evaluation.map_in_batches(
        lambda x, _: reconstruct(x), inputs, c.eval_batch_size, key
    )
    relative = {
        p: float(np.linalg.norm(decoded[p] - flat[p]) / np.linalg.norm(flat[p]))
        for p in sorted(flat)
    }
    eval_fn = jax.jit(
        rollouts.make_episodes_eval_fn(
            env, policy, env.episode_length, c.eval_episodes, c.eval_batch_size
        )
    )
    original = evaluation.map_in_batches(
        eval_fn,
        policy_lib.unflatten_params(flat),
        c.eval_batch_size,
        key,
        "codec: evaluate originals",
    )
    generated = evaluation.map_in_batches(
        eval_fn,
        policy_lib.unflatten_params(decoded),
        c.eval_batch_size,
        key,
        "codec: evaluate decoded",
    )
    report = evaluation.fidelity(
        original,
        generated,
        np.asarray(archive.descriptors)[np.asarray(archive.filled)],
        np.asarray(archive.centroids),
        meta["fitness_offset"],
    )
    num = next(iter(flat.values())).shape[0]
    per_policy = policy_lib.count_params(flat) // num
    decoder_params = policy_lib.count_params(params["params"]["decoder"])
    report.update(
        eval_episodes=c.eval_episodes,
        relative_error=relative,
        decoder_params=decoder_params,
        standardiser_params=2 * per_policy,
        params_per_policy=per_policy,
        archive_params=per_policy * num,
        compression_ratio_decoder=per_policy * num / (decoder_params + 2 * per_policy),
    )
    return report, np.asarray(original[0])
