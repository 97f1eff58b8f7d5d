"""What a hostile but realistic user tried: nothing they have is lost or
overwritten, every documented option works, bad input gets one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import assert_one_line_error, tree_digest
from lpd import archive, archive_io, evaluation, generator, workdir
from lpd.errors import LpdError

STAGES = ("codec", "diffusion", "text", "report")


@pytest.fixture
def imported(tiny_run, tmp_path, cli):
    """A workdir whose archive was imported from the tiny run's export, and
    whose later stages are copies of the tiny run's (trained on that archive)."""
    npz = tmp_path / "tiny.npz"
    assert cli("export-archive", "--workdir", tiny_run, "--out", npz)[0] == 0
    work = tmp_path / "w"
    assert cli("import-archive", "--npz", npz, "--workdir", work)[0] == 0
    return work


# 1. An imported archive is used, never replaced.


def test_run_after_import_keeps_the_imported_archive(
    imported, tiny_run, tiny_config_path, cli, caplog
):
    for stage in STAGES:
        shutil.copytree(tiny_run / stage, imported / stage)
    before = tree_digest(imported / "archive")
    with caplog.at_level("INFO"):
        code, err = cli(
            "run",
            "--config",
            tiny_config_path,
            "--workdir",
            imported,
            "--config.archive.num_iterations=8",  # Ignored: the archive is imported.
        )
    assert code == 0, err
    assert "config.archive is not used" in caplog.text
    assert tree_digest(imported / "archive") == before


def test_stage_refuses_to_overwrite_a_result_it_did_not_make(
    imported, tiny_codec, tiny_config_path, cli
):
    codec = imported / "codec"
    shutil.copytree(tiny_codec / "codec", codec)
    (codec / "config.json").unlink()  # A complete result from elsewhere.
    before = tree_digest(codec)
    code, err = cli("train-codec", "--config", tiny_config_path, "--workdir", imported)
    assert_one_line_error(code, err, "did not make")
    assert tree_digest(codec) == before


# 5. NaN is not a descriptor, a guidance scale or an eta.


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["sample", "--descriptor", "nan,0.5"], "finite"),
        (["sample", "--descriptor", "0.2,0.8", "--guidance", "nan"], "--guidance"),
        (["sample", "--descriptor", "0.2,0.8", "--eta", "nan"], "--eta"),
        (["sample", "--descriptor", "0.2,0.8", "--eta", "-1"], "--eta"),
        (["sample", "--descriptor", "0.2,0.8", "--seed", "-1"], "--seed"),
        (["sample", "--descriptor", "0.2,0.8", "--seed", str(2**40)], "--seed"),
        (["sample", "--descriptor", "0.2,0.8", "--num", "0"], "--num"),
        (["sample", "--descriptor", "0.2,0.8", "--num", str(10**9)], "GiB"),
        (["sample", "--text", "hop", "--return", "top"], "not with --text"),
        (["render", "--descriptor", "nan,0.5"], "finite"),
        (["sequence", "--descriptors", "0.2,0.8;nan,0.5"], "finite"),
        (["sequence", "--descriptors", "0.2,0.8", "--seeds", "0"], "--seeds"),
    ],
)
def test_bad_asks_are_refused(tiny_run, tmp_path, cli, argv, fragment):
    suffix = {"sample": ".npz", "render": ".html", "sequence": ""}[argv[0]]
    out = tmp_path / f"out{suffix}"
    code, err = cli(*argv, "--workdir", tiny_run, "--out", out)
    assert_one_line_error(code, err, fragment)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "rows, fragment",
    [
        (np.array([[0.2, np.nan]]), "finite"),
        (np.zeros((0, 2)), "[K, 2]"),
        (np.zeros((2, 2, 2)), "[K, 2]"),
        (np.array([["a", "b"]]), "numbers"),
        (np.array([[0.2, 1.5]]), "lie in"),
    ],
)
def test_bad_descriptor_files_are_refused(tiny_run, tmp_path, cli, rows, fragment):
    path = tmp_path / "asks.npy"
    np.save(path, rows)
    out = tmp_path / "p.npz"
    code, err = cli(
        "sample", "--workdir", tiny_run, "--descriptors-file", path, "--out", out
    )
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_empty_text_descriptor_file_is_refused(tiny_run, tmp_path, cli):
    path = tmp_path / "asks.txt"
    path.write_text("")
    code, err = cli(
        "sample", "--workdir", tiny_run, "--descriptors-file", path, "--out", "x.npz"
    )
    assert_one_line_error(code, err, "[K, 2]")


# 7. An interrupted import can be finished.


