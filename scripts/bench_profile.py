"""Cost of the deviation profile relative to plain forward passes, and K/V/E bytes per token.

    python scripts/bench_profile.py [--pair tiny] [--examples 10] [--repeats 3]

What is timed and checked: ``ds_study.profile.cost`` (goal: profile / plain forward <= 2.5).
Writes results/bench_profile.json.
"""

from __future__ import annotations

import argparse
import json

from ds_study import profile
from ds_study.records import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="tiny")
    ap.add_argument("--examples", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/bench_profile.json")
    args = ap.parse_args()
    if args.repeats < 1 or args.examples < 1:
        ap.error("--repeats and --examples must be >= 1")
    result = profile.cost(args.pair, args.examples, args.repeats)
    write_json(args.out, result, indent=2, quiet=True)
    print(json.dumps({k: v for k, v in result.items() if k != "env"}, indent=2))


if __name__ == "__main__":
    main()
