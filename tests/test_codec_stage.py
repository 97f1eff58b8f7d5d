"""`lpd train-codec` on the tiny archive: report, latents, resume (Brax)."""

import json
import shutil

import jax
import numpy as np
import pytest

from lpd import codec_stage, logs
from lpd.config import load_config

pytestmark = pytest.mark.brax


def _workdir_with_archive(tiny_archive, path):
    shutil.copytree(tiny_archive / "archive", path / "archive")
    return path


@pytest.fixture
def codec_run(tiny_codec):
    return tiny_codec


def test_report_latents_and_meta(codec_run):
    directory = codec_run / "codec"
    report = json.loads((directory / "reconstruction.json").read_text())
    meta = json.loads((directory / "meta.json").read_text())
    archive_meta = json.loads((codec_run / "archive/meta.json").read_text())
    num = archive_meta["num_elites"]
    assert report["archive_elites"] == meta["num_elites"] == num
    assert set(report["relative_error"]) == set(archive_meta["layout"])
    assert all(np.isfinite(v) and v >= 0 for v in report["relative_error"].values())
    for key in ("reward_ratio", "coverage_ratio", "measure_error"):
        assert np.isfinite(report[key]) and report[key] >= 0
    assert 0 < report["generated_cells"] and 0 < report["original_cells"] <= num
    assert report["decoder_params"] == meta["decoder_params"] > 0
    assert report["archive_params"] == num * report["params_per_policy"]
    with np.load(directory / "latents.npz", allow_pickle=False) as data:
        latents = data["latents"]
        assert latents.shape == (num, meta["latent_dim"])
        np.testing.assert_allclose(latents.std(), 1.0, rtol=1e-4)
        assert float(data["scale"]) == pytest.approx(meta["latent_scale"])
        assert data["cells"].shape == (num,)
        # The originals' returns of the closing check, whose mean it reports.
        assert data["returns"].shape == (num,)
        assert float(data["returns"].mean()) == pytest.approx(
            report["original_mean_return"], rel=1e-5
        )
    rows = logs.read_metrics(directory)
    assert [r["step"] for r in rows] == [20, 40]
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_resume_equals_uninterrupted(
    codec_run, tiny_archive, tiny_config_path, tmp_path, run_killed_after, caplog
):
    workdir = _workdir_with_archive(tiny_archive, tmp_path)
    config = load_config(tiny_config_path)
    run_killed_after(20, lambda: codec_stage.run_codec_stage(config, workdir))
    assert not (workdir / "codec/meta.json").exists()
    with caplog.at_level("INFO"):
        codec_stage.run_codec_stage(config, workdir)
    assert "resuming from step 20" in caplog.text  # Not a fresh start.
    for name in ("latents", "descriptors", "cells", "returns"):
        with (
            np.load(workdir / "codec/latents.npz") as a,
            np.load(codec_run / "codec/latents.npz") as b,
        ):
            np.testing.assert_array_equal(a[name], b[name])
    assert logs.read_metrics(workdir / "codec") == logs.read_metrics(
        codec_run / "codec"
    )


def test_codec_needs_an_archive_and_same_config(codec_run, tiny_config_path, tmp_path):
    from lpd.cli import main

    assert (
        main(["train-codec", "--config", tiny_config_path, "--workdir", str(tmp_path)])
        == 2
    )
    assert not (tmp_path / "codec").exists()
    code = main(
        [
            "train-codec",
            "--config",
            tiny_config_path,
            "--workdir",
            str(codec_run),
            "--config.codec.latent_dim=4",
        ]
    )
    assert code == 2
    assert jax.device_count() == 2  # the sharded path is what these tests ran
