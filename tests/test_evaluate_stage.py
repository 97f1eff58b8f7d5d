"""The evaluation stage on the tiny pipeline: report, resume, render, errors."""

import json
import shutil

import numpy as np
import pytest

from lpd.cli import main
from lpd.config import load_config
from lpd.evaluate_stage import run_evaluate_stage


def _report(workdir):
    report = json.loads((workdir / "report" / "report.json").read_text())
    report.pop("wall_time_s")
    return report


def test_run_skips_trained_stages_and_writes_the_report(tiny_run, tiny_diffusion):
    for stage in ("archive", "codec", "diffusion"):  # Skipped: left as they were.
        assert (tiny_run / stage / "meta.json").read_text() == (
            tiny_diffusion / stage / "meta.json"
        ).read_text()
    report = _report(tiny_run)
    archive_meta = json.loads((tiny_run / "archive" / "meta.json").read_text())
    assert report["num_elites"] == archive_meta["num_elites"]
    assert report["episodes"] == 2
    assert report["compression_ratio"] == pytest.approx(
        report["archive_params"] / report["model_params"]["total"]
    )
    for section in (report, report["codec_only"], report["uniform"]):
        assert 0.0 <= section["coverage_ratio"] and section["reward_ratio"] > 0
        assert np.isfinite(section["js_divergence"])
    assert report["uniform"]["num_conditions"] == 8
    assert 0 < report["novelty"]["weight_distance"]["q50"]
    for name in ("report.md", "heatmaps.png", "descriptors.png", "returns.png"):
        assert (tiny_run / "report" / name).stat().st_size > 0, name
    assert (tiny_run / "report" / "meta.json").exists()


def test_interrupted_evaluation_resumes_to_the_same_report(
    tiny_run, tiny_config_path, tmp_path
):
    workdir = tmp_path / "w"
    shutil.copytree(tiny_run, workdir)
    parts = workdir / "report" / "parts"
    # As if killed while scoring the uniform sweep.
    (workdir / "report" / "meta.json").unlink()
    (workdir / "report" / "report.json").unlink()
    shutil.rmtree(parts / "uniform")
    kept = (parts / "original" / "00000.npz").stat().st_mtime_ns
    run_evaluate_stage(load_config(tiny_config_path), workdir)
    assert (parts / "original" / "00000.npz").stat().st_mtime_ns == kept
    assert _report(workdir) == _report(tiny_run)


