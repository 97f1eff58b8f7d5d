"""Denoiser draws: how much the generated policies' fidelity moves when only
the denoiser's training draw changes.

One trained denoiser is one draw of its random keys (initialisation, batches,
noise, the guidance sweep's samples), and on the default archives its
generated reward and coverage move by a few hundredths from draw to draw.
:func:`run_draws` trains ``draws`` denoisers of one config on a workdir's
archive, codec and text model, evaluates each under the evaluation stage's
protocol (the same episode keys for every draw), and summarises the fidelity
figures over them, so a lever is judged against the spread, not one draw.

Draw 0 is the denoiser ``lpd run`` trains; draw ``i > 0`` folds ``i`` into the
diffusion stage's key. Each draw is a workdir of its own under ``scratch``
(the shared stages copied in, without their checkpoints), so an interrupted
run resumes and a finished draw is not trained again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np

from lpd import diffusion_stage, evaluate_stage
from lpd.config import config_to_dict
from lpd.errors import LpdError
from lpd.workdir import config_diffs, is_complete, lock, stage_dir

SHARED = ("archive", "codec", "text")  # Trained once, copied into every draw.
SETS = ("generated", "top_return", "uniform")  # The report's generated rows.
METRICS = ("reward_ratio", "coverage_ratio", "qd_score_ratio", "measure_error")


def check_shared(config: ml_collections.ConfigDict, workdir) -> None:
    """Refuses a workdir whose archive, codec or text stage is missing or was
    made with another config than ``config``."""
    config_dict = config_to_dict(config)
    for stage in SHARED:
        directory = stage_dir(workdir, stage)
        if not is_complete(directory):
            raise LpdError(
                f"{directory} is not a complete {stage} stage; "
                "run `lpd run` on that workdir first"
            )
        if not (directory / "config.json").exists():
            continue  # An imported archive: used whatever config.archive says.
        diffs = config_diffs(directory, config_dict, stage)
        if diffs:
            raise LpdError(
                f"{directory} was made with another config ({'; '.join(diffs[:3])}); "
                "pass the config and overrides that workdir was made with"
            )


def _made_with(directory: Path, config_dict: dict, sections) -> bool:
    """Whether a complete stage directory was made with these config sections."""
    if not (directory / "config.json").exists() or not is_complete(directory):
        return False
    return not any(config_diffs(directory, config_dict, s) for s in sections)


def _copy(source: Path, target: Path) -> None:
    """Copies a stage directory without its checkpoints; an interrupted copy
    never passes for a stage (it is renamed into place when whole)."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(
        source, partial, ignore=shutil.ignore_patterns("checkpoints", "tensorboard")
    )
    partial.rename(target)


def _prepare(config_dict: dict, workdir: Path, draw_dir: Path, draw: int) -> None:
    """Copies the shared stages into a draw's workdir; draw 0 also takes the
    workdir's own denoiser and report when they were made with this config."""
    for stage in SHARED:
        if not stage_dir(draw_dir, stage).exists():
            _copy(stage_dir(workdir, stage), stage_dir(draw_dir, stage))
    if draw:
        return
    for stage, sections in (
        ("diffusion", ("diffusion",)),
        ("report", ("diffusion", "evaluate")),
    ):
        source, target = stage_dir(workdir, stage), stage_dir(draw_dir, stage)
        if not target.exists() and _made_with(source, config_dict, sections):
            _copy(source, target)


def _row(draw_dir: Path, draw: int) -> dict:
    report = json.loads((stage_dir(draw_dir, "report") / "report.json").read_text())
    row = {"draw": draw, "guidance": report["guidance"]}
    for name in SETS:
        figures = report if name == "generated" else report.get(name)
        if figures is not None:
            row[name] = {m: float(figures[m]) for m in METRICS}
    return row


def summarise(rows: list[dict]) -> dict:
    """Mean, sample standard deviation, min and max of every figure over the
    draws: ``{set: {metric: {mean, std, min, max}}}``."""
    summary = {}
    for name in SETS:
        if name not in rows[0]:
            continue
        summary[name] = {}
        for metric in METRICS:
            values = np.asarray([r[name][metric] for r in rows])
            summary[name][metric] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                "min": float(values.min()),
                "max": float(values.max()),
            }
    return summary


def run_draws(config: ml_collections.ConfigDict, workdir, scratch, draws: int) -> dict:
    """Trains and evaluates ``draws`` denoisers on ``workdir``'s archive, codec
    and text model, each in ``scratch/draw<i>``; returns ``{"draws": rows,
    "summary": ...}`` (rows: each draw's guidance and fidelity figures)."""
    workdir, scratch = Path(workdir).resolve(), Path(scratch).resolve()
    if draws < 1:
        raise LpdError(f"--draws must be at least 1, got {draws}")
    if scratch == workdir or workdir in scratch.parents:
        raise LpdError(f"--scratch {scratch} is inside the workdir; name another")
    check_shared(config, workdir)
    config_dict = config_to_dict(config)
    rows = []
    for draw in range(draws):
        draw_dir = scratch / f"draw{draw}"
        with lock(draw_dir):
            _prepare(config_dict, workdir, draw_dir, draw)
            diffusion_stage.run_diffusion_stage(config, draw_dir, draw=draw)
            evaluate_stage.run_evaluate_stage(config, draw_dir)
        rows.append(_row(draw_dir, draw))
    return {"draws": rows, "summary": summarise(rows)}
