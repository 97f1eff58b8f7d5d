"""CLI errors: one line on stderr, exit status 2, nothing overwritten."""

import json

import numpy as np
import pytest

from lpd.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code, err, fragment):
    assert code == 2
    assert err.startswith("lpd: error:") and "\n" not in err
    assert fragment in err, err


def test_unknown_env_writes_nothing(capsys, tiny_config_path, tmp_path):
    code, err = _run(
        capsys,
        "archive",
        "--config",
        tiny_config_path,
        "--workdir",
        str(tmp_path / "w"),
        "--config.archive.env=cartpole_uni",
    )
    _assert_one_line_error(code, err, "unknown env 'cartpole_uni'")
    assert not (tmp_path / "w").exists()


def test_config_typo_names_close_match(capsys, tiny_config_path, tmp_path):
    code, err = _run(
        capsys,
        "archive",
        "--config",
        tiny_config_path,
        "--workdir",
        str(tmp_path),
        "--config.archive.emiter=pga_me",
    )
    _assert_one_line_error(code, err, "did you mean 'emitter'")


def test_unknown_flag_and_missing_config(capsys, tmp_path):
    code, err = _run(
        capsys, "archive", "--config", "nope.py", "--workdir", str(tmp_path)
    )
    _assert_one_line_error(code, err, "config file not found")
    code, err = _run(
        capsys, "export-archive", "--workdir", "w", "--out", "a.npz", "--x"
    )
    _assert_one_line_error(code, err, "unrecognised arguments: --x")


def test_iterations_must_fill_whole_chunks(capsys, tiny_config_path, tmp_path):
    code, err = _run(
        capsys,
        "archive",
        "--config",
        tiny_config_path,
        "--workdir",
        str(tmp_path),
        "--config.archive.num_iterations=5",
    )
    _assert_one_line_error(code, err, "multiple of archive.log_period")


def test_workdir_with_other_config_is_refused(capsys, tiny_archive, tiny_config_path):
    config_file = tiny_archive / "archive" / "config.json"
    before = config_file.read_text()
    code, err = _run(
        capsys,
        "archive",
        "--config",
        tiny_config_path,
        "--workdir",
        str(tiny_archive),
        "--config.archive.num_iterations=8",
    )
    _assert_one_line_error(code, err, "archive.num_iterations: 4 -> 8")
    assert config_file.read_text() == before


def test_export_errors(capsys, tiny_archive, tmp_path):
    code, err = _run(
        capsys, "export-archive", "--workdir", str(tmp_path), "--out", "a.npz"
    )
    _assert_one_line_error(code, err, "no complete archive")
    existing = tmp_path / "have.npz"
    existing.write_bytes(b"precious")
    code, err = _run(
        capsys, "export-archive", "--workdir", str(tiny_archive), "--out", str(existing)
    )
    _assert_one_line_error(code, err, "already exists")
    assert existing.read_bytes() == b"precious"


def test_corrupt_checkpoint_is_reported(
    capsys, tiny_archive, tiny_config_path, tmp_path
):
    directory = tmp_path / "archive"
    directory.mkdir()
    (directory / "config.json").write_text(
        (tiny_archive / "archive/config.json").read_text()
    )
    step = directory / "checkpoints" / "2"
    (step / "default").mkdir(parents=True)
    (step / "default" / "garbage").write_bytes(b"\x00" * 10)
    code, err = _run(
        capsys, "archive", "--config", tiny_config_path, "--workdir", str(tmp_path)
    )
    _assert_one_line_error(code, err, "corrupt")


def test_corrupt_archive_is_reported(capsys, tiny_archive, tmp_path):
    import shutil

    shutil.copytree(tiny_archive / "archive", tmp_path / "archive")
    for f in (tmp_path / "archive" / "repertoire").rglob("*"):
        if f.is_file():
            f.write_bytes(b"junk")
    code, err = _run(
        capsys,
        "export-archive",
        "--workdir",
        str(tmp_path),
        "--out",
        str(tmp_path / "x.npz"),
    )
    _assert_one_line_error(code, err, "missing or corrupt")
    assert not (tmp_path / "x.npz").exists()


