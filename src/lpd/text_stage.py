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
trained with the same condition dropout on (latent, text) pairs: every
phrasing of every elite, drawn uniformly.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lpd import archive as archive_lib
from lpd import (
    archive_io,
    checkpoints,
    codec_stage,
    codec_train,
    diffusion_stage,
    evaluation,
    labels,
    qd,
    text,
    training,
)
from lpd import diffusion as diffusion_lib
from lpd import policy as policy_lib
from lpd.config import config_to_dict, stage_complete
from lpd.errors import LpdError
from lpd.logs import write_json_atomic

log = logging.getLogger(__name__)

STAGE_KEY = 4


def _elite_labels(c, meta, cells, flat, key) -> tuple[list[list[str]], dict]:
    """Texts per elite (``cells`` order, parameters ``flat``) and how they were
    made; ``c`` is ``config.text``."""
    if c.labels_file:
        return labels.read_labels(c.labels_file, cells), {"source": c.labels_file}
    env, policy = archive_lib.make_task(meta)
    eval_fn = qd.make_episodes_eval_fn(
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


def _validate(c: ml_collections.ConfigDict) -> None:
    if c.num_steps <= 0 or c.log_period <= 0 or c.num_steps % c.log_period:
        raise LpdError(
            f"text.num_steps ({c.num_steps}) must be a positive multiple of "
            f"text.log_period ({c.log_period})"
        )
    if c.label_episodes <= 0 or c.label_batch_size <= 0:
        raise LpdError("text.label_episodes and text.label_batch_size must be > 0")


def run_text_stage(config: ml_collections.ConfigDict, workdir):
    """Labels, embeds and trains (or resumes, or skips when complete)."""
    started = time.monotonic()
    directory = diffusion_stage.text_dir(workdir)
    config_dict = config_to_dict(config)
    sections = ("diffusion", "text")  # Its denoiser is config.diffusion's.
    if all([stage_complete(directory, config_dict, s) for s in sections]):
        log.info("text: complete in %s, skipping", directory)
        return directory
    _validate(config.text)
    archive, meta = archive_io.load_archive(workdir)
    cells, flat = archive_io.elites(archive)
    latents = codec_stage.load_latents(workdir, cells)["latents"]
    key = jax.random.fold_in(jax.random.key(config.seed), STAGE_KEY)
    key_label, key_init, key_train = jax.random.split(key, 3)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "config.json", config_dict)

    texts, label_info = _elite_labels(config.text, meta, cells, flat, key_label)
    labels.write_labels(directory / "labels.json", cells, texts)
    distinct = sorted({t for ts in texts for t in ts})
    row = {t: i for i, t in enumerate(distinct)}
    pair_elite = np.asarray([e for e, ts in enumerate(texts) for _ in ts], np.int32)
    pair_text = np.asarray([row[t] for ts in texts for t in ts], np.int32)
    embeddings = text.encode(text.load_text_encoder(), distinct)
    np.savez(
        directory / "embeddings.npz",
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

    c = config.diffusion.copy_and_resolve_references()
    c.update(num_steps=config.text.num_steps, log_period=config.text.log_period)
    model = diffusion_stage.make_denoiser(c, latents.shape[1])
    schedule = diffusion_lib.cosine_schedule(c.num_timesteps)
    optimizer = codec_train.make_optimizer(
        c.learning_rate, c.warmup_steps, c.num_steps, c.weight_decay, c.grad_clip
    )
    data = (jnp.asarray(latents[pair_elite]), jnp.asarray(embeddings[pair_text]))
    chunk_fn = diffusion_stage.make_train_chunk(
        model, schedule, optimizer, c, c.log_period
    )

    def init_state():
        params = model.init(key_init, data[0][0], 0, data[1][0], False)
        ema = jax.tree.map(jnp.copy, params)  # Its own buffers: the state is donated.
        return {"params": params, "ema": ema, "opt_state": optimizer.init(params)}

    state = training.run_chunks(
        directory,
        init_state,
        lambda s, start: chunk_fn(s, data, start, key_train),
        c.num_steps,
        c.log_period,
        "text",
    )
    checkpoints.save_tree(directory / "model", {"ema": state["ema"]})
    meta = {
        "labels": label_info,
        "elites": len(texts),
        "texts": len(pair_text),
        "distinct_texts": len(distinct),
        "denoiser_params": int(sum(x.size for x in jax.tree.leaves(state["ema"]))),
        "wall_time_s": round(time.monotonic() - started, 1),
        "versions": archive_io.package_versions(),
        "config": config_dict,
    }
    write_json_atomic(directory / "meta.json", meta)
    return directory


def encode_prompts(prompts: list[str], flag: str) -> np.ndarray:
    """``[K, 384]`` embeddings of user prompts; one-line error for an empty one."""
    if not prompts or any(not p.strip() for p in prompts):
        raise LpdError(f"{flag}: give non-empty text (e.g. 'hop on the left foot')")
    return text.encode(text.load_text_encoder(), [p.strip() for p in prompts])
