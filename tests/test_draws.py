"""Denoiser draws (`benchmarks/bench_draws.py`) on the tiny pipeline."""

import json

import numpy as np
import pytest

from conftest import tree_digest
from lpd import diffusion_stage, draws, logs
from lpd.config import load_config
from lpd.errors import LpdError

pytestmark = pytest.mark.brax


def test_draws_take_the_workdirs_own_and_train_others(
    tiny_run, tiny_config_path, tmp_path
):
    config = load_config(tiny_config_path)
    scratch = tmp_path / "draws"
    result = draws.run_draws(config, tiny_run, scratch, 2)
    first, second = result["draws"]
    report = json.loads((tiny_run / "report/report.json").read_text())
    # Draw 0 is the workdir's own denoiser and report, taken, not trained again.
    assert first["guidance"] == report["guidance"]
    for name, source in (("generated", report), ("uniform", report["uniform"])):
        assert first[name] == {m: source[m] for m in draws.METRICS}
    assert logs.read_metrics(scratch / "draw0/diffusion") == logs.read_metrics(
        tiny_run / "diffusion"
    )
    # Draw 1 is another training draw of the same config.
    losses = [
        [r["loss"] for r in logs.read_metrics(scratch / f"draw{i}/diffusion")]
        for i in (0, 1)
    ]
    assert len(losses[0]) == len(losses[1]) and losses[0] != losses[1]
    meta = json.loads((scratch / "draw1/diffusion/meta.json").read_text())
    assert meta["draw"] == 1
    for name in draws.SETS:
        for metric in draws.METRICS:
            values = [first[name][metric], second[name][metric]]
            got = result["summary"][name][metric]
            assert got["mean"] == pytest.approx(np.mean(values))
            assert got["std"] == pytest.approx(np.std(values, ddof=1))
            assert (got["min"], got["max"]) == (min(values), max(values))
    # Run again: every draw is complete, nothing is trained or evaluated anew.
    before = {
        i: tree_digest(scratch / f"draw{i}" / s)
        for i in (0, 1)
        for s in ("diffusion", "report")
    }
    again = draws.run_draws(config, tiny_run, scratch, 2)
    assert again == result
    assert before == {
        i: tree_digest(scratch / f"draw{i}" / s)
        for i in (0, 1)
        for s in ("diffusion", "report")
    }
    # A draw's workdir does not pass for another draw.
    with pytest.raises(LpdError, match="holds denoiser draw 1, not 0"):
        diffusion_stage.run_diffusion_stage(config, scratch / "draw1")


def test_draws_refuse_what_they_cannot_use(
    tiny_run, tiny_diffusion, tiny_config_path, tmp_path
):
    config = load_config(tiny_config_path)
    with pytest.raises(LpdError, match="not a complete text stage"):
        draws.run_draws(config, tiny_diffusion, tmp_path / "a", 1)
    other = load_config(tiny_config_path, ["--config.codec.latent_dim=4"])
    with pytest.raises(LpdError, match="made with another config .*latent_dim"):
        draws.run_draws(other, tiny_run, tmp_path / "b", 1)
    with pytest.raises(LpdError, match="inside the workdir"):
        draws.run_draws(config, tiny_run, tiny_run / "draws", 1)
    with pytest.raises(LpdError, match="at least 1"):
        draws.run_draws(config, tiny_run, tmp_path / "c", 0)
    assert not any((tmp_path / d).exists() for d in "abc")
