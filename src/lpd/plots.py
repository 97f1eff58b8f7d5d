"""Pictures of archives: fitness over the descriptor space as a heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
        fig.savefig(path, dpi=120)
        plt.close(fig)
