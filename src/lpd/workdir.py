"""The layout of a workdir: where each stage writes, and how files get there.

A workdir ``W`` holds one directory per stage::

    W/archive/    lpd archive or lpd import-archive  (lpd.archive, lpd.archive_io)
    W/codec/      lpd train-codec                    (lpd.codec_stage)
    W/diffusion/  lpd train-diffusion                (lpd.diffusion_stage)
    W/text/       lpd train-text                     (lpd.text_stage)
    W/report/     lpd evaluate                       (lpd.evaluate_stage)
    W/.lock       held by the lpd command writing W

Each stage directory holds ``config.json`` (the config it was made with),
its artifacts, ``wall_time.json`` while it runs, and ``meta.json``, written
last: its presence marks the stage complete. Every file is written whole or
not at all (:func:`atomic_path`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from lpd import devices
from lpd.config import diff_configs
from lpd.errors import LpdError

STAGE_DIRS = ("archive", "codec", "diffusion", "text", "report")


def check_workdir(workdir) -> Path:
    """``workdir`` as a path; one-line errors for an empty name or a file."""
    if not str(workdir).strip():
        raise LpdError("--workdir is empty: name a directory, e.g. runs/mine")
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise LpdError(f"--workdir {path} is a file, not a directory")
    return path


def stage_dir(workdir, stage: str) -> Path:
    """``<workdir>/<stage>`` for a stage of :data:`STAGE_DIRS`."""
    if stage not in STAGE_DIRS:
        raise ValueError(f"unknown stage directory {stage!r}")
    return Path(workdir) / stage


def archive_dir(workdir) -> Path:
    return stage_dir(workdir, "archive")


def codec_dir(workdir) -> Path:
    return stage_dir(workdir, "codec")


def diffusion_dir(workdir) -> Path:
    return stage_dir(workdir, "diffusion")


def text_dir(workdir) -> Path:
    return stage_dir(workdir, "text")


def report_dir(workdir) -> Path:
    return stage_dir(workdir, "report")


def check_out(out, suffix: str | tuple[str, ...]) -> Path:
    """An ``--out`` path that is new, has ``suffix`` (or one of them), and lies
    in a folder (or under a path that can become one)."""
    out = Path(out)
    suffixes = (suffix,) if isinstance(suffix, str) else suffix
    if out.suffix not in suffixes:
        raise LpdError(f"--out must end in {' or '.join(suffixes)}, got {out}")
    if out.exists():
        raise LpdError(f"{out} already exists; choose another --out or delete it")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise LpdError(f"--out {out}: {parent} is a file, not a directory")
            break
    return out


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path beside ``path`` to write (a file, or a
    directory to fill); on success it is renamed onto ``path``, on any failure
    removed, so ``path`` is either what it was or the whole new thing. A
    temporary left by a killed process is removed by the next write.

    In a run over several hosts only the first process writes: the others
    fill a private temporary that is thrown away.
    """
    path = Path(path)
    if not devices.is_main():
        scratch = Path(tempfile.mkdtemp(prefix="lpd-"))
        try:
            yield scratch / path.name
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def write_json(path, data) -> None:
    """Writes ``data`` as indented JSON to ``path``, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def lock(workdir):
    """Holds ``<workdir>/.lock`` for the block, so two lpd commands never
    write one workdir at once; the lock dies with its process (kill -9
    included). Creates the workdir, and removes it again if the block
    wrote nothing into it. In a run over several hosts the first process
    holds it for all."""
    path = check_workdir(workdir)
    if not devices.is_main():
        yield
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / ".lock"
    try:
        with open(lock_file, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise LpdError(
                    f"{path} is in use by another lpd command ({holder}); wait "
                    "for it to finish or use another --workdir"
                ) from None
            f.truncate(0)
            f.write(f"pid {os.getpid()}")
            f.flush()
            yield
    finally:
        if created and [p.name for p in path.iterdir()] == [".lock"]:
            lock_file.unlink()
            path.rmdir()


def is_complete(directory) -> bool:
    """Whether a stage directory holds its ``meta.json`` (written last)."""
    return (Path(directory) / "meta.json").exists()


def config_diffs(directory, config_dict: dict, section: str) -> list[str]:
    """Where a stage directory's ``config.json`` differs from ``config_dict``
    in ``config.<section>`` and the seed (``[]``: made with this config)."""
    old = json.loads((Path(directory) / "config.json").read_text())
    diffs = diff_configs(old.get(section, {}), config_dict[section], section)
    if old.get("seed") != config_dict["seed"]:
        diffs.append(f"seed: {old.get('seed')!r} -> {config_dict['seed']!r}")
    return diffs


def stage_complete(directory, config_dict: dict, section: str) -> bool:
    """Whether a stage's directory holds a complete run of this config.

    Refuses (``LpdError``) a directory made with another ``config.<section>``
    or seed, and a complete one that has no ``config.json`` (made by
    something else, which this stage must not overwrite).

    Args:
        directory: the stage's directory (``<workdir>/<stage>``).
        config_dict: the current config as a dict.
        section: the config section the stage reads.
    """
    path = Path(directory) / "config.json"
    if not path.exists():
        if is_complete(directory):
            raise LpdError(
                f"{directory} holds a complete result this command did not make; "
                "use another --workdir"
            )
        return False
    diffs = config_diffs(directory, config_dict, section)
    if diffs:
        raise LpdError(
            f"{directory} was made with a different config ({'; '.join(diffs[:3])}); "
            "use another --workdir or delete that directory"
        )
    return is_complete(directory)


class StageClock:
    """A stage's wall time summed over every session that worked on it.

    ``wall_time.json`` in the stage directory keeps what earlier (interrupted)
    sessions spent up to their last :meth:`save`; :meth:`total` adds this
    session's time.
    """

    def __init__(self, directory):
        self._path = Path(directory) / "wall_time.json"
        self._before = (
            json.loads(self._path.read_text())["seconds"]
            if self._path.exists()
            else 0.0
        )
        self._start = time.monotonic()

    def total(self) -> float:
        return round(self._before + time.monotonic() - self._start, 1)

    def save(self) -> None:
        """Records the time so far (call after each checkpoint)."""
        if self._path.parent.exists():
            write_json(self._path, {"seconds": self.total()})
