"""Throughput of batched cell evaluation against the one-at-a-time executor, measured in one run.

    python scripts/bench_batched.py                                   # smol_sum_code, 16 examples, batch 16
    python scripts/bench_batched.py --pair tiny --examples 8 --batch-size 8 --plans full_prefill 0-3
    python scripts/bench_batched.py --out results/bench/batched_smol_sum_code.json

Both sides compute the same (plan, example) cells on the same profiling examples, in this process,
one after the other, with no cell store:

- *one at a time*: ``Evaluator.run`` per cell, example-major, so each context is captured once and
  the plans of one context share recomputed layers (``GroupMemo``) -- the best the batch-1
  executor does, and what every pipeline ran before batching;
- *batched*: ``Evaluator.compute`` with ``--batch-size`` examples per call (``ds_study.batched``),
  which also computes the teacher-forced NLL and KL of every cell (the one-at-a-time side does not).

It prints cells per second of each, their ratio, and how many cells decode exactly the same tokens
on both sides (float rounding differs between batch shapes, so a near-tie can flip a token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ds_study import runner  # noqa: E402
from ds_study.plans import parse_plan  # noqa: E402
from ds_study.pair import load_pair  # noqa: E402

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

    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(runner.CONF_DIR), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model_pair={a.pair}", "split=profile", f"limit={a.examples}"])
    task = runner.validate(cfg)
    pair = load_pair(cfg.model_pair.receiver, cfg.model_pair.sender, dtype=cfg.dtype, device=cfg.device)
    examples = runner.prepare(pair, task, runner.records_of(cfg, task), cfg.max_length)
    plans = [parse_plan(p, pair.n_layers) for p in a.plans]
    n_cells = len(plans) * len(examples)
    print(f"{a.pair}: {len(examples)} examples x {len(plans)} plans = {n_cells} cells, "
          f"{torch.get_num_threads()} threads", flush=True)

    one = runner.Evaluator(pair, task, keep=1)
    t0 = time.perf_counter()
    single = {}
    for ex in examples:
        for p in plans:
            single[(p.name, ex.id)] = one.run(p, ex).token_ids
    t_one = time.perf_counter() - t0
    print(f"one at a time: {t_one:.1f} s, {n_cells / t_one:.2f} cells/s", flush=True)

    many = runner.Evaluator(pair, task, batch_size=a.batch_size)
    t0 = time.perf_counter()
    many.compute(plans, examples)
    t_batch = time.perf_counter() - t0
    print(f"batched (batch {a.batch_size}): {t_batch:.1f} s, {n_cells / t_batch:.2f} cells/s", flush=True)

    tok = pair.tokenizer
    same = sum(many.cell(p, ex)["prediction"] == runner.prediction_text(tok, single[(p.name, ex.id)])
               for ex in examples for p in plans)
    ratio = t_one / t_batch
    print(f"speed-up {ratio:.2f}x; identical predictions {same} of {n_cells}")
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "command": "python scripts/bench_batched.py " + " ".join(sys.argv[1:]),
            "pair": a.pair, "examples": len(examples), "plans": [p.name for p in plans], "cells": n_cells,
            "batch_size": a.batch_size, "one_at_a_time_s": round(t_one, 2), "batched_s": round(t_batch, 2),
            "speedup": round(ratio, 2), "identical_predictions": same,
            "env": runner.environment(cfg.device)}, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
