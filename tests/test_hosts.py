"""Runs over several hosts: two local CPU processes, one device each, stand
for two hosts (jax's multi-controller runtime over its CPU collectives)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from lpd import devices
from lpd.cli import main
from lpd.errors import LpdError

LPD = [sys.executable, "-c", "from lpd.cli import console; console()"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _on_two_processes(*args: str) -> list[subprocess.CompletedProcess]:
    """``lpd <args>`` as processes 0 and 1 of one run; waits for both."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_PLATFORMS": "cpu",
        "LPD_COORDINATOR": f"127.0.0.1:{_free_port()}",
        "LPD_NUM_PROCESSES": "2",
    }
    running = [
        subprocess.Popen(
            [*LPD, *args],
            env={**env, "LPD_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    done = []
    for process in running:
        out, err = process.communicate(timeout=900)
        done.append(
            subprocess.CompletedProcess(process.args, process.returncode, out, err)
        )
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    return done


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_codec(work, expected):
    """The codec stage of ``work`` logged and encoded as ``expected``'s."""
    assert _rows(work / "codec/metrics.jsonl") == _rows(
        expected / "codec/metrics.jsonl"
    )
    with (
        np.load(work / "codec/latents.npz") as a,
        np.load(expected / "codec/latents.npz") as b,
    ):
        np.testing.assert_array_equal(a["latents"], b["latents"])


@pytest.mark.brax
@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(
    tiny_archive, tiny_codec, tiny_config_path, tmp_path
):
    work = tmp_path / "w"
    flags = ["--config", tiny_config_path, "--workdir", str(work)]
    archive = _on_two_processes("archive", *flags)
    assert "2 devices, 2 processes" in archive[0].stdout
    assert "archive: written to" in archive[0].stdout
    # Logs and progress bars come from process 0 only.
    assert "platform:" not in archive[1].stdout
    assert "written to" not in archive[1].stdout
    assert "archive:" in archive[0].stderr and "archive:" not in archive[1].stderr
    assert _rows(work / "archive/metrics.jsonl") == _rows(
        tiny_archive / "archive/metrics.jsonl"
    )
    _on_two_processes("train-codec", *flags)
    _assert_same_codec(work, tiny_codec)

    # Interrupted between its two checkpoints: both processes restore step 20
    # and finish as the uninterrupted run did.
    (work / "codec/meta.json").unlink()
    shutil.rmtree(work / "codec/checkpoints/40")
    resumed = _on_two_processes("train-codec", *flags)
    assert "resuming from step 20" in resumed[0].stderr
    _assert_same_codec(work, tiny_codec)
    assert not list(work.rglob("*.tmp"))  # Process 1 wrote nothing there.


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--coordinator", "127.0.0.1:1234"], "missing: LPD_NUM_PROCESSES, LPD_PROC"),
        (["--num-processes", "2", "--process-id", "0"], "missing: LPD_COORDINATOR"),
        (
            ["--coordinator", "h:1", "--num-processes", "two", "--process-id", "0"],
            "must be whole numbers",
        ),
        (
            ["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
            "must lie in [0, 1]",
        ),
        (
            ["--coordinator", "host", "--num-processes", "2", "--process-id", "0"],
            "must be host:port",
        ),
    ],
)
def test_bad_host_flags_fail_in_one_line(
    capsys, tiny_config_path, tmp_path, flags, fragment
):
    args = ["archive", "--config", tiny_config_path, "--workdir", str(tmp_path / "w")]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()


def test_host_settings_come_from_the_environment_too(monkeypatch):
    monkeypatch.setenv("LPD_COORDINATOR", "127.0.0.1:1234")
    with pytest.raises(LpdError, match="missing: LPD_NUM_PROCESSES, LPD_PROCESS_ID"):
        devices.start_hosts()
    monkeypatch.setenv("LPD_NUM_PROCESSES", "2")
    with pytest.raises(LpdError, match="missing: LPD_PROCESS_ID"):
        devices.start_hosts(process_id=None)
