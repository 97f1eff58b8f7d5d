"""Scoring many policies in fixed-size batches, and fidelity metrics.

All ratios compare a set of policies with the original elites evaluated by
exactly the same protocol (same episodes, same keys).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


def map_in_batches(fn: Callable, params, batch_size: int, key, desc: str = "") -> list:
    """Applies ``fn(params_batch [batch_size], key_b)`` over ``params [N]``.

    The last batch is padded (with copies of the first policy) so every call
    has the same shape and one compile serves all; batch ``b`` uses
    ``fold_in(key, b)``. Returns the outputs concatenated and trimmed to N.
    """
    num = jax.tree.leaves(params)[0].shape[0]
    outputs = []
    for b, start in enumerate(
        tqdm(range(0, num, batch_size), desc=desc, disable=not desc, leave=False)
    ):
        idx = np.arange(start, start + batch_size)
        idx = np.where(idx < num, idx, 0)
        batch = jax.tree.map(lambda x, i=idx: x[i], params)
        outputs.append(jax.device_get(fn(batch, jax.random.fold_in(key, b))))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:num], *outputs)


def cell_indices(descriptors: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """``[N]`` index of the nearest centroid of each descriptor ``[N, D]``."""
    d2 = jnp.sum(jnp.square(descriptors[:, None, :] - centroids[None]), axis=-1)
    return np.asarray(jnp.argmin(d2, axis=1))


def fidelity(original, generated, centroids: np.ndarray) -> dict:
    """Reward, coverage and descriptor agreement of ``generated`` vs ``original``.

    Args:
        original, generated: ``(returns [N], descriptors [N, D])`` for the same
            N conditions (generated policy i stands for original elite i).
        centroids: ``[C, D]`` cells of the archive, for the coverage ratio.
    """
    (f0, d0), (f1, d1) = original, generated
    cells0 = set(cell_indices(d0, centroids).tolist())
    cells1 = set(cell_indices(d1, centroids).tolist())
    return {
        "reward_ratio": float(np.mean(f1) / np.mean(f0)),
        "coverage_ratio": float(len(cells1) / len(cells0)),
        "measure_error": float(np.mean(np.linalg.norm(d1 - d0, axis=-1))),
        "original_mean_return": float(np.mean(f0)),
        "generated_mean_return": float(np.mean(f1)),
        "original_cells": len(cells0),
        "generated_cells": len(cells1),
    }