def test_import_leaves_nothing_when_it_fails_midway(
    tiny_run, tmp_path, cli, monkeypatch
):
    npz = tmp_path / "a.npz"
    cli("export-archive", "--workdir", tiny_run, "--out", npz)
    work = tmp_path / "w"
    real_save = archive_io.save_archive

    def save_then_die(directory, *args, **kwargs):
        real_save(directory, *args, **kwargs)
        raise KeyboardInterrupt  # Killed after the repertoire and meta.json.

    with monkeypatch.context() as patch:
        patch.setattr(archive_io, "save_archive", save_then_die)
        assert cli("import-archive", "--npz", npz, "--workdir", work)[0] == 130
    assert not (work / "archive").exists() and not (work / "archive.tmp").exists()
    assert cli("import-archive", "--npz", npz, "--workdir", work)[0] == 0
    assert archive_io.load_meta(work)["num_elites"] > 0


def test_import_finishes_what_an_older_interrupted_import_left(tiny_run, tmp_path, cli):
    npz = tmp_path / "a.npz"
    cli("export-archive", "--workdir", tiny_run, "--out", npz)
    work = tmp_path / "w"
    shutil.copytree(tiny_run / "archive" / "repertoire", work / "archive/repertoire")
    assert cli("import-archive", "--npz", npz, "--workdir", work)[0] == 0
    # An unfinished search is not an import's to replace.
    search = tmp_path / "s"
    (search / "archive").mkdir(parents=True)
    (search / "archive" / "config.json").write_text("{}")
    code, err = cli("import-archive", "--npz", npz, "--workdir", search)
    assert_one_line_error(code, err, "unfinished archive search")
    assert (search / "archive" / "config.json").read_text() == "{}"


# 8. Bad input is refused before anything is written.


def test_bad_labels_file_writes_nothing(
    tiny_diffusion, tiny_config_path, tmp_path, cli
):
    work = tmp_path / "w"
    for stage in ("archive", "codec", "diffusion"):
        shutil.copytree(tiny_diffusion / stage, work / stage)
    labels = tmp_path / "labels.json"
    labels.write_text('{"labels": [{"cell": 0}]}')
    code, err = cli(
        "train-text",
        "--config",
        tiny_config_path,
        "--workdir",
        work,
        f"--config.text.labels_file={labels}",
    )
    assert_one_line_error(code, err, "cannot read labels")
    assert not (work / "text").exists()


@pytest.mark.parametrize(
    "stage, overrides, fragment",
    [
        ("train-diffusion", ["diffusion.num_heads=3"], "must divide"),
        ("train-diffusion", ["diffusion.cond_frequencies=-1"], "cond_frequencies"),
        ("archive", ["archive.grid_shape=(0,5)"], "grid_shape"),
        ("archive", ["archive.grid_shape=(-2,5)"], "grid_shape"),
        (
            "archive",
            ["archive.tessellation=cvt", "archive.num_cvt_cells=0"],
            "num_cvt_cells",
        ),
        ("archive", ["archive.policy_hidden_sizes=(0,)"], "hidden_sizes"),
        ("archive", ["archive.iso_sigma=nan"], "finite"),
        ("archive", ["archive.scoring_episodes=0"], "scoring_episodes"),
        (
            "archive",
            ["archive.emitter=pga_me", "archive.scoring_episodes=2"],
            "map_elites",
        ),
        # The tiny batch of 16 cannot hold DCRL-ME's default 64 + 64.
        ("archive", ["archive.emitter=dcrl_me"], "sum below archive.batch_size"),
        (
            "archive",
            [
                "archive.emitter=dcrl_me",
                "archive.dcrl.dcrl_batch_size=4",
                "archive.dcrl.ai_batch_size=4",
                "archive.normalise_obs=true",
            ],
            "normalise_obs=false",
        ),
        # One iteration's 16 episodes of the tiny config's length overflow it.
        (
            "archive",
            ["archive.emitter=pga_me", "archive.pga.replay_buffer_size=100"],
            "pga.replay_buffer_size (100)",
        ),
        (
            "archive",
            [
                "archive.emitter=dcrl_me",
                "archive.dcrl.dcrl_batch_size=4",
                "archive.dcrl.ai_batch_size=4",
                "archive.search_episode_length=20000",
            ],
            "dcrl.replay_buffer_size (200000)",
        ),
        ("archive", ["seed=-3"], "config.seed"),
        ("train-codec", ["codec.latent_dim=0"], "latent_dim"),
        ("evaluate", ["evaluate.memory_fraction=0"], "memory_fraction"),
    ],
)
def test_bad_config_writes_nothing(
    tiny_config_path, tmp_path, cli, stage, overrides, fragment
):
    work = tmp_path / "w"
    flags = [f"--config.{o}" for o in overrides]
    code, err = cli(stage, "--config", tiny_config_path, "--workdir", work, *flags)
    assert_one_line_error(code, err, fragment)
    assert not work.exists()


