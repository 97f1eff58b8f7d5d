"""Pictures of archives and evaluation reports (PNG, written with Agg)."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lpd.workdir import atomic_path  # noqa: E402


def bins_per_dim(centroids: np.ndarray) -> int:
    """Cells per descriptor axis: the grid's size, or about ``C ** (1/D)`` for a CVT."""
    cells, dims = centroids.shape
    approx = max(1, round(cells ** (1.0 / dims)))
    distinct = min(len(np.unique(np.round(centroids[:, d], 6))) for d in range(dims))
    return distinct if distinct <= approx else approx


def project_to_image(
    descriptors: np.ndarray,
    values: np.ndarray,
    bins: int,
    low: np.ndarray,
    high: np.ndarray,
) -> np.ndarray:
    """Best value per pixel of a 2-D projection of a D-dimensional grid.

    Even descriptor dimensions index the x axis and odd ones the y axis, each
    axis in mixed radix (the first of its dimensions outermost); so a 4-D grid
    of ``b`` cells per axis becomes a ``b^2 x b^2`` image without losing any
    cell, 2-D is the plain grid and 1-D a one-row strip.

    Args:
        descriptors: ``[N, D]`` positions (cell centroids).
        values: ``[N]`` values, ``-inf`` or NaN where there is nothing.
        bins: cells per descriptor dimension.
        low, high: ``[D]`` descriptor bounds.

    Returns:
        ``[H, W]`` image, NaN where no value landed.
    """
    dims = descriptors.shape[1]
    scaled = (descriptors - low) / np.maximum(high - low, 1e-12)
    index = np.clip((scaled * bins).astype(int), 0, bins - 1)
    x_dims, y_dims = list(range(0, dims, 2)), list(range(1, dims, 2))
    x = np.zeros(len(values), dtype=int)
    y = np.zeros(len(values), dtype=int)
    for d in x_dims:
        x = x * bins + index[:, d]
    for d in y_dims:
        y = y * bins + index[:, d]
    image = np.full((bins ** len(y_dims), bins ** len(x_dims)), -np.inf)
    np.maximum.at(image, (y, x), np.where(np.isnan(values), -np.inf, values))
    image[np.isinf(image)] = np.nan
    return image


def _axis_label(names: list[str], dims: list[int]) -> str:
    parts = [f"{names[d]} contact" for d in dims]
    if len(parts) == 1:
        return parts[0]
    return " / ".join(parts) + " (outer / inner)"


def plot_archive_heatmap(
    archive, meta: dict, path: Path, ax=None, vmin=None, vmax=None
):
    """Writes a fitness heatmap of ``archive`` to ``path`` (PNG).

    With ``ax`` given, draws there instead and writes nothing; ``vmin`` and
    ``vmax`` fix the colour scale (for side-by-side comparisons).
    """
    centroids = np.asarray(archive.centroids)
    fitnesses = np.asarray(archive.fitnesses, dtype=np.float64)
    names = meta["descriptor_names"]
    image = project_to_image(
        centroids,
        np.where(np.isfinite(fitnesses), fitnesses, np.nan),
        bins_per_dim(centroids),
        np.asarray(meta["descriptor_low"]),
        np.asarray(meta["descriptor_high"]),
    )
    own_figure = ax is None
    if own_figure:
        fig, ax = plt.subplots(figsize=(6, 5 if image.shape[0] > 1 else 2.2))
    dims = centroids.shape[1]
    mesh = ax.imshow(
        image,
        origin="lower",
        extent=(0, 1, 0, 1),
        aspect="auto",
        cmap="viridis",
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    ax.set_xlabel(_axis_label(names, list(range(0, dims, 2))))
    if dims > 1:
        ax.set_ylabel(_axis_label(names, list(range(1, dims, 2))))
    else:
        ax.set_yticks([])
    filled = int(np.isfinite(fitnesses).sum())
    ax.set_title(
        f"{meta['env']}: {filled}/{len(fitnesses)} cells filled "
        f"({100 * filled / max(len(fitnesses), 1):.1f}%)"
    )
    ax.figure.colorbar(mesh, ax=ax, label="episode return")
    if own_figure:
        fig.tight_layout()
        _save(fig, path, 120)


def plot_heatmaps(panels: dict, centroids, meta: dict, path: Path) -> None:
    """Archive heatmaps side by side on one colour scale.

    Args:
        panels: title -> ``[C]`` cell fitnesses (``-inf`` where empty).
        centroids: ``[C, D]`` cells shared by every panel.
    """
    values = np.concatenate([np.asarray(v, np.float64) for v in panels.values()])
    finite = values[np.isfinite(values)]
    vmin, vmax = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    one_row = np.asarray(centroids).shape[1] == 1
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), 2.4 if one_row else 4.6)
    )
    for ax, (title, fitnesses) in zip(np.atleast_1d(axes), panels.items(), strict=True):
        cells = SimpleNamespace(centroids=centroids, fitnesses=fitnesses)
        plot_archive_heatmap(cells, meta, path, ax=ax, vmin=vmin, vmax=vmax)
        filled = int(np.isfinite(np.asarray(fitnesses, np.float64)).sum())
        ax.set_title(f"{title}: {filled} cells")
    fig.tight_layout()
    _save(fig, path, 110)


