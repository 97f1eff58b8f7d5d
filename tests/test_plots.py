import itertools

import numpy as np

from lpd import plots


def _grid(bins, dims):
    axis = (np.arange(bins) + 0.5) / bins
    return np.array(list(itertools.product(axis, repeat=dims)))


def test_two_d_grid_maps_each_cell_to_its_pixel():
    cells = _grid(3, 2)
    values = np.arange(9.0)
    image = plots.project_to_image(cells, values, 3, np.zeros(2), np.ones(2))
    assert image.shape == (3, 3)
    # x is the first descriptor, y the second.
    for (x, y), v in zip(cells, values, strict=True):
        assert image[int(y * 3), int(x * 3)] == v


def test_four_d_grid_keeps_every_cell():
    cells = _grid(3, 4)
    values = np.random.default_rng(0).normal(size=len(cells))
    image = plots.project_to_image(cells, values, 3, np.zeros(4), np.ones(4))
    assert image.shape == (9, 9)
    np.testing.assert_array_equal(np.sort(image.ravel()), np.sort(values))


def test_projection_keeps_best_and_leaves_empty_as_nan():
    cells = np.array([[0.1, 0.1], [0.1, 0.1], [0.9, 0.9]])
    values = np.array([1.0, 5.0, np.nan])
    image = plots.project_to_image(cells, values, 2, np.zeros(2), np.ones(2))
    assert image[0, 0] == 5.0
    assert np.isnan(image[1, 1]) and np.isnan(image[0, 1])


def test_one_d_is_a_strip_and_bins_are_inferred():
    cells = _grid(7, 1)
    image = plots.project_to_image(cells, np.arange(7.0), 7, np.zeros(1), np.ones(1))
    assert image.shape == (1, 7)
    assert plots.bins_per_dim(_grid(5, 2)) == 5
    cvt = np.random.default_rng(0).uniform(size=(100, 2))
    assert plots.bins_per_dim(cvt) == 10


def test_heatmap_png_for_4d(tmp_path):
    class A:
        centroids = _grid(2, 4)
        fitnesses = np.where(np.arange(16) % 3 == 0, -np.inf, np.arange(16.0))

    meta = {
        "env": "ant_uni",
        "descriptor_names": ["leg_1", "leg_2", "leg_3", "leg_4"],
        "descriptor_low": [0.0] * 4,
        "descriptor_high": [1.0] * 4,
    }
    plots.plot_archive_heatmap(A, meta, tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
