"""Evaluation metrics on hand-made inputs whose answers are known."""

import math

import jax
import numpy as np
import pytest

from lpd import evaluate_stage, evaluation, report

CENTROIDS = np.array([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
META = {
    "env": "walker2d_uni",
    "backend": "spring",
    "episode_length": 10,
    "descriptor_names": ["foot", "foot_left"],
    "descriptor_low": [0.0, 0.0],
    "descriptor_high": [1.0, 1.0],
    "fitness_offset": 5.0,
}


def _scored(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(10, 20, n), rng.uniform(0, 1, (n, 2))


def test_identical_sets_give_ratios_of_exactly_one():
    original = _scored()
    metrics = evaluation.fidelity(original, original, original[1], CENTROIDS, 5.0)
    for key in ("reward_ratio", "coverage_ratio", "qd_score_ratio"):
        assert metrics[key] == 1.0, key
    assert metrics["measure_error"] == 0.0
    assert abs(metrics["js_divergence"]) < 1e-9


def test_empty_generated_archive_has_zero_coverage():
    original = _scored()
    empty = (np.zeros(0), np.zeros((0, 2)))
    metrics = evaluation.fidelity(original, empty, np.zeros((0, 2)), CENTROIDS, 5.0)
    assert metrics["coverage_ratio"] == 0.0
    assert metrics["qd_score_ratio"] == 0.0
    assert metrics["generated_cells"] == 0


def test_archive_summary_keeps_the_best_per_cell_with_offset():
    returns = np.array([1.0, 3.0, 2.0])
    achieved = np.array([[0.2, 0.2], [0.3, 0.1], [0.8, 0.9]])  # cells 0, 0, 3
    summary = evaluation.archive_summary(returns, achieved, CENTROIDS, 5.0)
    assert summary["filled_cells"] == 2
    assert summary["qd_score"] == pytest.approx((3.0 + 5.0) + (2.0 + 5.0))
    np.testing.assert_array_equal(
        summary["cell_fitnesses"], [3.0, -np.inf, -np.inf, 2.0]
    )
    assert summary["mean_return"] == pytest.approx(2.0)


def test_js_divergence_of_shifted_unit_gaussians_matches_hand_value():
    # Moment-matched JS of N(0, 1) and N(2, 1): the mixture's Gaussian is
    # N(1, 2), each KL is (1/2 + 1/2 - 1 + ln 2) / 2 = ln(2) / 2.
    z = np.random.default_rng(0).normal(size=(4000, 1))
    z = (z - z.mean()) / z.std(ddof=1)
    assert evaluation.js_divergence(z, z + 2.0) == pytest.approx(math.log(2) / 2, 1e-4)
    assert evaluation.js_divergence(z, z) == pytest.approx(0.0, abs=1e-12)


def test_nearest_matches_brute_force():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 7)), rng.normal(size=(9, 7))
    dist, idx = evaluation.nearest(x.astype(np.float32), y.astype(np.float32), k=2)
    brute = np.linalg.norm(x[:, None] - y[None], axis=-1)
    np.testing.assert_array_equal(idx, np.argsort(brute, axis=1)[:, :2])
    np.testing.assert_allclose(dist, np.sort(brute, axis=1)[:, :2], rtol=1e-5)


def test_map_in_batches_pads_folds_keys_and_resumes_from_cache(tmp_path):
    x = np.arange(7.0)
    calls = []

    def fn(batch, key):
        calls.append(len(batch))
        return batch * 2, jax.random.uniform(key, (len(batch),))

    first = evaluation.map_in_batches(fn, x, 3, jax.random.key(0), cache=tmp_path)
    assert calls == [3, 3, 3]  # 7 policies -> 3 padded batches of one shape.
    np.testing.assert_array_equal(first[0], x * 2)
    (tmp_path / "00001.npz").unlink()  # As if interrupted in batch 1.
    again = evaluation.map_in_batches(fn, x, 3, jax.random.key(0), cache=tmp_path)
    assert calls == [3, 3, 3, 3]  # Only the missing batch was computed again.
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_auto_batch_is_bounded_by_memory():
    devices = len(jax.local_devices())
    assert evaluate_stage.choose_batch_size(0, 1000, 100, 100 * 64) == 64
    assert (
        evaluate_stage.choose_batch_size(0, 5, 100, 1e12)
        == math.ceil(5 / devices) * devices
    )
    assert evaluate_stage.choose_batch_size(0, 1000, 100, 1) == devices
    assert evaluate_stage.choose_batch_size(32, 1000, 100, 1) == 32
    # A per-device cap (the CPU's) bounds what memory would allow.
    assert evaluate_stage.choose_batch_size(0, 1000, 100, 1e12, 4) == 4 * devices
    assert evaluate_stage.choose_batch_size(0, 1000, 100, 100 * 64, 10**6) == 64


def _results(same: bool):
    asked = _scored(8, seed=2)[1]
    original = _scored(8, seed=3)
    other = original if same else _scored(8, seed=4)
    uniform_asked = _scored(5, seed=5)[1]
    uniform = (*_scored(5, seed=6), np.ones(5), np.arange(5))
    return report.Results(
        asked=asked,
        original=original,
        codec_only=other,
        generated=(*other, np.full(8, 2.0), np.arange(8)),
        uniform_asked=uniform_asked,
        uniform=uniform,
        elite_distances=np.full(8, 4.0),
    )


SIZES = {
    "num_elites": 8,
    "params_per_policy": 100,
    "archive_params": 800,
    "archive_bytes": 3200,
    "model_params": {"decoder": 30, "standardiser": 10, "denoiser": 60, "total": 100},
    "model_bytes": {"decoder": 120, "standardiser": 40, "denoiser": 240, "total": 400},
}

TOP_KEYS = {
    "reward_ratio",
    "coverage_ratio",
    "qd_score_ratio",
    "js_divergence",
    "measure_error",
    "compression_ratio",
    "compression_ratio_bytes",
    "num_elites",
    "params_per_policy",
    "model_params",
    "uniform",
    "codec_only",
    "novelty",
    "env",
}


def test_shortfall_counts_the_asks_that_lose_most_of_their_reward():
    original = np.array([100.0, 200.0, 100.0, -5.0])  # The last is left out.
    returns = np.array([100.0, 50.0, 110.0, -50.0])
    f = evaluation.shortfall(original, returns)
    assert f["share"] == pytest.approx(1 / 3)
    assert f["reward_lost"] == pytest.approx(150 / 400)
    assert f["reward_ratio_without"] == pytest.approx(210 / 200)
    assert evaluation.shortfall(original, original)["reward_lost"] == 0
    assert evaluation.shortfall(-original[:1], returns[:1]) is None


def test_report_schema_and_known_values(tmp_path):
    summary = report.summarise(_results(same=True), CENTROIDS, META, SIZES)
    assert TOP_KEYS <= set(summary)
    assert summary["reward_ratio"] == 1.0 and summary["coverage_ratio"] == 1.0
    assert summary["compression_ratio"] == 8.0
    assert summary["shortfall"]["share"] == 0.0
    assert summary["codec_only"]["compression_ratio"] == 20.0
    assert summary["compression_ratio_bytes"] == 8.0
    novelty = summary["novelty"]
    assert novelty["weight_distance"]["q50"] == pytest.approx(2.0)
    assert novelty["weight_distance_over_elite_spacing"] == pytest.approx(0.5)
    assert novelty["nearest_elite_is_asked_fraction"] == 1.0
    for key in ("reward_ratio", "coverage_ratio", "measure_error", "nearest_elite"):
        assert key in summary["uniform"]
    summary.update(
        text=_text_summary(),
        episodes=2,
        guidance=1.0,
        sample_steps=10,
        wall_time_s={"archive": 1.0, "evaluate": 2.0},
    )
    report.write(tmp_path, summary, _results(same=False), CENTROIDS, META)
    for name in ("report.json", "report.md", "heatmaps.png", "descriptors.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    markdown = (tmp_path / "report.md").read_text()
    assert "| generated (diffusion) | 1.000 | 1.000 |" in markdown
    assert "| b | yes | 0.33 | 4 | 0.00 | 0.50 |" in markdown
    assert "keeping less than" not in markdown  # Nothing was lost.
    summary["shortfall"] = evaluation.shortfall(np.array([1.0, 2.0]), np.ones(2) / 2)
    assert (
        "Generated policies keeping less than 0.5 of their elite's return: 50.0% "
        "of the asks, which lose 50.0% of the elites' total return; on the other "
        "asks the reward ratio is 0.500." in report.to_markdown(summary)
    )
    # A set that gained overall still names the asks that fell.
    summary["shortfall"] = evaluation.shortfall(
        np.array([1.0, 2.0]), np.array([0.4, 3])
    )
    assert (
        "Generated policies keeping less than 0.5 of their elite's return: 50.0% "
        "of the asks, which lose 20.0% of the elites' total return; on the other "
        "asks the reward ratio is 1.500." in report.to_markdown(summary)
    )
    # The top-return row gets its own line: one of its 8 asks fell.
    results = _results(same=True)
    returns = results.original[0].copy()
    returns[0] *= 0.25
    top = (returns, results.original[1], np.ones(8), np.arange(8))
    top_summary = report.summarise(
        results._replace(top_return=top), CENTROIDS, META, SIZES
    )
    summary["top_return"] = top_summary["top_return"]
    assert summary["top_return"]["shortfall"]["share"] == 1 / 8
    lost = 0.75 * results.original[0][0] / results.original[0].sum()
    assert (
        "Top-return policies keeping less than 0.5 of their elite's return: 12.5% "
        f"of the asks, which lose {100 * lost:.1f}% of the elites' total return; on "
        "the other asks the reward ratio is 1.000." in report.to_markdown(summary)
    )


def _text_summary():
    """Two prompts, three policies each; the expected figures are in the test
    below."""
    prompts = [
        {"prompt": "a", "paraphrase": False, "low": [0.7, 0.0], "high": [1.0, 0.3]},
        {"prompt": "b", "paraphrase": True, "low": [0.0, 0.0], "high": [0.3, 0.3]},
    ]
    achieved = np.array(
        [[0.8, 0.1], [0.9, 0.2], [0.5, 0.1], [0.1, 0.1], [0.9, 0.9], [0.5, 0.5]]
    )
    returns = np.arange(6.0)
    by_text = (returns, achieved, np.zeros(6), np.zeros(6, int))
    by_descriptor = (returns + 10, achieved[::-1], np.zeros(6), np.zeros(6, int))
    original = (np.zeros(4), np.array([[0.8, 0.1], [0.2, 0.2], [0.1, 0.3], [0.5, 0]]))
    return report.text_summary(prompts, 3, by_text, by_descriptor, original)


def test_text_summary_counts_policies_in_each_prompt_region():
    t = _text_summary()
    a, b = t["prompts"]
    assert a["in_region"] == pytest.approx(2 / 3) and b["in_region"] == pytest.approx(
        1 / 3
    )
    assert a["mean_return"] == 1.0 and b["mean_return"] == 4.0
    # Reversed: prompt a gets [0.5,0.5],[0.9,0.9],[0.1,0.1]; b gets the first three.
    assert a["descriptor_in_region"] == 0.0 and b["descriptor_in_region"] == 0.0
    assert a["descriptor_mean_return"] == 11.0 and b["descriptor_mean_return"] == 14.0
    assert a["archive_in_region"] == 0.25 and b["archive_in_region"] == 0.5
    assert t["in_region"] == pytest.approx(0.5)
    assert t["in_region_label_phrases"] == pytest.approx(2 / 3)
    assert t["in_region_paraphrases"] == pytest.approx(1 / 3)
    assert t["archive_in_region"] == pytest.approx(0.375)
