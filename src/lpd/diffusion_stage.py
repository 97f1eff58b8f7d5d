"""Stage 3: train the latent denoiser (``lpd train-diffusion``) and sample from it.

Reads ``<workdir>/codec``; writes ``<workdir>/diffusion/``:

- ``model/``: orbax checkpoint of the EMA denoiser parameters;
- ``guidance_sweep.json``: return and measure error of generated policies per
  guidance scale on a fixed set of the archive's descriptors, and the scale
  picked (lowest measure error), which ``lpd sample`` uses by default;
- ``metrics.jsonl``, ``tensorboard/``, ``checkpoints/``, ``config.json``;
- ``meta.json``, written last.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lpd import archive as archive_lib
from lpd import (
    archive_io,
    checkpoints,
    codec_stage,
    codec_train,
    evaluation,
    qd,
    training,
)
from lpd import codec as codec_lib
from lpd import diffusion as diffusion_lib
from lpd import policy as policy_lib
from lpd.config import config_to_dict, stage_complete
from lpd.errors import LpdError
from lpd.logs import write_json_atomic

log = logging.getLogger(__name__)

STAGE_KEY = 2
SAMPLERS = ("ddim", "ddpm")
PREDICTIONS = ("epsilon", "v")


def diffusion_dir(workdir) -> Path:
    return Path(workdir) / "diffusion"


def text_dir(workdir) -> Path:
    """The text-conditioned denoiser's stage (``lpd train-text``)."""
    return Path(workdir) / "text"


ARCHITECTURES = ("transformer", "unet")
TEXT_DIM = 384  # all-MiniLM-L6-v2's sentence embeddings (lpd.text).


def make_denoiser(c: ml_collections.ConfigDict, latent_dim: int):
    """The transformer (default) or 1-D U-Net denoiser of ``config.diffusion``."""
    if c.architecture == "unet":
        return diffusion_lib.UNet1D(
            latent_dim=latent_dim, channels=tuple(c.unet_channels), width=c.width
        )
    return diffusion_lib.Denoiser(
        latent_dim=latent_dim,
        num_tokens=c.num_tokens,
        width=c.width,
        depth=c.depth,
        num_heads=c.num_heads,
    )


def _validate(c: ml_collections.ConfigDict, latent_dim: int) -> None:
    if c.num_steps <= 0 or c.log_period <= 0 or c.num_steps % c.log_period:
        raise LpdError(
            f"diffusion.num_steps ({c.num_steps}) must be a positive multiple of "
            f"diffusion.log_period ({c.log_period})"
        )
    if c.architecture not in ARCHITECTURES:
        raise LpdError(f"diffusion.architecture must be one of {ARCHITECTURES}")
    if c.architecture == "unet" and latent_dim % 2 ** len(c.unet_channels):
        raise LpdError(
            f"the latent ({latent_dim}) must be divisible by 2 ** "
            f"len(diffusion.unet_channels) for the U-Net"
        )
    if c.prediction not in PREDICTIONS:
        raise LpdError(f"diffusion.prediction must be one of {PREDICTIONS}")
    if c.architecture == "transformer" and latent_dim % c.num_tokens:
        raise LpdError(
            f"the latent ({latent_dim}) must split into diffusion.num_tokens "
            f"({c.num_tokens}) equal tokens"
        )
    if not 0.0 <= c.cond_dropout < 1.0:
        raise LpdError("diffusion.cond_dropout must lie in [0, 1)")


def make_train_chunk(model, schedule, optimizer, c, num_steps):
    """Jitted ``(state, (latents [N, L], conditions [N, C]), start, key)``.

    ``c`` holds ``batch_size``, ``prediction``, ``cond_dropout`` and ``ema_decay``.
    """

    def train_step(state, data, step, key):
        latents, conditions = data
        key_batch, key_loss = jax.random.split(jax.random.fold_in(key, step))
        idx = jax.random.randint(key_batch, (c.batch_size,), 0, latents.shape[0])
        loss, grads = jax.value_and_grad(diffusion_lib.diffusion_loss)(
            state["params"],
            model,
            schedule,
            latents[idx],
            conditions[idx],
            key_loss,
            c.prediction,
            c.cond_dropout,
        )
        updates, opt_state = optimizer.update(
            grads, state["opt_state"], state["params"]
        )
        params = optax.apply_updates(state["params"], updates)
        ema = optax.incremental_update(params, state["ema"], 1.0 - c.ema_decay)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads)}
        return {"params": params, "ema": ema, "opt_state": opt_state}, metrics

    return training.scan_steps(train_step, num_steps)


