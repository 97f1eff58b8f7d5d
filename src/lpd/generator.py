"""From a behaviour to policy weights: load a trained generator, sample, decode.

A :class:`Generator` is the codec's decoder and standardiser plus one
denoiser: the descriptor-conditioned one (``<workdir>/diffusion``) or the
text-conditioned one (``<workdir>/text``). :func:`make_sample_fn` turns
conditions into policy parameters in one jitted program;
:func:`sample_to_npz` is ``lpd sample``. The asks users type are checked
here (:func:`parse_descriptors`, :func:`check_finite`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpd import archive_io, checkpoints, codec_stage, diffusion_train, evaluation
from lpd import codec as codec_lib
from lpd import diffusion as diffusion_lib
from lpd.errors import LpdError
from lpd.workdir import (
    atomic_path,
    check_out,
    codec_dir,
    diffusion_dir,
    is_complete,
    text_dir,
)

SAMPLERS = ("ddim", "ddpm")
TEXT_DIM = 384  # all-MiniLM-L6-v2's sentence embeddings (lpd.text).
# Decoded parameters per sampling call: bounds the memory of one call (about
# three times this, measured) whatever --num asks for, and depends on the
# policy size only, so the same seed gives the same policies on any machine.
CHUNK_BYTES = 2**28
# The conditioner's name in checkpoints written before it was renamed.
LEGACY_CONDITIONER = "DescriptorConditioner_0"


class Generator(NamedTuple):
    """Everything needed to turn conditions into policy parameters.

    ``returns``: whether the denoiser also takes a return quantile (a second
    condition group, which an ask may leave out).
    """

    config: ml_collections.ConfigDict
    archive_meta: dict
    returns: bool
    denoiser: diffusion_lib.Denoiser
    denoiser_params: dict
    schedule: diffusion_lib.Schedule
    codec: codec_lib.Codec
    codec_params: dict
    stats: codec_lib.Standardiser
    latent_scale: float


def _read_json(path: Path, command: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LpdError(
            f"{path} is missing or corrupt ({type(e).__name__}); rerun `lpd "
            f"{command}` into a new --workdir"
        ) from None


def _renamed(tree: dict, old: str, new: str) -> dict:
    return {(new if k == old else k): v for k, v in tree.items()}


def _load_denoiser_params(path: Path, template: dict) -> dict:
    """The EMA denoiser parameters at ``path``, also from checkpoints written
    while the conditioner was called ``DescriptorConditioner``."""
    stored = checkpoints.stored_structure(path)
    legacy = LEGACY_CONDITIONER in stored.get("ema", {}).get("params", {})
    inner = template["params"]
    if legacy:
        inner = _renamed(inner, "conditioner", LEGACY_CONDITIONER)
    state = checkpoints.load_tree(path, {"ema": {"params": inner}}, "the denoiser")
    params = state["ema"]["params"]
    if legacy:
        params = _renamed(params, LEGACY_CONDITIONER, "conditioner")
    return {"params": params}


def load_generator(workdir, text: bool = False) -> Generator:
    """Loads the codec and a denoiser of a workdir (trained stages).

    The descriptor-conditioned denoiser, or with ``text`` the one conditioned
    on sentence embeddings ``[384]`` (``<workdir>/text``).
    """
    directory = text_dir(workdir) if text else diffusion_dir(workdir)
    command = "train-text" if text else "train-diffusion"
    if not (directory / "model").exists():
        raise LpdError(f"no trained denoiser in {directory}: run `lpd {command}` first")
    config = ml_collections.ConfigDict(_read_json(directory / "config.json", command))
    archive_meta = archive_io.load_meta(workdir)
    codec_meta = _read_json(codec_dir(workdir) / "meta.json", "train-codec")
    dims = len(archive_meta["descriptor_names"])
    returns = not text and bool(config.diffusion.get("return_neighbours", 0))
    try:
        codec = codec_stage.make_model(config.codec, archive_meta["layout"])
        # Older workdirs' configs predate Fourier conditioning: raw descriptors.
        frequencies = 0 if text else config.diffusion.get("cond_frequencies", 0)
        denoiser = diffusion_train.make_denoiser(
            config.diffusion,
            codec_meta["latent_dim"],
            (dims, 1) if returns else (),
            frequencies,
        )
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
    cond_dim = TEXT_DIM if text else dims + returns
    cond = jax.ShapeDtypeStruct((cond_dim,), jnp.float32)
    denoiser_template = jax.eval_shape(
        denoiser.init, jax.random.key(0), latent, 0, cond, False
    )
    codec_state = checkpoints.load_tree(
        codec_dir(workdir) / "model",
        {"params": codec_template, "stats": stats_template},
        "the codec model",
    )
    return Generator(
        config=config,
        archive_meta=archive_meta,
        returns=returns,
        denoiser=denoiser,
        denoiser_params=_load_denoiser_params(directory / "model", denoiser_template),
        schedule=diffusion_lib.cosine_schedule(config.diffusion.num_timesteps),
        codec=codec,
        codec_params=codec_state["params"],
        stats=codec_state["stats"],
        latent_scale=float(codec_meta["latent_scale"]),
    )


def decode_latents(gen: Generator, z) -> dict:
    """Policy parameters ``{path: [B, ...]}`` of unit-variance latents ``[B, L]``."""
    chex.assert_shape(z, (None, gen.codec.latent_dim))
    decode = jax.vmap(lambda v: gen.codec.apply(gen.codec_params, v, method="decode"))
    return codec_lib.unstandardise(gen.stats, decode(z / gen.latent_scale))


def make_sample_fn(gen: Generator, steps=None, eta=None, sampler="ddim") -> callable:
    """Jitted ``(conditions [B, C], key, guidance, returns=None) -> flat params
    {path: [B, ...]}``.

    ``conditions`` are descriptors (or, for the text model, embeddings);
    ``returns`` ``[B]`` asks for return quantiles as well (1: the best return
    known near each descriptor; see :func:`lpd.diffusion_stage.return_quantiles`),
    left out where NaN, or everywhere when None (which compiles apart from an
    array). ``steps`` and ``eta`` default to ``config.diffusion``'s.
    The guidance scale is an argument, so one compile serves every scale.
    """
    c = gen.config.diffusion
    steps = c.sample_steps if steps is None else steps
    eta = check_finite(c.eta if eta is None else eta, "--eta")
    if sampler not in SAMPLERS:
        raise LpdError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if not 0 < steps <= gen.schedule.num_timesteps:
        raise LpdError(f"--steps must lie in [1, {gen.schedule.num_timesteps}]")
    if eta < 0:
        raise LpdError(f"--eta must be >= 0, got {eta}")
    prediction = c.prediction

    def sample(cond, key, guidance, returns=None):
        chex.assert_rank(cond, 2)
        batch = cond.shape[0]
        keep = None
        if gen.returns:  # The return group: asked for, or left out (NaN).
            if returns is None:
                returns = jnp.full(batch, jnp.nan)
            asked = jnp.isfinite(returns)
            quantiles = jnp.where(asked, returns, 0.0)
            cond = jnp.concatenate([cond, quantiles[:, None]], axis=1)
            keep = jnp.stack([jnp.ones(batch, bool), asked], axis=1)
        elif returns is not None:
            raise LpdError("this denoiser was trained without return conditioning")
        key_noise, key_sample = jax.random.split(key)
        x_T = jax.random.normal(key_noise, (batch, gen.codec.latent_dim))
        eps_fn = diffusion_lib.guided_eps_fn(
            gen.denoiser_params,
            gen.denoiser,
            gen.schedule,
            cond,
            guidance,
            prediction,
            keep,
        )
        if sampler == "ddim":
            z = diffusion_lib.ddim_sample(
                eps_fn, gen.schedule, x_T, steps, eta, key_sample
            )
        else:
            z = diffusion_lib.ddpm_sample(eps_fn, gen.schedule, x_T, key_sample)
        return decode_latents(gen, z)

    return jax.jit(sample)


def check_finite(value, flag: str) -> float:
    """``value`` as a float; a one-line error when it is NaN or infinite."""
    value = float(value)
    if not np.isfinite(value):
        raise LpdError(f"{flag} must be a finite number, got {value}")
    return value


def parse_descriptors(text: str | None, path: str | None, meta: dict) -> np.ndarray:
    """Conditions ``[K, D]`` from ``--descriptor a,b`` or a descriptors file
    (``.npy``, or comma-separated text with one row per descriptor)."""
    if (text is None) == (path is None):
        raise LpdError(
            "give exactly one of --descriptor, --descriptors-file and --text"
        )
    if text is not None:
        try:
            rows = np.asarray([[float(v) for v in text.split(",")]])
        except ValueError:
            raise LpdError(
                f"--descriptor {text!r} is not comma-separated numbers"
            ) from None
        what = f"--descriptor {text!r}"
    else:
        rows, what = _read_descriptors_file(path), str(path)
    return check_descriptors(rows, meta, what)


def _read_descriptors_file(path: str) -> np.ndarray:
    try:
        if path.endswith(".npy"):
            return np.load(path, allow_pickle=False)
        return np.loadtxt(path, delimiter=",", ndmin=2)
    except (OSError, ValueError, EOFError) as e:
        raise LpdError(f"cannot read descriptors from {path}: {e}") from None


def check_descriptors(rows, meta: dict, what: str) -> np.ndarray:
    """``rows`` as float32 ``[K, D]``: one-line errors for anything else (text,
    NaN, no rows, wrong dimension, outside the descriptor bounds)."""
    rows = np.asarray(rows)
    dims = len(meta["descriptor_names"])
    if rows.dtype.kind not in "iuf":
        raise LpdError(f"{what}: descriptors must be numbers, got {rows.dtype}")
    rows = np.atleast_2d(rows)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise LpdError(
            f"{what}: expected a [K, {dims}] table of descriptors, got shape "
            f"{rows.shape}"
        )
    if rows.shape[1] != dims:
        raise LpdError(
            f"{what}: descriptors have {rows.shape[1]} values, the env has {dims} "
            f"({', '.join(meta['descriptor_names'])})"
        )
    if not np.isfinite(rows).all():
        raise LpdError(f"{what}: descriptors must be finite numbers (no NaN or inf)")
    low, high = np.asarray(meta["descriptor_low"]), np.asarray(meta["descriptor_high"])
    if np.any(rows < low) or np.any(rows > high):
        raise LpdError(
            f"{what}: descriptor values must lie in [{low.min()}, {high.max()}]"
        )
    return rows.astype(np.float32)


def parse_return(text: str | None) -> float | None:
    """``--return``: None, "top" (1.0) or a quantile in ``[0, 1]``."""
    if text is None:
        return None
    if text.strip().lower() == "top":
        return 1.0
    try:
        value = check_finite(text, "--return")
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise LpdError(f"--return must be 'top' or a quantile in [0, 1], got {text!r}")
    return value


def picked_guidance(workdir, guidance: float | None) -> float:
    """``guidance``, or when None the scale the diffusion stage's sweep picked.

    Also checks the diffusion stage of ``workdir`` is complete.
    """
    directory = diffusion_dir(workdir)
    if not is_complete(directory):
        raise LpdError(
            f"no complete diffusion stage in {directory}: run `lpd train-diffusion` "
            "with this --workdir first"
        )
    if guidance is None:
        guidance = _read_json(directory / "meta.json", "train-diffusion")["guidance"]
    return check_finite(guidance, "--guidance")


def _check_room(num: int, bytes_per_policy: int, out: Path) -> None:
    """Refuses a sample that would not fit in this machine's RAM or disk."""
    need = num * bytes_per_policy
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    folder = next(p for p in out.absolute().parents if p.exists())
    disk = shutil.disk_usage(folder).free
    for room, where in ((ram // 2, "half this machine's memory"), (disk, "free disk")):
        if need > room:
            raise LpdError(
                f"{num} policies take {need / 2**30:.1f} GiB, more than {where} "
                f"({room / 2**30:.1f} GiB); ask for fewer with --num"
            )


def sample_to_npz(workdir, conditions, num, options: dict, out, texts=None):
    """Generates ``num`` policies per condition and writes them as an npz.

    ``conditions`` are descriptors ``[K, D]``, or with ``texts`` (K prompts)
    their embeddings ``[K, 384]`` for the text-conditioned denoiser.
    ``options``: ``guidance`` (None: the sweep's pick), ``steps`` (None: the
    config's), ``eta``, ``sampler``, ``seed`` and optionally ``return`` (a
    return quantile asked with every descriptor; absent or None: none).
    Policies are generated :data:`CHUNK_BYTES` at a time. Keys: the policy
    leaves ``params/...`` ``[K * num, ...]``, the asked ``descriptors``
    ``[K * num, D]`` or ``texts`` ``[K * num]``, and ``metadata`` (JSON).
    """
    out = check_out(out, ".npz")
    if num <= 0:
        raise LpdError(f"--num must be > 0, got {num}")
    guidance = picked_guidance(workdir, options["guidance"])
    gen = load_generator(workdir, text=texts is not None)
    c = gen.config.diffusion
    steps = c.sample_steps if options["steps"] is None else options["steps"]
    eta = c.eta if options["eta"] is None else options["eta"]
    per_policy = 4 * int(gen.archive_meta["policy"]["params_per_policy"])
    total = len(conditions) * num
    _check_room(total, per_policy, out)
    cond = np.repeat(conditions, num, axis=0).astype(np.float32)
    asked_return = options.get("return")
    if asked_return is not None and texts is not None:
        raise LpdError("--return goes with descriptor asks, not with --text")
    if asked_return is not None and not gen.returns:
        raise LpdError(
            "--return needs a denoiser trained with diffusion.return_neighbours > 0"
        )
    asks = {"cond": cond}
    if asked_return is not None:
        asks["returns"] = np.full(total, asked_return, np.float32)
    sample_fn = make_sample_fn(gen, steps, eta, options["sampler"])
    flat = evaluation.map_in_batches(
        lambda a, k: sample_fn(a["cond"], k, jnp.float32(guidance), a.get("returns")),
        asks,
        max(1, min(total, CHUNK_BYTES // per_policy)),
        jax.random.key(options["seed"]),
        "sample" if total > CHUNK_BYTES // per_policy else "",
    )
    meta = {
        key: gen.archive_meta[key]
        for key in ("env", "backend", "episode_length", "policy", "descriptor_names")
    }
    meta.update(
        options, guidance=guidance, steps=steps, eta=eta, **{"return": asked_return}
    )
    asked = (
        {"texts": np.repeat(np.asarray(texts), num)}
        if texts is not None
        else {"descriptors": cond}
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, tmp.open("wb") as f:
        np.savez(f, metadata=np.asarray(json.dumps(meta)), **asked, **flat)
    return out, total
