"""Denoiser draws: the spread of the generated policies' fidelity over
independently trained denoisers on one archive and codec.

    python benchmarks/bench_draws.py --workdir runs/default [--draws 3]
        [--scratch DIR] [--out FILE] [--config FILE[:ARG]] [--config.x.y=v ...]

On a workdir whose archive, codec and text stages are complete (made with
``--config`` and the overrides, except ``diffusion.*`` and ``evaluate.*``,
which are what a probe changes), trains ``--draws`` denoisers and evaluates
each as ``lpd run`` would, every draw on the same episode keys. Draw 0 is the
denoiser ``lpd run`` trains (taken from the workdir when it was made with
this config); draw i folds i into the diffusion stage's key. Each draw is a
workdir ``--scratch/draw<i>`` (default ``<workdir>-draws``, or
``<workdir>-draws-<name of --out>`` with ``--out``), so an interrupted run
resumes. Writes benchmarks/results/draws.json (or ``--out``): per draw the
guidance picked and reward, coverage and QD-score ratios and measure error of
the plain, top-return and uniform asks, and their mean, standard deviation,
min and max.
"""

import argparse
import os
import sys
from pathlib import Path

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

from lpd import draws
from lpd.config import load_config
from lpd.errors import LpdError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--scratch", default=None)
    parser.add_argument("--out", default=None, help="default: results/draws.json")
    parser.add_argument("--config", default=common.DEFAULT_CONFIG)
    args, overrides = parser.parse_known_args()
    if args.out and os.path.isdir(args.out):
        sys.exit(f"bench_draws: --out {args.out} is a directory; name a .json file")
    workdir = Path(args.workdir)
    suffix = f"-{Path(args.out).stem}" if args.out else ""
    scratch = args.scratch or f"{workdir.resolve()}-draws{suffix}"
    try:
        config = load_config(args.config, overrides)
        result = draws.run_draws(config, workdir, scratch, args.draws)
    except LpdError as e:
        sys.exit(f"bench_draws: {e}")
    result.update(
        workdir=os.path.relpath(workdir, common.ROOT),
        scratch=os.path.relpath(scratch, common.ROOT),
    )
    common.write_result(result, "draws", args.config, overrides, out=args.out)


if __name__ == "__main__":
    main()