def run_diffusion_stage(config: ml_collections.ConfigDict, workdir) -> Path:
    """Trains (or resumes, or skips when complete) the denoiser; returns its dir."""
    started = time.monotonic()
    directory = diffusion_dir(workdir)
    config_dict = config_to_dict(config)
    if stage_complete(directory, config_dict, "diffusion"):
        log.info("diffusion: complete in %s, skipping", directory)
        return directory
    c = config.diffusion
    data = codec_stage.load_latents(workdir)
    latents = jnp.asarray(data["latents"])
    descriptors = jnp.asarray(data["descriptors"])
    _validate(c, latents.shape[1])
    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    key_init, key_train, key_sweep = jax.random.split(key, 3)
    model = make_denoiser(c, latents.shape[1])
    schedule = diffusion_lib.cosine_schedule(c.num_timesteps)
    optimizer = codec_train.make_optimizer(
        c.learning_rate, c.warmup_steps, c.num_steps, c.weight_decay, c.grad_clip
    )
    chunk_fn = make_train_chunk(model, schedule, optimizer, c, c.log_period)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "config.json", config_dict)

    def init_state():
        params = model.init(key_init, latents[0], 0, descriptors[0], False)
        ema = jax.tree.map(jnp.copy, params)  # Its own buffers: the state is donated.
        return {"params": params, "ema": ema, "opt_state": optimizer.init(params)}

    state = training.run_chunks(
        directory,
        init_state,
        lambda s, start: chunk_fn(s, (latents, descriptors), start, key_train),
        c.num_steps,
        c.log_period,
        "diffusion",
    )
    checkpoints.save_tree(directory / "model", {"ema": state["ema"]})
    denoiser_params = int(sum(x.size for x in jax.tree.leaves(state["ema"])))
    meta = {"denoiser_params": denoiser_params, "latent_dim": int(latents.shape[1])}
    sweep = guidance_sweep(config, workdir, key_sweep)
    write_json_atomic(directory / "guidance_sweep.json", sweep)
    log.info("diffusion: guidance %s picked (lowest measure error)", sweep["picked"])
    meta.update(
        guidance=sweep["picked"],
        wall_time_s=round(time.monotonic() - started, 1),
        versions=archive_io.package_versions(),
        config=config_dict,
    )
    write_json_atomic(directory / "meta.json", meta)
    return directory


class Generator(NamedTuple):
    """Everything needed to turn descriptors into policy parameters."""

    config: ml_collections.ConfigDict
    archive_meta: dict
    denoiser: diffusion_lib.Denoiser
    denoiser_params: dict
    schedule: diffusion_lib.Schedule
    codec: codec_lib.Codec
    codec_params: dict
    stats: codec_lib.Standardiser
    latent_scale: float