def test_evaluate_refuses_a_changed_config(tiny_run, tiny_config_path, capsys):
    code = main(
        [
            "evaluate",
            "--config",
            tiny_config_path,
            "--workdir",
            str(tiny_run),
            "--config.evaluate.episodes=3",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "evaluate.episodes: 2 -> 3" in err


def test_evaluate_needs_a_trained_generator(tiny_codec, tiny_config_path, capsys):
    code = main(
        ["evaluate", "--config", tiny_config_path, "--workdir", str(tiny_codec)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "run `lpd train-diffusion`" in err and "\n" not in err


@pytest.mark.parametrize(
    "args",
    [["--elite", "0"], ["--descriptor", "0.5,0.5", "--seed", "1"]],
)
def test_render_writes_a_brax_viewer(tiny_run, tmp_path, capsys, args):
    out = tmp_path / "episode.html"
    code = main(["render", "--workdir", str(tiny_run), *args, "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    html = out.read_text()
    assert "<html" in html.lower() and "viewer" in html
    assert "steps, return" in printed


def test_render_draws_pictures_that_need_no_network(tiny_run, tmp_path, capsys):
    from PIL import Image

    from lpd import render

    for suffix in (".png", ".gif"):
        out = tmp_path / f"episode{suffix}"
        argv = ["render", "--workdir", str(tiny_run), "--elite", "0", "--out", out]
        assert main([str(a) for a in argv]) == 0
        steps = int(capsys.readouterr().out.split(": ")[-1].split(" steps")[0])
        with Image.open(out) as picture:
            if suffix == ".png":  # A filmstrip of its frames side by side.
                assert picture.size[0] > 4 * picture.size[1]
            else:  # Every step up to GIF_FRAMES, then every k-th.
                assert picture.n_frames == min(steps + 1, render.GIF_FRAMES + 1)
                assert picture.n_frames > 1
        assert not out.with_name(out.name + ".tmp").exists()


def test_body_segments_stand_on_the_ground():
    # A walker at its reset pose: feet on the floor, torso above the hips, each
    # limb as long as its capsule.
    import jax

    from lpd import render
    from lpd.qd import make_env

    env = make_env("walker2d_uni", 10, "spring")
    state = jax.jit(env.reset)(jax.random.key(0)).pipeline_state
    pos, rot = np.asarray(state.x.pos)[None], np.asarray(state.x.rot)[None]
    segments, radii, points, _ = render.body_segments(env.sys, pos, rot)
    assert segments.shape[1] == 7 and points.shape[1] == 0  # Seven capsules.
    ends = segments[0, :, :, 2]  # [capsule, end] heights.
    lowest = np.unravel_index(np.argmin(ends), ends.shape)[0]
    assert 0.0 <= ends.min() - radii[lowest] < 0.05  # A foot just above the floor,
    assert abs(ends[lowest, 0] - ends[lowest, 1]) < 0.01  # lying flat.
    assert ends.max() > 1.0
    tips = segments[0].reshape(-1, 3)  # Limbs join: each end meets another's.
    gaps = np.linalg.norm(tips[:, None] - tips[None], axis=-1) + 9 * np.eye(len(tips))
    assert np.all(gaps.reshape(7, 2, 14).min(axis=(1, 2)) < 1e-3)
    sys = env.sys
    capsules = [g for g, b in enumerate(sys.geom_bodyid) if b > 0]
    lengths = np.linalg.norm(segments[0, :, 1] - segments[0, :, 0], axis=-1)
    np.testing.assert_allclose(
        lengths, 2 * np.asarray(sys.geom_size)[capsules, 1], rtol=1e-5
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        ([], "exactly one of --descriptor and --elite"),
        (["--elite", "0", "--out-name"], "unrecognised arguments"),
        (["--elite", "0", "--descriptor", "0.5,0.5"], "exactly one of"),
        (["--elite", "100000"], "--elite must lie in"),
        (["--descriptor", "0.5"], "descriptors have 1 values"),
        (["--elite", "0", "--out-name"], "unrecognised arguments"),
    ],
)
def test_render_errors(tiny_run, tmp_path, capsys, args, fragment):
    out = tmp_path / "x.html"
    code = main(["render", "--workdir", str(tiny_run), *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err
    assert not out.exists()


def test_render_keeps_an_existing_file(tiny_run, tmp_path, capsys):
    out = tmp_path / "x.html"
    out.write_text("mine")
    code = main(
        ["render", "--workdir", str(tiny_run), "--elite", "0", "--out", str(out)]
    )
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_generate_program_compiles_once_over_batches(tiny_diffusion):
    # Sample, decode, nearest elite: one compile serves every batch (the last
    # one padded); the guidance scale and the top-return ask are arguments.
    # The rollout is the one that scores the elites: compiled once for both.
    import functools

    import jax
    import jax.numpy as jnp

    from lpd import archive, archive_io, evaluate_stage, evaluation, generator, rollouts

    gen = generator.load_generator(tiny_diffusion)
    data, meta = archive_io.load_archive(tiny_diffusion)
    cells, flat = archive_io.elites(data)
    env, policy = archive.make_task(meta)
    eval_fn = rollouts.make_episodes_eval_fn(env, policy, meta["episode_length"], 1, 4)
    score = evaluate_stage.make_score_fn(eval_fn)
    ask_fn = evaluate_stage.make_ask_fn(gen)
    generate = evaluate_stage.make_generate_fn(ask_fn, score)
    elites = evaluation.flat_vectors({p: jnp.asarray(x) for p, x in flat.items()})
    asks = np.asarray(data.descriptors)[cells][:10]
    assert len(asks) > 8  # Three batches of four.
    assert gen.returns  # Descriptor-only and top-return asks: one program.
    evaluation.map_in_batches(score, flat, 4, jax.random.key(0))
    for guidance, top in ((0.0, False), (2.0, True)):
        returns, achieved, _, nearest = evaluation.map_in_batches(
            functools.partial(
                generate,
                guidance=jnp.float32(guidance),
                elites=elites,
                top=jnp.bool_(top),
            ),
            asks,
            4,
            jax.random.key(0),
        )
        assert returns.shape == (len(asks),) and achieved.shape == asks.shape
        assert np.all((nearest >= 0) & (nearest < len(cells)))
    assert ask_fn._cache_size() == 1
    assert score.rollout._cache_size() == 1


def test_report_has_top_return_and_baseline_rows(tiny_run):
    report = _report(tiny_run)
    keys = {"reward_ratio", "coverage_ratio", "qd_score_ratio", "measure_error"}
    assert keys | {"shortfall"} <= set(report["top_return"])
    noise, mean = (report["baselines"][n] for n in ("elite_noise", "neighbour_mean"))
    for baseline in (noise, mean):
        assert keys <= set(baseline) and keys <= set(baseline["uniform"])
        assert baseline["original_cells"] == report["original_cells"]
    # The noise is scaled to the generated policies' distance from the elites.
    params = report["params_per_policy"]
    median = report["novelty"]["weight_distance"]["q50"]
    assert noise["sigma"] == pytest.approx(median / np.sqrt(params), rel=1e-5)
    assert mean["k"] in (2, 3, 4) and set(mean["uniform_qd_score_by_k"]) == {
        "2",
        "3",
        "4",
    }
    markdown = (tiny_run / "report" / "report.md").read_text()
    for row in (
        "| generated, top return asked |",
        "| baseline: elite + noise |",
        f"| baseline: mean of {mean['k']} nearest elites |",
        "| uniform sweep: elite + noise |",
    ):
        assert row in markdown


def test_baselines_can_be_left_out(tmp_path):
    # Hand-made policies: "return" = first weight, "descriptor" = first two.
    import jax
    import jax.numpy as jnp

    from lpd import evaluate_stage

    score = lambda f, k: (f["params/w"][:, 0], f["params/w"][:, :2])

    def generate(cond, key):
        return cond[:, 0], cond, jnp.ones(len(cond)), jnp.zeros(len(cond), int)

    w = np.random.default_rng(0).uniform(size=(6, 3)).astype(np.float32)
    for with_baselines in (False, True):
        parts = tmp_path / str(with_baselines)
        s = evaluate_stage.Scoring(
            batch=4,
            parts=parts,
            score=score,
            generate=generate,
            top_generate=None,
            text_generate=None,
            decode=lambda z, _: {"params/w": z},
            elites=jnp.asarray(w),
        )
        results = evaluate_stage._score_sets(
            s,
            ({"params/w": w}, w[:, :2], lambda scored: float(np.sum(scored[0]))),
            w,
            (jax.random.key(0), jax.random.key(1), w[:3, :2]),
            (with_baselines, None),
        )
        scored = {p.name for p in parts.iterdir()}
        assert {"original", "codec", "generated", "uniform"} <= scored
        if with_baselines:
            assert set(results.baselines) == {"elite_noise", "neighbour_mean"}
            assert {"noise_archive", "noise_uniform", "mean2_uniform"} <= scored
        else:
            assert results.baselines is None
            assert not any(n.startswith(("noise", "mean")) for n in scored)


def test_a_dcrl_actor_gets_rows_scored_like_every_set(
    tiny_run, tiny_config_path, tmp_path
):
    from lpd import archive_io
    from lpd import policy as policy_lib

    workdir = tmp_path / "w"
    shutil.copytree(tiny_run, workdir)
    for name in ("meta.json", "report.json"):  # The other sets' parts are kept.
        (workdir / "report" / name).unlink()
    # An actor that is elite 0 whatever the descriptor (zero descriptor rows).
    archive, meta = archive_io.load_archive(workdir)
    cells, flat = archive_io.elites(archive)
    actor = policy_lib.unflatten_params({p: x[0] for p, x in flat.items()})
    first = actor["params"]["Dense_0"]
    dims = len(meta["descriptor_names"])
    first["kernel"] = np.concatenate(
        [first["kernel"], np.zeros((dims, first["kernel"].shape[1]), np.float32)]
    )
    meta["actor"] = archive_io.actor_meta(actor)
    archive_io.save_archive(workdir / "archive", archive, meta, actor=actor)

    run_evaluate_stage(load_config(tiny_config_path), workdir)
    report, before = _report(workdir), _report(tiny_run)
    row = report.pop("dcrl_actor")
    assert report == before  # Every other set is as it was.
    keys = {"reward_ratio", "coverage_ratio", "qd_score_ratio", "measure_error"}
    assert keys <= set(row) and keys <= set(row["uniform"])
    assert row["compression_ratio"] == pytest.approx(
        report["archive_params"] / meta["actor"]["params"]
    )
    # Asked for elite 0's descriptor, the actor is elite 0 on elite 0's episodes.
    parts = workdir / "report" / "parts"
    with (
        np.load(parts / "dcrl_actor" / "00000.npz") as a,
        np.load(parts / "original" / "00000.npz") as o,
    ):
        assert a["arr_0"][0] == pytest.approx(o["arr_0"][0], rel=1e-5)
        assert not np.allclose(a["arr_0"], o["arr_0"])  # The others are not.
    markdown = (workdir / "report" / "report.md").read_text()
    assert "| DCRL-ME actor |" in markdown
    assert "| uniform sweep: DCRL-ME actor |" in markdown

    # The peers comparison reads that report: one entry per method.
    from lpd import report as report_lib
    from lpd.errors import LpdError

    peers = report_lib.peers(workdir, reference=tiny_run)
    methods = peers["methods"]
    assert set(methods) == {
        "archive",
        "lpd_generated",
        "lpd_codec_only",
        "lpd_top_return",
        "dcrl_actor",
        "nearest_elite",
        "elite_noise",
        "neighbour_mean",
    }
    assert methods["dcrl_actor"]["reward_ratio"] == row["reward_ratio"]
    assert (
        methods["dcrl_actor"]["uniform"]["coverage_ratio"]
        == (row["uniform"]["coverage_ratio"])
    )
    assert methods["lpd_generated"]["compression"] == report["compression_ratio"]
    assert (
        methods["nearest_elite"]["uniform"]["qd_score_ratio"]
        == (report["uniform"]["nearest_elite"]["qd_score_ratio"])
    )
    assert methods["dcrl_actor"]["extra_training_s"] == 0.0  # The same search.
    with pytest.raises(LpdError, match="has no DCRL-ME actor"):
        report_lib.peers(tiny_run)
    other = tmp_path / "other"
    (other / "archive").mkdir(parents=True)
    meta_json = json.loads((tiny_run / "archive" / "meta.json").read_text())
    meta_json["config"]["archive"]["episode_length"] += 1
    (other / "archive" / "meta.json").write_text(json.dumps(meta_json))
    with pytest.raises(LpdError, match="archive.episode_length"):
        report_lib.peers(workdir, reference=other)
    meta_json["config"] = None  # As an imported archive's.
    (other / "archive" / "meta.json").write_text(json.dumps(meta_json))
    with pytest.raises(LpdError, match="must come from `lpd archive`"):
        report_lib.peers(workdir, reference=other)
