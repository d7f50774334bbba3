"""Model-free baselines on the embedded tasks (ds_study.heuristics): what a receiver must beat.

    python scripts/heuristic_baselines.py [--split test] [--out results/heuristic_baselines]

Writes results/heuristic_baselines.{json,md}. Runs in seconds; no model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ds_study import heuristics
from ds_study.records import write_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", default="results/heuristic_baselines")
    ap.add_argument("--pair-quality", default=str(ROOT / "results" / "pair_quality.json"),
                    help="the receivers' scores to compare with (the 2M family's table, written by the former scripts/pair_quality.py)")
    args = ap.parse_args()
    rows = heuristics.table(args.split, Path(args.pair_quality))
    command = f"python scripts/heuristic_baselines.py --split {args.split} --out {args.out}"
    out = ROOT / args.out
    write_json(out.with_suffix(".json"), {"command": command, "rows": rows}, quiet=True)
    text = heuristics.markdown(rows, command)
    out.with_suffix(".md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    sys.exit(main())
