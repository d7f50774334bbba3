"""Golden-result check of the default profile run: does this checkout still compute what was committed?

    python scripts/golden.py check results/runs          # newest default-pair run under a results root
    python scripts/golden.py check RUN_DIR               # one run directory
    python scripts/golden.py write RUN_DIR               # (maintainers) refresh the golden file of the run's pair

A default `python -m ds_study.profile` run is deterministic on one machine, so its numbers are a
regression test of the whole stack (zoo weights, tokenizer, prompts, cache capture, partial prefill,
decoding, metrics, search). Two kinds of numbers are compared, each with the tolerance its nature
allows on another CPU, where float summation order (and so an occasional greedy token) can differ:

- per-layer K/V/E deviation between sender and receiver caches (means over the 50 profiling
  examples): relative tolerance ``--rtol`` (default 1e-3); any bug in cache capture moves these by
  far more than float noise;
- task quality of full prefill, full reuse and the sender, single-layer sensitivity and the
  exhaustive g=2 frontier: absolute tolerance ``--tol`` points (default 2.0, the change one flipped
  example out of 50 can make on code similarity).

Exits 1 with a table of what moved when anything is outside its tolerance; says whether the match
was exact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_study import golden


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("check", "write"))
    ap.add_argument("path", type=Path, help="a run directory, or a results root holding runs")
    ap.add_argument("--golden", type=Path, default=None, help="default: results/golden/profile_<default pair>.json")
    ap.add_argument("--tol", type=float, default=None,
                    help="quality tolerance, points (default: one example's weight, 100 / n_examples)")
    ap.add_argument("--rtol", type=float, default=1e-3, help="deviation tolerance, relative")
    ap.add_argument("--fresh", action="store_true",
                    help="fail unless the run computed every quality cell itself (none read from cells_root)")
    a = ap.parse_args(argv)
    return golden.check_or_write(a.action, a.path, a.golden, a.tol, a.rtol, a.fresh)


if __name__ == "__main__":
    sys.exit(main())
