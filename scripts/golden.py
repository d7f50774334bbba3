"""Golden-result checks of the default pair: does this checkout still compute what was committed?

    python scripts/golden.py check results/runs          # newest default-pair run under a results root
    python scripts/golden.py check RUN_DIR               # one run directory
    python scripts/golden.py check RUNS --study --fresh  # the golden study (as CI runs it, below)
    python scripts/golden.py write RUN_DIR [--study]     # (maintainers) refresh the golden file of the run's pair

A run of `python -m ds_study.profile` is deterministic on one machine, so its numbers are a
regression test of the whole stack (zoo weights, tokenizer, prompts, cache capture, partial prefill,
decoding, metrics, search). Two golden files, one per run:

- results/golden/profile_<pair>.json: the default profile (`python -m ds_study.profile`);
- results/golden/study_<pair>.json (--study): the golden study, `python -m ds_study.profile
  --config-name golden_study` (ds_study/conf/golden_study.yaml: 4 examples, the baselines,
  sensitivity at layers 15 and 18, a 7-plan exhaustive grid, a greedy walk with one scored step).

Each kind of number is compared with the tolerance its nature allows on another CPU, where float
summation order (and so an occasional greedy token) can differ:

- task quality (baselines, sensitivity points, exhaustive frontier, greedy step scores): absolute
  `--tol` points, default 100 / n_examples, the change one flipped example can make;
- per-layer K/V/E deviation and attention cosine, and each plan's mean gold-answer NLL and KL from
  full prefill: relative `--rtol` (default 1e-3), absolute floor 1e-6 (nats; cells keep 6 decimals);
- exact: each greedy step's plan, the evaluation counts (exhaustive, greedy, its budget,
  sensitivity) and, on a run that computed every cell, the number of cells computed.

`--fresh` also fails a run that read any quality cell from its cell cache instead of computing it
(CI runs with an empty cells_root and cells_seed=null). Exits 1 with a line for each number that
moved (name, value, golden value, difference, tolerance); says whether the match was exact.
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
    ap.add_argument("--study", action="store_true",
                    help="the golden study: results/golden/study_<default pair>.json (ds_study/conf/golden_study.yaml)")
    ap.add_argument("--golden", type=Path, default=None,
                    help="default: results/golden/profile_<default pair>.json (--study: study_<default pair>.json)")
    ap.add_argument("--tol", type=float, default=None,
                    help="quality tolerance, points (default: one example's weight, 100 / n_examples)")
    ap.add_argument("--rtol", type=float, default=1e-3, help="deviation, NLL and KL tolerance, relative")
    ap.add_argument("--fresh", action="store_true",
                    help="fail unless the run computed every quality cell itself (none read from cells_root)")
    a = ap.parse_args(argv)
    return golden.check_or_write(a.action, a.path, a.golden, a.tol, a.rtol, a.fresh, "study" if a.study else "profile")


if __name__ == "__main__":
    sys.exit(main())