def plot_descriptor_match(sets: dict, names: list[str], path: Path) -> None:
    """Achieved against asked descriptor, one panel per descriptor dimension.

    Args:
        sets: label -> ``(asked [N, D], achieved [N, D])``.
        names: the D descriptor names.
    """
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.0))
    for d, ax in enumerate(np.atleast_1d(axes)):
        for label, (asked, achieved) in sets.items():
            ax.scatter(asked[:, d], achieved[:, d], s=4, alpha=0.4, label=label)
        ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"asked {names[d]} contact")
        ax.set_ylabel(f"achieved {names[d]} contact")
        ax.set_aspect("equal")
    np.atleast_1d(axes)[0].legend(loc="upper left", markerscale=3, fontsize=8)
    fig.tight_layout()
    _save(fig, path, 110)


def plot_return_cdfs(sets: dict, path: Path) -> None:
    """Empirical CDFs of episode return, one curve per label -> ``[N]``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, returns in sets.items():
        x = np.sort(np.asarray(returns))
        ax.step(x, np.arange(1, len(x) + 1) / len(x), where="post", label=label)
    ax.set_xlabel("mean episode return")
    ax.set_ylabel("fraction of policies")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path, 110)


def plot_sequence_contacts(
    sets: dict, asked: np.ndarray, chunks: np.ndarray, names: list[str], path: Path
) -> None:
    """Foot contact over a sequenced episode against the asked pattern.

    Args:
        sets: label -> ``[S, T, D]`` per-step foot contact of S seeds.
        asked: ``[K, D]`` the asks; chunks: ``[T]`` chunk of each step.
        names: the D foot names.
    """
    window = max(1, len(chunks) // (4 * len(asked)))
    kernel = np.ones(window) / window
    fig, axes = plt.subplots(
        len(names), 1, figsize=(8, 2.2 * len(names)), sharex=True, squeeze=False
    )
    steps = np.arange(len(chunks))
    for d, ax in enumerate(axes[:, 0]):
        ax.step(
            steps, asked[chunks, d], where="post", color="black", lw=1.5, label="asked"
        )
        for label, contacts in sets.items():
            with warnings.catch_warnings():  # Steps where every seed fell.
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(np.asarray(contacts)[..., d], axis=0)
            smooth = np.convolve(mean, kernel, mode="same")
            ax.plot(steps, smooth, label=f"{label} (moving average, {window} steps)")
        ax.set_ylabel(f"{names[d]} contact")
        ax.set_ylim(-0.05, 1.05)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    _save(fig, path, 110)


def _save(fig, path: Path, dpi: int) -> None:
    """Writes ``fig`` to ``path`` whole or not at all (and from the first
    process only, in a run over several hosts), then closes it."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
