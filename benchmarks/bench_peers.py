"""lpd beside DCRL-MAP-Elites' actor, from one DCRL-ME workdir's report.

    python benchmarks/bench_peers.py --workdir runs/dcrl [--reference runs/default]

Reads ``<workdir>/report/report.json`` (``lpd run --config
experiments/configs/dcrl.py``) and writes benchmarks/results/peers.json: one
entry per method (the re-evaluated archive, lpd generated, codec only and
top return, the DCRL-ME actor, the nearest elite, the copy-and-perturb
baselines) with the fidelity keys on the archive asks, a ``uniform``
sub-dict, ``compression`` and ``extra_training_s``. ``--reference``, a
workdir whose archive was searched with the same settings but the emitter
(``default.py`` for ``dcrl.py``), prices the actor: the archive stage's extra
wall time over the reference's.
"""

import argparse
import os
import sys

# isort: off
import common  # First: gives XLA one host device per core before jax starts.

# isort: on

from lpd import report
from lpd.errors import LpdError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--reference", default=None)
    args = parser.parse_args()
    try:
        result = report.peers(args.workdir, args.reference)
    except LpdError as e:
        sys.exit(f"bench_peers: {e}")
    result["workdir"] = os.path.relpath(args.workdir, common.ROOT)
    if args.reference:
        result["reference"] = os.path.relpath(args.reference, common.ROOT)
    common.write_result(result, "peers")


if __name__ == "__main__":
    main()
