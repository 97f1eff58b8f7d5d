"""`lpd train-diffusion` and `lpd sample` on the tiny pipeline (Brax for the sweep)."""

import json
import shutil

import numpy as np
import pytest

from lpd import diffusion_stage, generator, logs
from lpd.cli import main
from lpd.config import load_config

pytestmark = pytest.mark.brax


def test_stage_writes_model_sweep_and_meta(tiny_diffusion):
    directory = tiny_diffusion / "diffusion"
    meta = json.loads((directory / "meta.json").read_text())
    sweep = json.loads((directory / "guidance_sweep.json").read_text())
    assert [r["guidance"] for r in sweep["rows"]] == [0.0, 2.0]
    assert sweep["picked"] == meta["guidance"]
    best = min(sweep["rows"], key=lambda r: r["measure_error"])
    assert best["guidance"] == sweep["picked"]
    assert all(np.isfinite(r["mean_return"]) for r in sweep["rows"])
    assert (
        meta["denoiser_params"] > 0 and not (directory / "meta.partial.json").exists()
    )
    rows = logs.read_metrics(directory)
    assert [r["step"] for r in rows] == [20, 40]


def test_resume_equals_uninterrupted(
    tiny_diffusion, tiny_config_path, tmp_path, run_killed_after, caplog
):
    for stage in ("archive", "codec"):
        shutil.copytree(tiny_diffusion / stage, tmp_path / stage)
    config = load_config(tiny_config_path)
    run_killed_after(20, lambda: diffusion_stage.run_diffusion_stage(config, tmp_path))
    with caplog.at_level("INFO"):
        diffusion_stage.run_diffusion_stage(config, tmp_path)
    assert "resuming from step 20" in caplog.text  # Not a fresh start.
    assert logs.read_metrics(tmp_path / "diffusion") == logs.read_metrics(
        tiny_diffusion / "diffusion"
    )
    a = json.loads((tmp_path / "diffusion/guidance_sweep.json").read_text())
    b = json.loads((tiny_diffusion / "diffusion/guidance_sweep.json").read_text())
    assert a == b


