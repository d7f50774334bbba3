"""Regenerate the embedded task suite and the pretraining corpus from the Python standard library.

    python scripts/make_tasks.py [--train 4000] [--test 200] [--profile 50] [--seed 0]

Writes ds_study/assets/tasks/<task>/{test,profile}.jsonl and train.jsonl.gz (LongBench schema),
provenance.jsonl (which stdlib file and line each example came from) and SOURCES.json, plus
ds_study/assets/corpus/pretrain.txt.gz. Output is deterministic for a given stdlib version
(``ds_study.corpus.write_suite``; why each task is what it is: ``corpus.REVISIONS``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ds_study import corpus

ASSETS = Path(__file__).resolve().parents[1] / "ds_study" / "assets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--profile", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = {"train": args.train, "profile": args.profile, "test": args.test}
    corpus.write_suite(ASSETS, sizes, args.seed, vars(args))


if __name__ == "__main__":
    main()
