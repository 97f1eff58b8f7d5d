"""Stage: label the elites and train a text-conditioned denoiser (``lpd train-text``).

Reads ``<workdir>/archive`` and ``<workdir>/codec``; writes ``<workdir>/text/``:

- ``labels.json``: the texts of every elite (:mod:`lpd.labels`' format),
  made from each elite's foot contact, return and how long it stays up over
  ``text.label_episodes`` random-reset episodes, or copied from the user's
  ``text.labels_file``;
- ``embeddings.npz``: ``texts [U]`` (the distinct texts), their MiniLM
  embeddings ``[U, 384]``, and the training pairs ``pair_elite``,
  ``pair_text``;
- ``model/``: orbax checkpoint of the EMA denoiser, conditioned on a text
  embedding instead of a descriptor; ``metrics.jsonl``, ``tensorboard/``,
  ``checkpoints/``, ``config.json``; ``meta.json``, written last.

The denoiser is the descriptor model's architecture (``config.diffusion``),
its conditioner a learned projection of the frozen 384-d sentence embedding,
trained by the same loop (:func:`lpd.diffusion_train.train_denoiser`) with
the same condition dropout on (latent, text) pairs: every phrasing of every
elite, drawn uniformly.
"""

from __future__ import annotations

import logging

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
    labels,
    rollouts,
    text,
    training,
)
from lpd import policy as policy_lib
from lpd.config import config_to_dict
from lpd.errors import LpdError
from lpd.workdir import StageClock, atomic_path, stage_complete, text_dir, write_json

log = logging.getLogger(__name__)

STAGE_KEY = 4


def _automatic_labels(c, meta, flat, key) -> tuple[list[list[str]], dict]:
    """Texts per elite (parameters ``flat``) from random-reset episodes, and
    how they were made; ``c`` is ``config.text``."""
    env, policy = archive_lib.make_task(meta)
    eval_fn = rollouts.make_episodes_eval_fn(
        env,
        policy,
        meta["episode_length"],
        c.label_episodes,
        c.label_batch_size,
        episode_fraction=True,
    )
    score = jax.jit(lambda f, k: eval_fn(policy_lib.unflatten_params(f), k))
    returns, achieved, fraction = evaluation.map_in_batches(
        score, flat, c.label_batch_size, key, "text: labelling elites"
    )
    texts = labels.make_labels(achieved, returns, fraction, meta["descriptor_names"])
    fell = int(np.sum(fraction < labels.FELL))
    return texts, {"source": "automatic", "episodes": c.label_episodes, "fell": fell}


def validate(config: ml_collections.ConfigDict) -> None:
    """One-line errors for a ``config.text`` this stage cannot run."""
    c = config.text
    training.check_schedule(c, "text")
    if c.label_episodes <= 0 or c.label_batch_size <= 0:
        raise LpdError("text.label_episodes and text.label_batch_size must be > 0")


def _training_pairs(texts: list[list[str]]):
    """The distinct texts, and each (elite, text) pair as indices into them."""
    distinct = sorted({t for ts in texts for t in ts})
    row = {t: i for i, t in enumerate(distinct)}
    pair_elite = np.asarray([e for e, ts in enumerate(texts) for _ in ts], np.int32)
    pair_text = np.asarray([row[t] for ts in texts for t in ts], np.int32)
    return distinct, pair_elite, pair_text


def run_text_stage(config: ml_collections.ConfigDict, workdir):
    """Labels, embeds and trains (or resumes, or skips when complete)."""
    directory = text_dir(workdir)
    config_dict = config_to_dict(config)
    sections = ("diffusion", "text")  # Its denoiser is config.diffusion's.
    if all([stage_complete(directory, config_dict, s) for s in sections]):
        log.info("text: complete in %s, skipping", directory)
        return directory
    clock = StageClock(directory)
    validate(config)
    archive, meta = archive_io.load_archive(workdir)
    cells, flat = archive_io.elites(archive)
    latents = codec_stage.load_latents(workdir, cells)["latents"]
    diffusion_train.validate(config.diffusion, latents.shape[1])
    user_labels = config.text.labels_file
    if user_labels:  # Checked before anything is written.
        texts = labels.read_labels(user_labels, cells)
    encoder = text.load_text_encoder()
    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    key_label, key_init, key_train = jax.random.split(key, 3)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "config.json", config_dict)

    if user_labels:
        label_info = {"source": user_labels}
    else:
        texts, label_info = _automatic_labels(config.text, meta, flat, key_label)
    labels.write_labels(directory / "labels.json", cells, texts)
    distinct, pair_elite, pair_text = _training_pairs(texts)
    embeddings = text.encode(encoder, distinct)
    with atomic_path(directory / "embeddings.npz") as tmp, tmp.open("wb") as f:
        np.savez(
            f,
            texts=np.asarray(distinct),
            embeddings=embeddings,
            pair_elite=pair_elite,
            pair_text=pair_text,
        )
    log.info(
        "text: %d elites, %d texts (%d distinct)",
        len(texts),
        len(pair_text),
        len(distinct),
    )
    ema = diffusion_train.train_denoiser(
        diffusion_train.make_denoiser(config.diffusion, latents.shape[1]),
        config.diffusion,
        (jnp.asarray(latents[pair_elite]), jnp.asarray(embeddings[pair_text])),
        (key_init, key_train),
        directory,
        (config.text.num_steps, config.text.log_period, "text"),
    )
    checkpoints.save_tree(directory / "model", {"ema": ema})
    meta = {
        "labels": label_info,
        "elites": len(texts),
        "texts": len(pair_text),
        "distinct_texts": len(distinct),
        "denoiser_params": policy_lib.count_params(ema),
        "wall_time_s": clock.total(),
        "versions": archive_io.package_versions(),
        "config": config_dict,
    }
    write_json(directory / "meta.json", meta)
    return directory


def encode_prompts(prompts: list[str], flag: str) -> np.ndarray:
    """``[K, 384]`` embeddings of user prompts; one-line error for an empty one."""
    if not prompts or any(not p.strip() for p in prompts):
        raise LpdError(f"{flag}: give non-empty text (e.g. 'hop on the left foot')")
    return text.encode(text.load_text_encoder(), [p.strip() for p in prompts])
