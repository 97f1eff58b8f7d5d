"""Sequencing benchmark: random sequences of reachable asks in long episodes.

    python benchmarks/bench_sequence.py --workdir runs/default [--seed 0]
        [--sequences 256] [--chunks 4] [--chunk-steps N] [--settle 50]
        [--guidance G] [--return top|Q] [--candidates C] [--replan 25]
        [--horizon 100] [--out FILE]

On a workdir whose archive, codec and diffusion stages are complete, draws
``--sequences`` sequences of ``--chunks`` asks from the foot-contact patterns
the elites hold from a random start, and acts each sequence in one episode
(``--chunk-steps`` per ask, by default the archive's episode length, without
resets) twice: with policies generated for the asks, and with the archive
elites nearest to them. Writes benchmarks/results/sequence.json (or
``--out``, which keeps the committed file for probes) with, per
method (``generated``, ``nearest_elite``), the success rate (still up after
80% of the episode), the measure error of each chunk after ``--settle``
steps, and the return. ``--seed`` draws the asks, the samples and the resets;
``--guidance`` defaults to the scale the diffusion stage's sweep picked;
``--return`` also asks every generated policy for a return quantile.
With ``--candidates`` C > 1, each ask gets C generated policies (and the C
nearest elites), and every ``--replan`` steps the one that a look-ahead of
``--horizon`` steps from the current state keeps up longest (then nearest
the ask) acts.
"""

import argparse
import os
import sys

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

from lpd import generator, sequence
from lpd.errors import LpdError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--chunk-steps", type=int, default=None)
    parser.add_argument("--settle", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--candidates", type=int, default=1)
    parser.add_argument("--replan", type=int, default=25)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument(
        "--return",
        dest="return_quantile",
        help="also ask the generated policies for a return: 'top' or a quantile",
    )
    parser.add_argument("--out", default=None, help="default: results/sequence.json")
    args = parser.parse_args()
    if args.out and os.path.isdir(args.out):
        sys.exit(f"bench_sequence: --out {args.out} is a directory; name a .json file")
    options = {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}
    try:
        options["return"] = generator.parse_return(options.pop("return_quantile"))
        result = sequence.run_benchmark(args.workdir, options)
    except LpdError as e:
        sys.exit(f"bench_sequence: {e}")
    result["workdir"] = os.path.relpath(args.workdir, common.ROOT)
    common.write_result(result, "sequence", out=args.out)


if __name__ == "__main__":
    main()