def load_generator(workdir, text: bool = False) -> Generator:
    """Loads the codec and a denoiser of a workdir (trained stages).

    The descriptor-conditioned denoiser, or with ``text`` the one conditioned
    on sentence embeddings ``[384]`` (``<workdir>/text``).
    """
    directory = text_dir(workdir) if text else diffusion_dir(workdir)
    if not (directory / "model").exists():
        command = "train-text" if text else "train-diffusion"
        raise LpdError(f"no trained denoiser in {directory}: run `lpd {command}` first")
    config = ml_collections.ConfigDict(
        json.loads((directory / "config.json").read_text())
    )
    archive_meta = archive_io.load_meta(workdir)
    codec_meta = json.loads((codec_stage.codec_dir(workdir) / "meta.json").read_text())
    try:
        codec = codec_stage.make_model(config.codec, archive_meta["layout"])
        denoiser = make_denoiser(config.diffusion, codec_meta["latent_dim"])
    except (AttributeError, KeyError) as e:
        raise LpdError(
            f"{directory / 'config.json'} lacks a field this lpd needs ({e}); it was "
            "written by an older version: rerun the stages into a new --workdir"
        ) from e
    flat_template = {
        p: jax.ShapeDtypeStruct(tuple(s), jnp.float32)
        for p, s in archive_meta["layout"].items()
    }
    codec_template = jax.eval_shape(codec.init, jax.random.key(0), flat_template)
    stats_template = codec_lib.Standardiser(flat_template, flat_template)
    latent = jax.ShapeDtypeStruct((codec_meta["latent_dim"],), jnp.float32)
    cond_dim = TEXT_DIM if text else len(archive_meta["descriptor_names"])
    cond = jax.ShapeDtypeStruct((cond_dim,), jnp.float32)
    denoiser_template = jax.eval_shape(
        denoiser.init, jax.random.key(0), latent, 0, cond, False
    )
    codec_state = checkpoints.load_tree(
        codec_stage.codec_dir(workdir) / "model",
        {"params": codec_template, "stats": stats_template},
        "the codec model",
    )
    ema = checkpoints.load_tree(
        directory / "model", {"ema": denoiser_template}, "the denoiser model"
    )["ema"]
    return Generator(
        config=config,
        archive_meta=archive_meta,
        denoiser=denoiser,
        denoiser_params=ema,
        schedule=diffusion_lib.cosine_schedule(config.diffusion.num_timesteps),
        codec=codec,
        codec_params=codec_state["params"],
        stats=codec_state["stats"],
        latent_scale=float(codec_meta["latent_scale"]),
    )


def decode_latents(gen: Generator, z) -> dict:
    """Policy parameters ``{path: [B, ...]}`` of unit-variance latents ``[B, L]``."""
    decode = jax.vmap(lambda v: gen.codec.apply(gen.codec_params, v, method="decode"))
    return codec_lib.unstandardise(gen.stats, decode(z / gen.latent_scale))


def make_sample_fn(gen: Generator, steps=None, eta=None, sampler="ddim") -> callable:
    """Jitted ``(conditions [B, D], key, guidance) -> flat params {path: [B, ...]}``.

    ``steps`` and ``eta`` default to ``config.diffusion``'s. The guidance
    scale is an argument, so one compile serves every scale.
    """
    c = gen.config.diffusion
    steps = c.sample_steps if steps is None else steps
    eta = c.eta if eta is None else eta
    if sampler not in SAMPLERS:
        raise LpdError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if steps <= 0 or steps > gen.schedule.num_timesteps:
        raise LpdError(f"--steps must lie in [1, {gen.schedule.num_timesteps}]")
    prediction = c.prediction

    def sample(cond, key, guidance):
        key_noise, key_sample = jax.random.split(key)
        latent_dim = gen.codec.latent_dim
        x_T = jax.random.normal(key_noise, (cond.shape[0], latent_dim))
        eps_fn = diffusion_lib.guided_eps_fn(
            gen.denoiser_params, gen.denoiser, gen.schedule, cond, guidance, prediction
        )
        if sampler == "ddim":
            z = diffusion_lib.ddim_sample(
                eps_fn, gen.schedule, x_T, steps, eta, key_sample
            )
        else:
            z = diffusion_lib.ddpm_sample(eps_fn, gen.schedule, x_T, key_sample)
        return decode_latents(gen, z)

    return jax.jit(sample)


def guidance_sweep(config, workdir, key) -> dict:
    """Rolls out generated policies per guidance scale on fixed conditions.

    The conditions are ``sweep_conditions`` elites' descriptors, evenly
    spread over the archive; each generated policy runs ``sweep_episodes``
    episodes from random resets. Picks the scale of lowest measure error
    (distance between asked and achieved descriptor).
    """
    c = config.diffusion
    gen = load_generator(workdir)
    data = codec_stage.load_latents(workdir)
    descriptors, fitnesses = data["descriptors"], data["fitnesses"]
    pick = np.linspace(0, len(descriptors) - 1, c.sweep_conditions).round().astype(int)
    cond = jnp.asarray(descriptors[pick])
    env, policy = archive_lib.make_task(gen.archive_meta)
    eval_fn = jax.jit(
        qd.make_episodes_eval_fn(
            env,
            policy,
            gen.archive_meta["episode_length"],
            c.sweep_episodes,
            c.sweep_batch_size,
        )
    )
    key_sample, key_eval = jax.random.split(key)
    sample_fn = make_sample_fn(gen)
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


