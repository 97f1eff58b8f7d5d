"""Copy-and-perturb baselines that a weight generator must beat.

Weight generators often only reproduce or interpolate their training set
(Zeng et al. 2025, "Generative Modeling of Weights: Generalization or
Memorization?"). Two such generators, scored by the evaluation's protocol
on the same asks as the generated policies:

- **elite + noise**: the asked elite (for a uniform ask, the elite whose
  stored descriptor is nearest) plus Gaussian weight noise, scaled so that
  it lies as far from that elite in weight space as the generated policies
  lie from their nearest elite (median);
- **neighbour mean**: the mean weights of the ``k`` elites whose stored
  descriptors are nearest to the ask, for ``k`` in :data:`NEIGHBOURS`; the
  ``k`` with the best QD score on the uniform asks is reported.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lpd import evaluation

NEIGHBOURS = (2, 3, 4)


@jax.jit
def add_noise(flat, key, sigma):
    """``flat + sigma * N(0, I)``, the noise drawn from ``fold_in(key, 2)``."""
    keys = jax.random.split(jax.random.fold_in(key, 2), len(flat))
    return {
        p: x + sigma * jax.random.normal(k, x.shape)
        for (p, x), k in zip(sorted(flat.items()), keys, strict=True)
    }


@jax.jit
def mean_of(indices, elites):
    """The mean weights ``{path: [B, ...]}`` of the elites each row of
    ``indices`` ``[B, k]`` names."""
    return {p: jnp.mean(x[indices], axis=1) for p, x in elites.items()}


def make_noisy_score(score: Callable) -> Callable:
    """``(flat [B], key, sigma) -> score(flat + noise, key)``: the episodes come
    from ``key`` through the evaluation's own ``score``."""
    return lambda flat, key, sigma: score(add_noise(flat, key, sigma), key)


def make_mean_score(score: Callable) -> Callable:
    """``(indices [B, k], key, elites {path: [N, ...]})``: the score of the
    mean weights of the elites each row of ``indices`` names."""
    return lambda indices, key, elites: score(mean_of(indices, elites), key)


def run_baselines(run: Callable, score: Callable, elites: tuple, asks: tuple) -> dict:
    """Scores both baselines on the archive asks and the uniform asks.

    Args:
        run: ``run(fn, inputs, which, name) -> (returns, achieved, ...)``, the
            evaluation's batched, cached scoring of ``fn(inputs_batch, key)``
            with the keys of ``which`` ("archive" or "uniform").
        score: ``(flat params [B], key) -> (returns [B], achieved [B, D])``.
        elites: ``(flat params {path: [N, ...]}, stored descriptors [N, D])``.
        asks: ``(uniform descriptors [U, D], generated weight distance to the
            nearest elite on archive asks [N] and on uniform asks [U],
            qd_score_fn(scored) -> QD score)``.

    Returns:
        ``{"elite_noise": {"archive", "uniform", "sigma", "uniform_sigma"},
        "neighbour_mean": {"archive", "uniform", "k", "uniform_qd_score_by_k"}}``
        with ``(returns, achieved)`` per ask set.
    """
    flat, stored = elites
    uniform_asked, archive_distance, uniform_distance, qd_score_fn = asks
    num_params = sum(int(np.prod(x.shape[1:])) for x in flat.values())
    _, near = evaluation.nearest(
        np.asarray(uniform_asked, np.float32), stored, k=max(NEIGHBOURS)
    )
    near = np.asarray(near)
    sigma = float(np.median(archive_distance)) / np.sqrt(num_params)
    uniform_sigma = float(np.median(uniform_distance)) / np.sqrt(num_params)
    noisy = make_noisy_score(score)
    elite_noise = {
        "archive": run(
            lambda f, k: noisy(f, k, sigma), flat, "archive", "noise_archive"
        )[:2],
        "uniform": run(
            lambda f, k: noisy(f, k, uniform_sigma),
            {p: x[near[:, 0]] for p, x in flat.items()},
            "uniform",
            "noise_uniform",
        )[:2],
        "sigma": sigma,
        "uniform_sigma": uniform_sigma,
    }
    device_elites = {p: jnp.asarray(x) for p, x in flat.items()}
    mean = make_mean_score(score)
    by_k = {
        k: run(
            lambda i, key: mean(i, key, device_elites),
            near[:, :k],
            "uniform",
            f"mean{k}_uniform",
        )[:2]
        for k in NEIGHBOURS
    }
    qd = {k: qd_score_fn(scored) for k, scored in by_k.items()}
    best = max(NEIGHBOURS, key=lambda k: qd[k])
    _, archive_near = evaluation.nearest(stored, stored, k=best)
    neighbour_mean = {
        "archive": run(
            lambda i, key: mean(i, key, device_elites),
            np.asarray(archive_near),
            "archive",
            f"mean{best}_archive",
        )[:2],
        "uniform": by_k[best],
        "k": best,
        "uniform_qd_score_by_k": {str(k): v for k, v in qd.items()},
    }
    return {"elite_noise": elite_noise, "neighbour_mean": neighbour_mean}
