"""The text stage on the tiny pipeline: labels, embeddings, text-conditioned
sampling, the text metric, user label files and errors."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpd import archive, archive_io, generator, labels, rollouts
from lpd import policy as policy_lib
from lpd.cli import main


def test_labels_cover_every_elite_and_pair_with_their_embeddings(tiny_run):
    text_dir = tiny_run / "text"
    idx, _ = archive_io.elites(archive_io.load_archive(tiny_run)[0])
    entries = json.loads((text_dir / "labels.json").read_text())["labels"]
    assert [e["cell"] for e in entries] == [int(i) for i in idx]
    texts = [e["texts"] for e in entries]
    assert all(len(t) == labels.PHRASINGS for t in texts)
    meta = json.loads((text_dir / "meta.json").read_text())
    fell = sum("fall over" in " ".join(t) for t in texts)
    assert meta["labels"] == {"source": "automatic", "episodes": 2, "fell": fell}
    with np.load(text_dir / "embeddings.npz") as e:
        assert len(e["pair_elite"]) == len(e["pair_text"]) == meta["texts"]
        pairs = [
            (int(i), str(e["texts"][j]))
            for i, j in zip(e["pair_elite"], e["pair_text"], strict=True)
        ]
        norms = np.linalg.norm(e["embeddings"], axis=1)
    assert pairs == [(i, t) for i, ts in enumerate(texts) for t in ts]
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)


def test_report_has_the_text_metric(tiny_run):
    report = json.loads((tiny_run / "report" / "report.json").read_text())
    text = report["text"]
    names = report["descriptor_names"]
    assert [p["prompt"] for p in text["prompts"]] == [
        p["prompt"] for p in labels.metric_prompts(names)
    ]
    assert text["samples_per_prompt"] == 4
    for row in text["prompts"]:
        for key in ("in_region", "descriptor_in_region", "archive_in_region"):
            assert 0.0 <= row[key] <= 1.0
        assert np.isfinite(row["mean_return"])
    assert "Text metric" in (tiny_run / "report" / "report.md").read_text()


def test_text_conditioned_sampling_shapes(tiny_run):
    gen = generator.load_generator(tiny_run, text=True)
    sample = generator.make_sample_fn(gen)
    cond = jax.random.normal(jax.random.key(1), (3, generator.TEXT_DIM))
    flat = sample(cond, jax.random.key(0), jnp.float32(1.0))
    layout = gen.archive_meta["layout"]
    assert {p: x.shape for p, x in flat.items()} == {
        p: (3, *s) for p, s in layout.items()
    }
    assert all(np.isfinite(np.asarray(x)).all() for x in flat.values())


def test_sample_text_writes_policies_deterministically(tiny_run, tmp_path, capsys):
    args = ["sample", "--workdir", str(tiny_run), "--text", " hop on the left foot "]
    for name in ("a.npz", "b.npz"):
        assert main([*args, "--num", "2", "--out", str(tmp_path / name)]) == 0
    assert "wrote 2 policies" in capsys.readouterr().out
    layout = json.loads((tiny_run / "archive/meta.json").read_text())["layout"]
    with np.load(tmp_path / "a.npz") as a, np.load(tmp_path / "b.npz") as b:
        assert set(a.files) == set(layout) | {"texts", "metadata"}
        assert list(a["texts"]) == ["hop on the left foot"] * 2
        for path, shape in layout.items():
            assert a[path].shape == (2, *shape)
            np.testing.assert_array_equal(a[path], b[path])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--text", "   "], "give non-empty text"),
        (["--text", "hop", "--descriptor", "0.5,0.5"], "not both"),
    ],
)
def test_sample_text_errors(tiny_run, tmp_path, capsys, extra, fragment):
    out = tmp_path / "x.npz"
    code = main(["sample", "--workdir", str(tiny_run), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err, err
    assert not out.exists()


def _trained_copy(tiny_run, tmp_path):
    workdir = tmp_path / "w"
    for stage in ("archive", "codec", "diffusion"):
        shutil.copytree(tiny_run / stage, workdir / stage)
    return workdir


def test_user_label_file_replaces_the_automatic_labels(
    tiny_run, tiny_config_path, tmp_path
):
    workdir = _trained_copy(tiny_run, tmp_path)
    idx, _ = archive_io.elites(archive_io.load_archive(workdir)[0])
    mine = tmp_path / "mine.json"
    texts = [[f"move like number {i}", "my own words"] for i in range(len(idx))]
    labels.write_labels(mine, idx, texts)
    argv = ["train-text", "--config", tiny_config_path, "--workdir", str(workdir)]
    assert main([*argv, f"--config.text.labels_file={mine}"]) == 0
    assert labels.read_labels(workdir / "text" / "labels.json", idx) == texts
    meta = json.loads((workdir / "text" / "meta.json").read_text())
    assert meta["labels"] == {"source": str(mine)}
    assert meta["texts"] == 2 * len(idx) and meta["distinct_texts"] == len(idx) + 1


def test_a_label_file_missing_elites_is_refused(
    tiny_run, tiny_config_path, tmp_path, capsys
):
    workdir = _trained_copy(tiny_run, tmp_path)
    idx, _ = archive_io.elites(archive_io.load_archive(workdir)[0])
    mine = tmp_path / "mine.json"
    labels.write_labels(mine, idx[1:], [["a text"]] * (len(idx) - 1))
    argv = ["train-text", "--config", tiny_config_path, "--workdir", str(workdir)]
    assert main([*argv, f"--config.text.labels_file={mine}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no text for 1 elites" in err and "\n" not in err
    assert not (workdir / "text" / "model").exists()


def test_episode_fraction_is_an_extra_output(tiny_archive):
    data, meta = archive_io.load_archive(tiny_archive)
    _, flat = archive_io.elites(data)
    env, policy = archive.make_task(meta)
    params = policy_lib.unflatten_params({p: x[:4] for p, x in flat.items()})
    make = lambda **kw: jax.jit(
        rollouts.make_episodes_eval_fn(env, policy, meta["episode_length"], 2, 4, **kw)
    )
    key = jax.random.key(3)
    returns, descriptors = make()(params, key)
    returns2, descriptors2, fraction = make(episode_fraction=True)(params, key)
    np.testing.assert_array_equal(returns, returns2)
    np.testing.assert_array_equal(descriptors, descriptors2)
    assert fraction.shape == (4,)
    # At least one step of each episode counts; never more than all of them.
    assert np.all(fraction >= 1 / meta["episode_length"]) and np.all(fraction <= 1)


def test_interrupted_text_stage_resumes_to_the_same_model(
    tiny_run, tiny_config_path, tmp_path, run_killed_after
):
    from lpd.config import load_config
    from lpd.text_stage import run_text_stage

    workdir = _trained_copy(tiny_run, tmp_path)
    config = load_config(tiny_config_path)
    run_killed_after(20, lambda: run_text_stage(config, workdir))
    assert not (workdir / "text" / "meta.json").exists()
    run_text_stage(config, workdir)
    for name in ("labels.json", "metrics.jsonl"):
        assert (workdir / "text" / name).read_text() == (
            tiny_run / "text" / name
        ).read_text(), name
    resumed = generator.load_generator(workdir, text=True).denoiser_params
    whole = generator.load_generator(tiny_run, text=True).denoiser_params
    jax.tree.map(np.testing.assert_array_equal, resumed, whole)
