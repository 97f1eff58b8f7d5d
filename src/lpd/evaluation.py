"""Scoring many policies in fixed-size batches, and fidelity metrics.

All ratios compare a set of policies with the original elites evaluated by
exactly the same protocol (same episodes, same keys). A ratio whose
denominator is not positive is ``None``: it would mean nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lpd import devices, qd, rollouts
from lpd import policy as policy_lib
from lpd.workdir import atomic_path


def map_in_batches(
    fn: Callable, params, batch_size: int, key, desc: str = "", cache=None
):
    """Applies ``fn(params_batch [batch_size], key_b)`` over ``params [N]``.

    The last batch is padded (with copies of the first policy) so every call
    has the same shape and one compile serves all; batch ``b`` uses
    ``fold_in(key, b)``. Returns the outputs concatenated and trimmed to N.

    With ``cache`` (a directory), each batch's outputs (a tuple of arrays)
    are stored as ``<cache>/<b>.npz`` and read back instead of recomputed,
    so an interrupted run resumes at the batch it stopped in.
    """
    num = jax.tree.leaves(params)[0].shape[0]
    if cache is not None:
        cache = Path(cache)
        cache.mkdir(parents=True, exist_ok=True)
    result = None  # Filled batch by batch: no copy of the whole output.
    for b, start in enumerate(
        tqdm(
            range(0, num, batch_size),
            desc=desc,
            disable=not desc or not devices.is_main(),
            leave=False,
        )
    ):
        path = cache / f"{b:05d}.npz" if cache is not None else None
        if path is not None and path.exists():
            with np.load(path) as data:
                out = tuple(data[f"arr_{i}"] for i in range(len(data.files)))
        else:
            idx = np.arange(start, start + batch_size)
            idx = np.where(idx < num, idx, 0)
            batch = jax.tree.map(lambda x, i=idx: x[i], params)
            out = devices.to_host(fn(batch, jax.random.fold_in(key, b)))
            if path is not None:
                with atomic_path(path) as tmp, tmp.open("wb") as f:
                    np.savez(f, *out)
        if result is None:
            result = jax.tree.map(lambda x: np.empty((num, *x.shape[1:]), x.dtype), out)
        stop = min(start + batch_size, num)
        for r, x in zip(jax.tree.leaves(result), jax.tree.leaves(out), strict=True):
            r[start:stop] = x[: stop - start]
    return result


def reevaluate(task, flat: dict, num_episodes: int, batch_size: int, key, desc=""):
    """Each policy of ``flat`` (``{path: [N, ...]}``) over ``num_episodes``
    random-reset episodes of ``task`` (``(env, policy, episode_length)``).

    Returns ``(returns [N], descriptors [N, D], lasted [N])``: the means over
    the episodes, ``lasted`` being the fraction of its steps an episode took
    before it ended (1: never fell).
    """
    env, policy, episode_length = task
    eval_fn = rollouts.make_episodes_eval_fn(
        env, policy, episode_length, num_episodes, batch_size, episode_fraction=True
    )
    score = jax.jit(lambda f, k: eval_fn(policy_lib.unflatten_params(f), k))
    return map_in_batches(score, flat, batch_size, key, desc)


def flat_vectors(flat: dict) -> jax.Array:
    """``[B, P]``: each policy's parameters ``{path: [B, ...]}`` as one vector."""
    num = next(iter(flat.values())).shape[0]
    return jnp.concatenate([flat[p].reshape(num, -1) for p in sorted(flat)], axis=1)


@functools.partial(jax.jit, static_argnames="k")
def nearest(x, y, k: int = 1):
    """The ``k`` nearest rows of ``y`` ``[N, P]`` to each row of ``x`` ``[B, P]``.

    Returns ``(distances [B, k], indices [B, k])``, Euclidean, ascending;
    full-precision matmuls on every backend.
    """
    cross = jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)
    d2 = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None] - 2 * cross
    neg, idx = jax.lax.top_k(-d2, k)
    return jnp.sqrt(jnp.maximum(-neg, 0.0)), idx


def js_divergence(x0: np.ndarray, x1: np.ndarray, eps: float = 1e-6) -> float:
    """Jensen-Shannon divergence (nats) of Gaussians fitted to two samples.

    The paper's moment-matched form: P and Q are Gaussians fitted to ``x0``
    ``[N, D]`` and ``x1`` ``[M, D]``, M is the Gaussian with the moments of
    their equal mixture, and JS = (KL(P || M) + KL(Q || M)) / 2. ``eps`` is
    added to the covariance diagonals so constant dimensions stay finite.
    """

    def fit(x):
        x = np.asarray(x, np.float64)
        cov = np.atleast_2d(np.cov(x, rowvar=False)) if len(x) > 1 else 0.0
        return x.mean(axis=0), cov + eps * np.eye(x.shape[1])

    def kl(m_p, s_p, m_q, s_q):
        s_q_inv = np.linalg.inv(s_q)
        diff = m_q - m_p
        _, logdet_p = np.linalg.slogdet(s_p)
        _, logdet_q = np.linalg.slogdet(s_q)
        return 0.5 * (
            np.trace(s_q_inv @ s_p)
            + diff @ s_q_inv @ diff
            - len(m_p)
            + logdet_q
            - logdet_p
        )

    (m0, s0), (m1, s1) = fit(x0), fit(x1)
    m = (m0 + m1) / 2
    s = (s0 + s1) / 2 + np.outer(m0 - m1, m0 - m1) / 4
    return float(max(0.5 * (kl(m0, s0, m, s) + kl(m1, s1, m, s)), 0.0))


