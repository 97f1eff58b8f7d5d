"""Shared by the benchmark scripts: device setup, timing, result files."""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from lpd.cli import set_host_devices

set_host_devices()  # Before jax is imported: one XLA host device per core.

import time  # noqa: E402

import jax  # noqa: E402

from lpd import archive_io  # noqa: E402
from lpd.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = str(ROOT / "experiments/configs/default.py")


def best_time(fn, repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def write_result(result: dict, name: str, config=None, overrides=(), out=None) -> None:
    """Adds the machine and versions (and the config file and overrides, if
    any), writes ``out`` (default results/<name>.json), prints it."""
    result.update(
        devices=[str(d) for d in jax.local_devices()],
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        versions=archive_io.package_versions(),
    )
    if config is not None:
        result.update(config=os.path.relpath(config, ROOT), overrides=list(overrides))
    out = Path(out) if out else ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


def main(name: str, bench_fn, doc: str) -> None:
    """``--config FILE[:ARG] [--config.x.y=v ...]``, run ``bench_fn(config)``,
    write ``results/<name>.json``."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    args, overrides = parser.parse_known_args()
    result = bench_fn(load_config(args.config, overrides))
    write_result(result, name, args.config, overrides)
