"""Throughput of batched cell evaluation against the one-at-a-time executor, measured in one run.

    python scripts/bench_batched.py                                   # smol_sum_code, 16 examples, batch 16
    python scripts/bench_batched.py --pair tiny --examples 8 --batch-size 8 --plans full_prefill 0-3
    python scripts/bench_batched.py --out results/bench/batched_smol_sum_code.json

What each side computes and how it is timed: ``ds_study.evaluate.throughput``. It prints cells per
second of each, their ratio, and how many cells decode exactly the same tokens on both sides.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ds_study import evaluate
from ds_study.records import command_line, write_json

# a study-like mix: the baselines, single-layer reuse and contiguous groups at several starts
DEFAULT_PLANS = ["full_prefill", "full_reuse", "sender", "reuse_only:10", "0-5", "6-11", "12-17", "18-23", "24-29",
                 "0-11", "12-23", "0-17"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="smol_sum_code", help="a ds_study/conf/model_pair name")
    ap.add_argument("--examples", type=int, default=16, help="profiling examples (first N)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--plans", nargs="+", default=DEFAULT_PLANS)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also write the measurement as JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result = evaluate.throughput(a.pair, a.examples, a.batch_size, a.plans)
    if a.out:
        write_json(a.out, {"command": command_line(["scripts/bench_batched.py", *sys.argv[1:]]), **result}, indent=2)


if __name__ == "__main__":
    main()