def test_config_must_return_a_config_dict(tmp_path, cli):
    path = tmp_path / "mine.py"
    path.write_text("def get_config():\n    return {'seed': 0}\n")
    code, err = cli("archive", "--config", path, "--workdir", tmp_path / "w")
    assert_one_line_error(code, err, "ConfigDict")


# 9. One lpd command writes a workdir at a time.


def test_second_command_on_a_busy_workdir_is_refused(tiny_config_path, tmp_path, cli):
    with workdir.lock(tmp_path):
        code, err = cli("archive", "--config", tiny_config_path, "--workdir", tmp_path)
    assert_one_line_error(code, err, f"pid {os.getpid()}")
    assert not (tmp_path / "archive").exists()


def test_lock_dies_with_a_killed_process(tmp_path):
    code = (
        "import sys, time; from lpd import workdir\n"
        "with workdir.lock(sys.argv[1]):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LpdError, match="in use"):
        with workdir.lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir.lock(tmp_path):  # Free again.
        pass


# 10. Sampling is bounded in memory whatever --num asks.


def test_sampling_runs_in_chunks_of_one_compile(tiny_run, tmp_path, monkeypatch):
    made = []
    real_make = generator.make_sample_fn

    def recording_make(*args, **kwargs):
        made.append(real_make(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(generator, "make_sample_fn", recording_make)
    per_policy = 4 * archive_io.load_meta(tiny_run)["policy"]["params_per_policy"]
    monkeypatch.setattr(generator, "CHUNK_BYTES", 4 * per_policy)  # 4 per call.
    options = {"guidance": None, "steps": None, "eta": None, "sampler": "ddim"}
    asks = np.array([[0.2, 0.8], [0.6, 0.1]], np.float32)
    outs = []
    for name in ("a.npz", "b.npz"):
        out, num = generator.sample_to_npz(
            tiny_run, asks, 5, {**options, "seed": 3}, tmp_path / name
        )
        assert num == 10
        with np.load(out) as data:
            outs.append({k: data[k] for k in data.files})
    assert made[0]._cache_size() == 1  # Three calls (4 + 4 + 2 padded), one compile.
    kernel = outs[0]["params/Dense_0/kernel"]
    assert kernel.shape[0] == 10 and np.all(np.abs(kernel).sum(axis=(1, 2)) > 0)
    assert len({kernel[i].tobytes() for i in range(10)}) == 10
    for key in outs[0]:
        np.testing.assert_array_equal(outs[0][key], outs[1][key])


# 11. One line where there used to be a traceback.


@pytest.mark.parametrize("where", ["file", "under_file", "unwritable"])
def test_unusable_workdir_is_one_line(tiny_config_path, tmp_path, cli, where):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    path = {
        "file": blocker,
        "under_file": blocker / "w",
        "unwritable": "/sys/lpd_test_workdir",  # Read-only even for root.
    }[where]
    code, err = cli(
        "archive", "--config", tiny_config_path, "--workdir", path, "--config.seed=1"
    )
    assert code == 2 and "\n" not in err and err.startswith("lpd: error:"), err
    assert blocker.read_text() == "mine"


def test_empty_workdir_name_is_refused(tiny_config_path, cli):
    code, err = cli("archive", "--config", tiny_config_path, "--workdir", "")
    assert_one_line_error(code, err, "--workdir is empty")


def test_out_under_a_file_is_one_line(tiny_run, tmp_path, cli):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    for argv in (
        ["sample", "--descriptor", "0.2,0.8", "--out", blocker / "p.npz"],
        ["export-archive", "--out", blocker / "a.npz"],
        ["render", "--elite", "0", "--out", blocker / "e.html"],
    ):
        code, err = cli(*argv, "--workdir", tiny_run)
        assert_one_line_error(code, err, "is a file")
    assert blocker.read_text() == "mine"


def test_truncated_latents_are_one_line(tiny_run, tiny_config_path, tmp_path, cli):
    work = tmp_path / "w"
    for stage in ("archive", "codec", "diffusion", "text"):
        shutil.copytree(tiny_run / stage, work / stage)
    latents = work / "codec" / "latents.npz"
    latents.write_bytes(latents.read_bytes()[:100])
    code, err = cli("evaluate", "--config", tiny_config_path, "--workdir", work)
    assert_one_line_error(code, err, "latents.npz is missing or corrupt")


def test_corrupt_checkpoint_prints_one_line_and_nothing_after(tiny_archive, tmp_path):
    # Missing data files make the checkpoint library's threads report on a
    # closed event loop while the process ends; the user sees our line only.
    work = tmp_path / "w"
    shutil.copytree(tiny_archive / "archive", work / "archive")
    for d in list((work / "archive" / "repertoire").rglob("d")):
        shutil.rmtree(d)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lpd.cli",
            "export-archive",
            "--workdir",
            str(work),
            "--out",
            str(tmp_path / "x.npz"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    lines = [
        line
        for line in done.stderr.splitlines()
        if "warn" not in line.lower() and "warp" not in line
    ]
    assert done.returncode == 2
    assert lines == [lines[-1]] and "missing or corrupt" in lines[-1], done.stderr


def test_late_event_loop_reports_are_dropped_and_others_kept(monkeypatch):
    # What makes the line above the only one, deterministically: the storage
    # library's late reads report "Event loop is closed" as unraisable.
    from lpd import checkpoints

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpoints._quiet_late_reads()

    class RaisesOnDelete:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    RaisesOnDelete(RuntimeError("Event loop is closed"))
    RaisesOnDelete(RuntimeError("something else"))
    RaisesOnDelete(ValueError("Event loop is closed"))
    assert [(type(u.exc_value), str(u.exc_value)) for u in seen] == [
        (RuntimeError, "something else"),
        (ValueError, "Event loop is closed"),
    ]


# 12. Smaller things.


def test_atomic_path_leaves_old_file_or_new_one(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with workdir.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert path.read_text() == "old" and not tmp.exists()
    (tmp_path / "f.txt.tmp").write_text("left by kill -9")
    workdir.write_text(path, "new")
    assert path.read_text() == "new" and not (tmp_path / "f.txt.tmp").exists()


def test_stage_clock_sums_sessions(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    first = workdir.StageClock(tmp_path)
    now[0] += 30.0
    first.save()  # The session is then killed.
    now[0] += 5.0
    second = workdir.StageClock(tmp_path)
    now[0] += 12.0
    assert second.total() == 42.0


def test_ratios_are_none_without_a_positive_denominator():
    centroids = np.array([[0.25], [0.75]], np.float32)
    original = (np.array([-10.0, -30.0]), np.array([[0.2], [0.7]]))
    generated = (np.array([-20.0, -20.0]), np.array([[0.2], [0.7]]))
    m = evaluation.fidelity(original, generated, original[1], centroids, 50.0)
    assert m["reward_ratio"] is None  # The originals' mean return is -20.
    assert m["offset_reward_ratio"] == pytest.approx((-20 + 50) / (-20 + 50))
    assert m["coverage_ratio"] == 1.0
    json.dumps(m, allow_nan=False)  # Valid JSON: no NaN.
    shifted = (original[0] + 25.0, original[1])
    m = evaluation.fidelity(shifted, generated, original[1], centroids, 50.0)
    assert m["reward_ratio"] == pytest.approx(-20 / 5)
    assert m["offset_reward_ratio"] == pytest.approx(30 / 55)


def test_import_archive_still_reads_the_stage(imported):
    data, meta = archive_io.load_archive(imported)
    assert meta["source"].startswith("imported from")
    assert not (imported / "archive" / "config.json").exists()
    assert archive._imported(imported / "archive")


def test_report_rows_say_n_a_for_undefined_ratios():
    from lpd import report

    m = {
        "reward_ratio": None,
        "offset_reward_ratio": 0.93,
        "coverage_ratio": 1.0,
        "qd_score_ratio": 0.9,
        "js_divergence": 0.01,
        "measure_error": 0.1,
    }
    row = report._row("generated", m, 20.0)
    assert row.startswith("| generated | n/a | 0.930 | 1.000 | 0.900 |")


def test_run_refuses_a_workdir_without_disk_for_the_archive(
    cli, tiny_config_path, tmp_path, monkeypatch
):
    import collections

    from lpd import pipeline
    from lpd.config import load_config

    need = archive.disk_bytes(load_config(tiny_config_path))
    assert 3 * 25 * 100 * 4 < need < shutil.disk_usage(tmp_path).free  # 25 cells.
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(1, 1, need - 1))
    workdir = tmp_path / "new" / "w"
    code, err = cli("run", "--config", tiny_config_path, "--workdir", workdir)
    assert_one_line_error(code, err, "GiB of disk")
    assert not (tmp_path / "new").exists()  # Nothing written.
