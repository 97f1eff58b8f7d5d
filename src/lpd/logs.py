"""Per-stage metric logs: ``metrics.jsonl`` and TensorBoard events."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tensorboardX import SummaryWriter

from lpd import devices
from lpd.workdir import write_text


class MetricsWriter:
    """Appends ``{"step": s, **metrics}`` rows to ``metrics.jsonl`` and TensorBoard.

    Opening it for a run resumed at ``resume_step`` drops rows logged after
    that step by the interrupted run, so the log matches the restored state.
    In a run over several hosts only the first process writes.
    """

    def __init__(self, directory: Path, resume_step: int | None = None):
        self._path = directory / "metrics.jsonl"
        self._tb = None
        if not devices.is_main():
            return
        if resume_step is not None and self._path.exists():
            rows = [json.loads(line) for line in self._path.read_text().splitlines()]
            kept = [r for r in rows if r["step"] <= resume_step]
            write_text(self._path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self._path.exists():
            self._path.unlink()
        self._tb = SummaryWriter(str(directory / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if self._tb is None:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in metrics.items():
            self._tb.add_scalar(name, float(value), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(directory: Path) -> list[dict]:
    """Rows of ``directory/metrics.jsonl``."""
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