def archive_summary(returns, achieved, centroids, fitness_offset: float) -> dict:
    """Mean return and the archive the policies fill (QDax insertion).

    Args:
        returns: ``[N]`` mean episode returns; achieved: ``[N, D]`` mean
            descriptors; centroids: ``[C, D]`` cells of the original archive.
    """
    returns = np.asarray(returns)
    if len(returns) == 0:
        cells = np.full(len(centroids), -np.inf, np.float32)
        filled = {"cell_fitnesses": cells, "qd_score": 0.0, "max_fitness": -np.inf}
    else:
        filled = qd.fill_archive(returns, achieved, centroids, fitness_offset)
    cells = np.asarray(filled["cell_fitnesses"])
    return {
        "num_policies": int(len(returns)),
        "mean_return": float(np.mean(returns)) if len(returns) else float("nan"),
        "filled_cells": int(np.sum(cells > -np.inf)),
        "qd_score": float(filled["qd_score"]),
        "max_fitness": float(filled["max_fitness"]),
        "cell_fitnesses": cells,
    }


def ratio(x, y) -> float | None:
    """``x / y``, or None when ``y`` is not positive (or either is NaN)."""
    return float(x / y) if y > 0 and np.isfinite(x) else None


def format_ratio(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def format_ratios(m: dict) -> str:
    """The fidelity ratios of :func:`fidelity` in one line, for logs."""
    return (
        f"reward ratio {format_ratio(m['reward_ratio'])} (offset "
        f"{format_ratio(m['offset_reward_ratio'])}), coverage ratio "
        f"{format_ratio(m['coverage_ratio'])}"
    )


def fidelity(original, generated, asked, centroids, fitness_offset: float) -> dict:
    """The protocol's metrics of ``generated`` against the re-evaluated original.

    Args:
        original, generated: ``(returns [N], achieved descriptors [N, D])``,
            scored by the same protocol (same episodes, same keys); the sets
            may differ in size (a uniform sweep against the archive).
        asked: ``[M, D]`` the descriptors the generated policies were asked
            for (M = the generated set's size).
        centroids: ``[C, D]`` cells of the archive.
        fitness_offset: the task's QD-score offset.

    Returns:
        A dict of floats: ``reward_ratio`` is the paper's, mean return over
        the originals' mean return (None when that is not positive, as on
        tasks whose returns are mostly negative); ``offset_reward_ratio`` is
        the same on returns shifted by the task's fitness offset (the QD
        score's), defined for every task; ``coverage_ratio``,
        ``qd_score_ratio``, ``js_divergence``, ``measure_error`` and the raw
        figures behind them.
    """
    a0 = archive_summary(*original, centroids, fitness_offset)
    a1 = archive_summary(*generated, centroids, fitness_offset)
    achieved = np.asarray(generated[1])
    error = np.linalg.norm(achieved - np.asarray(asked), axis=-1)
    shift = lambda a: a["mean_return"] + fitness_offset
    return {
        "reward_ratio": ratio(a1["mean_return"], a0["mean_return"]),
        "offset_reward_ratio": ratio(shift(a1), shift(a0)),
        "coverage_ratio": ratio(a1["filled_cells"], a0["filled_cells"]),
        "qd_score_ratio": ratio(a1["qd_score"], a0["qd_score"]),
        "js_divergence": js_divergence(original[1], achieved)
        if len(achieved)
        else None,
        "measure_error": float(np.mean(error)) if len(error) else None,
        "original_mean_return": a0["mean_return"],
        "generated_mean_return": a1["mean_return"] if len(achieved) else None,
        "original_cells": a0["filled_cells"],
        "generated_cells": a1["filled_cells"],
        "original_qd_score": a0["qd_score"],
        "generated_qd_score": a1["qd_score"],
    }


def shortfall(original_returns, returns, fraction: float = 0.5) -> dict | None:
    """Where the reward is lost when policy i answers elite i's ask.

    Over the asks whose elite has a positive return (``[N]`` each): the
    share whose policy keeps less than ``fraction`` of it (``share``), the
    reward those few lose as a fraction of the elites' total return
    (``reward_lost``), and the reward ratio on the other asks
    (``reward_ratio_without``). None when no elite's return is positive.
    """
    original, returns = np.asarray(original_returns), np.asarray(returns)
    keep = original > 0
    if not keep.any():
        return None
    original, returns = original[keep], returns[keep]
    low = returns < fraction * original
    return {
        "fraction": fraction,
        "share": float(np.mean(low)),
        "reward_lost": float(np.sum((original - returns)[low]) / np.sum(original)),
        "reward_ratio_without": ratio(np.sum(returns[~low]), np.sum(original[~low])),
    }


def quantiles(x) -> dict:
    """Mean and the 10/50/90% quantiles of ``x`` ``[N]``, as floats."""
    x = np.asarray(x, np.float64)
    q10, q50, q90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {
        "mean": float(x.mean()),
        "q10": float(q10),
        "q50": float(q50),
        "q90": float(q90),
    }