@pytest.fixture
def exported(tiny_archive, tmp_path):
    out = tmp_path / "good.npz"
    assert (
        main(["export-archive", "--workdir", str(tiny_archive), "--out", str(out)]) == 0
    )
    with np.load(out, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _write(tmp_path, arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


def test_import_round_trip_and_refuses_existing_archive(capsys, exported, tmp_path):
    npz = _write(tmp_path, exported)
    assert main(["import-archive", "--npz", npz, "--workdir", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "archive" / "heatmap.png").exists()
    meta = (tmp_path / "w" / "archive" / "meta.json").read_text()
    code, err = _run(
        capsys, "import-archive", "--npz", npz, "--workdir", str(tmp_path / "w")
    )
    _assert_one_line_error(code, err, "already holds an archive")
    assert (tmp_path / "w" / "archive" / "meta.json").read_text() == meta


def _first_elite(arrays, key, value):
    """``arrays`` with ``value`` written into the first filled cell of ``key``."""
    changed = np.array(arrays[key], dtype=np.float32)
    changed[np.flatnonzero(np.isfinite(arrays["fitnesses"]))[0]] = value
    return {**arrays, key: changed}


def _metadata_with(arrays, **changes):
    meta = json.loads(str(arrays["metadata"]))
    meta.update(changes)
    return {**arrays, "metadata": np.asarray(json.dumps(meta))}


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (
            lambda a: {k: v for k, v in a.items() if k != "centroids"},
            "lacks keys ['centroids']",
        ),
        (
            lambda a: {**a, "descriptors": a["descriptors"][:, :1]},
            "'descriptors' has shape",
        ),
        (lambda a: {**a, "fitnesses": a["fitnesses"][:-1]}, "'descriptors' has shape"),
        (
            lambda a: {k: v for k, v in a.items() if k != "params/Dense_1/bias"},
            "do not match the layout",
        ),
        (
            lambda a: {**a, "params/Dense_0/kernel": a["params/Dense_0/kernel"][:, :3]},
            "'params/Dense_0/kernel' has shape",
        ),
        (lambda a: {**a, "metadata": np.asarray("{not json")}, "not JSON"),
        (lambda a: _metadata_with(a, env="cartpole_uni"), "unknown env"),
        (lambda a: {**a, "fitnesses": np.full_like(a["fitnesses"], np.nan)}, "NaN"),
        (lambda a: _first_elite(a, "fitnesses", np.inf), "+inf"),
        (lambda a: {**a, "fitnesses": a["fitnesses"].astype(str)}, "must hold numbers"),
        (
            lambda a: {**a, "fitnesses": np.full_like(a["fitnesses"], -np.inf)},
            "every cell is empty",
        ),
        (lambda a: _first_elite(a, "descriptors", np.nan), "'descriptors'"),
        (lambda a: _first_elite(a, "descriptors", 1.5), "lie in [0, 1]"),
        (lambda a: _first_elite(a, "params/Dense_0/kernel", np.nan), "NaN or inf"),
        (lambda a: _metadata_with(a, episode_length=-5), "episode_length"),
        (lambda a: _metadata_with(a, episode_length="250"), "episode_length"),
        (lambda a: _metadata_with(a, backend="bullet"), "unknown backend"),
        (
            lambda a: _metadata_with(a, policy={"hidden_sizes": [0]}),
            "hidden_sizes",
        ),
        (lambda a: {}, "lacks keys"),
    ],
)
def test_import_rejects_bad_npz(capsys, exported, tmp_path, mutate, fragment):
    npz = _write(tmp_path, mutate(dict(exported)))
    code, err = _run(
        capsys, "import-archive", "--npz", npz, "--workdir", str(tmp_path / "w")
    )
    _assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "w" / "archive").exists()


def test_import_refuses_a_file_that_is_not_an_npz(capsys, tmp_path):
    fake = tmp_path / "notes.npz"
    fake.write_text("just text, renamed")
    code, err = _run(
        capsys, "import-archive", "--npz", str(fake), "--workdir", str(tmp_path / "w")
    )
    _assert_one_line_error(code, err, "is not an npz file")
    assert "pickle" not in err and not (tmp_path / "w" / "archive").exists()


def test_import_reads_an_older_obs_std_normaliser(tmp_path):
    from lpd import archive, archive_io

    # An archive of the format before the log-scale normaliser.
    meta = archive.describe_env(
        {
            "env": "hopper_uni",
            "backend": "spring",
            "episode_length": 20,
            "policy": {"hidden_sizes": [4], "normalise_obs": True},
        }
    )
    cells, rng = 3, np.random.default_rng(0)
    arrays = {
        p.replace("obs_log_std", "obs_std"): rng.uniform(0.5, 2.0, (cells, *s))
        for p, s in meta["layout"].items()
    }
    arrays.update(
        fitnesses=np.array([1.0, -np.inf, 2.0]),
        descriptors=np.array([[0.1], [0.0], [0.9]]),
        centroids=np.array([[0.1], [0.5], [0.9]]),
        metadata=np.asarray(json.dumps(meta)),
    )
    np.savez(tmp_path / "old.npz", **arrays)
    imported = archive.import_archive(tmp_path / "old.npz", tmp_path / "w")
    data, _ = archive_io.load_archive(tmp_path / "w")
    log_std = np.asarray(data.params["params"]["obs_log_std"])
    np.testing.assert_allclose(
        np.exp(log_std[[0, 2]]), arrays["params/obs_std"][[0, 2]], rtol=1e-6
    )
    assert imported["num_elites"] == 2 and np.all(log_std[1] == 0)