def parse_descriptors(text: str | None, path: str | None, meta: dict) -> np.ndarray:
    """Conditions ``[K, D]`` from ``--descriptor a,b`` or a descriptors file."""
    if (text is None) == (path is None):
        raise LpdError(
            "give exactly one of --descriptor, --descriptors-file and --text"
        )
    dims = len(meta["descriptor_names"])
    if text is not None:
        try:
            rows = np.asarray([[float(v) for v in text.split(",")]])
        except ValueError:
            raise LpdError(
                f"--descriptor {text!r} is not comma-separated numbers"
            ) from None
    else:
        try:
            rows = np.atleast_2d(
                np.load(path)
                if path.endswith(".npy")
                else np.loadtxt(path, delimiter=",")
            )
        except (OSError, ValueError) as e:
            raise LpdError(f"cannot read descriptors from {path}: {e}") from None
    if rows.shape[1] != dims:
        raise LpdError(
            f"descriptors have {rows.shape[1]} values, the env has {dims} "
            f"({', '.join(meta['descriptor_names'])})"
        )
    low, high = np.asarray(meta["descriptor_low"]), np.asarray(meta["descriptor_high"])
    if np.any(rows < low) or np.any(rows > high):
        raise LpdError(f"descriptor values must lie in [{low.min()}, {high.max()}]")
    return rows.astype(np.float32)


def picked_guidance(workdir, guidance: float | None) -> float:
    """``guidance``, or when None the scale the stage's sweep picked.

    Also checks the diffusion stage of ``workdir`` is complete.
    """
    path = diffusion_dir(workdir) / "meta.json"
    if not path.exists():
        raise LpdError(
            f"no complete diffusion stage in {diffusion_dir(workdir)}: run "
            "`lpd train-diffusion` with this --workdir first"
        )
    return float(
        json.loads(path.read_text())["guidance"] if guidance is None else guidance
    )


def sample_to_npz(
    workdir, conditions, num, guidance, steps, eta, sampler, seed, out, texts=None
):
    """Generates ``num`` policies per condition and writes them as an npz.

    ``conditions`` are descriptors ``[K, D]``, or with ``texts`` (K prompts)
    their embeddings ``[K, 384]`` for the text-conditioned denoiser.
    Keys: the policy leaves ``params/...`` ``[K * num, ...]``, the asked
    ``descriptors`` ``[K * num, D]`` or ``texts`` ``[K * num]``, and
    ``metadata`` (JSON string).
    """
    out = Path(out)
    if out.suffix != ".npz":
        raise LpdError(f"--out must end in .npz, got {out}")
    if out.exists():
        raise LpdError(f"{out} already exists; choose another --out or delete it")
    if num <= 0:
        raise LpdError("--num must be > 0")
    guidance = picked_guidance(workdir, guidance)
    gen = load_generator(workdir, text=texts is not None)
    if steps is None:
        steps = gen.config.diffusion.sample_steps
    cond = np.repeat(conditions, num, axis=0)
    sample_fn = make_sample_fn(gen, steps, eta, sampler)
    flat = sample_fn(jnp.asarray(cond), jax.random.key(seed), jnp.float32(guidance))
    flat = jax.device_get(flat)
    meta = {
        key: gen.archive_meta[key]
        for key in ("env", "backend", "episode_length", "policy", "descriptor_names")
    }
    meta.update(guidance=guidance, steps=steps, eta=eta, sampler=sampler, seed=seed)
    asked = (
        {"texts": np.repeat(np.asarray(texts), num)}
        if texts is not None
        else {"descriptors": cond}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        np.savez(f, metadata=np.asarray(json.dumps(meta)), **asked, **flat)
    tmp.replace(out)
    return out, len(cond)