def test_sample_writes_policies_deterministically(tiny_diffusion, tmp_path, capsys):
    args = ["sample", "--workdir", str(tiny_diffusion), "--descriptor", "0.2,0.8"]
    assert main(args + ["--num", "3", "--out", str(tmp_path / "a.npz")]) == 0
    assert main(args + ["--num", "3", "--out", str(tmp_path / "b.npz")]) == 0
    archive_meta = json.loads((tiny_diffusion / "archive/meta.json").read_text())
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert set(a.files) == set(archive_meta["layout"]) | {"descriptors", "metadata"}
        for path, shape in archive_meta["layout"].items():
            assert a[path].shape == (3, *shape)
            np.testing.assert_array_equal(a[path], b[path])
        np.testing.assert_allclose(a["descriptors"], [[0.2, 0.8]] * 3, rtol=1e-6)
        meta = json.loads(str(a["metadata"]))
        assert meta["env"] == "walker2d_uni" and meta["steps"] == 10
    rows = np.array([[0.1, 0.9], [0.5, 0.5]])
    np.savetxt(tmp_path / "d.csv", rows, delimiter=",")
    code = main(
        [
            "sample",
            "--workdir",
            str(tiny_diffusion),
            "--descriptors-file",
            str(tmp_path / "d.csv"),
            "--num",
            "2",
            "--steps",
            "10",
            "--guidance",
            "1",
            "--out",
            str(tmp_path / "c.npz"),
        ]
    )
    assert code == 0
    with np.load(tmp_path / "c.npz") as c:
        np.testing.assert_allclose(c["descriptors"], np.repeat(rows, 2, axis=0))


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--descriptor", "0.2"], "has 2"),
        (["--descriptor", "0.2,1.7"], "must lie in"),
        (["--descriptor", "a,b"], "not comma-separated numbers"),
        ([], "exactly one of"),
        (["--descriptor", "0.2,0.2", "--steps", "0"], "--steps must lie"),
        (["--descriptor", "0.2,0.2", "--sampler", "euler"], "unknown sampler"),
    ],
)
def test_sample_errors(tiny_diffusion, tmp_path, capsys, extra, fragment):
    out = tmp_path / "x.npz"
    code = main(["sample", "--workdir", str(tiny_diffusion), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lpd: error:") and fragment in err, err
    assert not out.exists()


def test_sample_needs_a_trained_denoiser(tiny_codec, tmp_path, capsys):
    code = main(
        [
            "sample",
            "--workdir",
            str(tiny_codec),
            "--descriptor",
            "0.5,0.5",
            "--out",
            str(tmp_path / "x.npz"),
        ]
    )
    assert code == 2 and "no complete diffusion stage" in capsys.readouterr().err


def test_diffusion_needs_a_codec(tiny_config_path, tmp_path, capsys):
    code = main(
        ["train-diffusion", "--config", tiny_config_path, "--workdir", str(tmp_path)]
    )
    assert code == 2 and "no complete codec" in capsys.readouterr().err
    assert not (tmp_path / "diffusion").exists()


def test_diffusion_refuses_latents_without_reevaluated_returns(
    tiny_codec, tiny_config_path, tmp_path, capsys
):
    # A codec made before latents.npz carried the elites' re-evaluated returns:
    # refused when they are asked for.
    for stage in ("archive", "codec"):
        shutil.copytree(tiny_codec / stage, tmp_path / stage)
    path = tmp_path / "codec/latents.npz"
    with np.load(path) as data:
        old = {k: data[k] for k in data.files if k != "returns"}
    np.savez(path, **old)
    argv = ["train-diffusion", "--config", tiny_config_path, "--workdir", str(tmp_path)]
    code = main([*argv, "--config.diffusion.return_source=reevaluated"])
    err = capsys.readouterr().err
    assert code == 2 and "predates" in err and "lpd train-codec" in err
    assert not (tmp_path / "diffusion").exists() and path.exists()
    code = main([*argv, "--config.diffusion.return_source=best"])
    assert code == 2 and "return_source must be one of" in capsys.readouterr().err
    code = main([*argv, "--config.diffusion.return_dropout=1.5"])
    assert code == 2 and "return_dropout must lie in" in capsys.readouterr().err


def test_ranked_returns_come_from_the_source_asked():
    latents = {"fitnesses": np.array([3.0, 1.0]), "returns": np.array([1.0, 2.0])}
    for source, key in (("stored", "fitnesses"), ("reevaluated", "returns")):
        returns = diffusion_stage.ranked_returns(latents, source, "w")
        np.testing.assert_array_equal(returns, latents[key])


def test_artifacts_load_with_another_device_count(tiny_diffusion):
    # Written with two host devices; read where there is one (a GPU host, a
    # plain Python session). Orbax alone refuses the other topology.
    import os
    import subprocess
    import sys

    code = (
        "import jax, sys; from lpd import archive_io, generator; "
        "assert len(jax.devices()) == 1; "
        "archive_io.load_archive(sys.argv[1]); "
        "generator.load_generator(sys.argv[1])"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_diffusion)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_checkpoints_from_before_the_conditioner_rename_load(tiny_diffusion, tmp_path):
    # Denoisers saved while the conditioner was `DescriptorConditioner_0`.
    import jax

    from lpd import checkpoints, generator

    work = tmp_path / "w"
    for stage in ("archive", "codec", "diffusion"):
        shutil.copytree(tiny_diffusion / stage, work / stage)
    current = generator.load_generator(work).denoiser_params
    inner = dict(current["params"])
    inner[generator.LEGACY_CONDITIONER] = inner.pop("conditioner")
    checkpoints.save_tree(work / "diffusion" / "model", {"ema": {"params": inner}})
    loaded = generator.load_generator(work).denoiser_params
    assert jax.tree.structure(loaded) == jax.tree.structure(current)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(current), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_return_quantiles_rank_returns_among_descriptor_neighbours():
    # Two clusters far apart; ranks are within each elite's 3 nearest.
    descriptors = np.array(
        [[0.0, 0.0], [0.01, 0.0], [0.02, 0.0], [0.9, 0.9], [0.91, 0.9], [0.92, 0.9]]
    )
    returns = np.array([5.0, 1.0, 3.0, 100.0, 300.0, 200.0])
    q = diffusion_stage.return_quantiles(descriptors, returns, 3)
    np.testing.assert_allclose(q, [1.0, 0.0, 0.5, 0.0, 1.0, 0.5])
    conditions, groups = diffusion_stage.training_conditions(descriptors, returns, 3)
    assert groups == (2, 1) and conditions.shape == (6, 3)
    np.testing.assert_allclose(conditions[:, 2], q)
    assert diffusion_stage.training_conditions(descriptors, returns, 0)[1] == ()
    assert np.all(
        diffusion_stage.return_quantiles(descriptors[:1], returns[:1], 3) == 1
    )


def test_sample_asks_for_a_return(tiny_diffusion, tmp_path, capsys):
    import json as json_lib

    out = tmp_path / "top.npz"
    argv = ["sample", "--workdir", str(tiny_diffusion), "--descriptor", "0.2,0.8"]
    assert main([*argv, "--num", "3", "--return", "top", "--out", str(out)]) == 0
    with np.load(out) as data:
        assert json_lib.loads(str(data["metadata"]))["return"] == 1.0
        top = data["params/Dense_0/kernel"]
    plain = tmp_path / "plain.npz"
    assert main([*argv, "--num", "3", "--out", str(plain)]) == 0
    with np.load(plain) as data:
        assert not np.allclose(data["params/Dense_0/kernel"], top)
    for bad in ("2", "best", "nan"):
        capsys.readouterr()
        assert main([*argv, "--return", bad, "--out", str(tmp_path / "x.npz")]) == 2
        assert "--return" in capsys.readouterr().err


def test_fourier_conditioned_denoiser_trains_and_samples(
    tiny_codec, tiny_config_path, tmp_path
):
    for stage in ("archive", "codec"):
        shutil.copytree(tiny_codec / stage, tmp_path / stage)
    config = load_config(tiny_config_path, ["--config.diffusion.cond_frequencies=3"])
    diffusion_stage.run_diffusion_stage(config, tmp_path)
    # lpd sample rebuilds the denoiser from the stage's config.json: the
    # widened first layer of the conditioner must load and sample.
    out = tmp_path / "s.npz"
    args = ["sample", "--workdir", str(tmp_path), "--descriptor", "0.2,0.8"]
    assert main(args + ["--num", "2", "--out", str(out)]) == 0
    with np.load(out) as a:
        assert all(np.isfinite(a[p]).all() for p in a.files if p != "metadata")
    gen = generator.load_generator(tmp_path)
    kernel = gen.denoiser_params["params"]["conditioner"]["Dense_0"]["kernel"]
    assert kernel.shape[0] == 2 * (1 + 2 * 3)  # Two descriptor numbers.
