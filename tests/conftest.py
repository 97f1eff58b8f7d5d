"""Test setup: two XLA host devices (so the sharded path is exercised), CPU only,
and a compilation cache shared by the whole suite."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# One persistent compilation cache for every test and every lpd process a
# test launches (they inherit the environment). Its key leaves out the
# interpreter and the paths of the installed packages, so the suites CI runs
# on Python 3.12 and 3.13 after 3.11's reuse its compiles.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # noqa: E402

CONFIGS = ROOT / "experiments" / "configs"


@pytest.fixture(scope="session")
def tiny_config_path() -> str:
    return str(CONFIGS / "tiny.py")


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory, tiny_config_path):
    """A workdir holding a completed tiny archive run (compiled once per session)."""
    from lpd import archive
    from lpd.config import load_config

    workdir = tmp_path_factory.mktemp("tiny")
    archive.run_archive_stage(load_config(tiny_config_path), workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_codec(tiny_archive, tiny_config_path, tmp_path_factory):
    """A workdir with the tiny archive and a trained tiny codec."""
    import shutil

    from lpd import codec_stage
    from lpd.config import load_config

    workdir = tmp_path_factory.mktemp("codec")
    shutil.copytree(tiny_archive / "archive", workdir / "archive")
    codec_stage.run_codec_stage(load_config(tiny_config_path), workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_diffusion(tiny_codec, tiny_config_path, tmp_path_factory):
    """A workdir with the tiny archive, codec and trained denoiser."""
    import shutil

    from lpd import diffusion_stage
    from lpd.config import load_config

    workdir = tmp_path_factory.mktemp("diffusion")
    for stage in ("archive", "codec"):
        shutil.copytree(tiny_codec / stage, workdir / stage)
    diffusion_stage.run_diffusion_stage(load_config(tiny_config_path), workdir)
    return workdir


@pytest.fixture(scope="session")
def tiny_run(tiny_diffusion, tiny_config_path, tmp_path_factory):
    """``lpd run`` on a copy of the tiny diffusion workdir: the three trained
    stages are complete (and skipped), train-text and evaluate run; returns
    the workdir."""
    import shutil

    from lpd.cli import main

    workdir = tmp_path_factory.mktemp("run")
    for stage in ("archive", "codec", "diffusion"):
        shutil.copytree(tiny_diffusion / stage, workdir / stage)
    code = main(["run", "--config", tiny_config_path, "--workdir", str(workdir)])
    assert code == 0
    return workdir


class Killed(Exception):
    """Stands for the process being killed."""


@pytest.fixture
def run_killed_after():
    """``run_killed_after(step, fn)``: runs ``fn()``, killing it right after the
    metrics of ``step`` are logged (so after that step's checkpoint)."""
    from lpd import logs

    def run(step, fn):
        real_write = logs.MetricsWriter.write

        def write_then_die(self, logged_step, metrics):
            real_write(self, logged_step, metrics)
            if logged_step == step:
                raise Killed

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(logs.MetricsWriter, "write", write_then_die)
            with pytest.raises(Killed):
                fn()

    return run


def assert_one_line_error(code, err, fragment):
    """The CLI's contract for bad input: exit 2, one line naming the problem."""
    assert code == 2, err
    assert err.startswith("lpd: error:") and "\n" not in err, err
    assert fragment in err, err


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit status, stderr)`` of ``lpd`` run in this process."""
    from lpd.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err.strip()

    return run


def tree_digest(directory) -> dict:
    """``{relative path: bytes}`` of every file under ``directory``."""
    directory = Path(directory)
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }
