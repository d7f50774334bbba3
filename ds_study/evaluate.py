"""Score one or more plans of a pair on a dataset split, with per-example results.

    python -m ds_study.evaluate model_pair=tiny plan=full_prefill split=test
    python -m ds_study.evaluate model_pair=tiny 'plan=[full_reuse,sender,cacheblend,"2-5"]' limit=20
    python -m ds_study.evaluate model_pair=tiny 'plan=[[0,1],[6,7]]'   # two recompute groups
"""

from __future__ import annotations

import time

from omegaconf import DictConfig

from ds_study import runner
from ds_study.cli import hydra_main
from ds_study.profile import finish, print_table, quality_summary, record_cells


def main(cfg: DictConfig) -> dict:
    task = runner.validate(cfg)
    runner.records_of(cfg, task)  # read before the weights load: a bad dataset fails in seconds
    plans = runner.plans_of(cfg.plan, runner.receiver_layers(cfg), cfg.cacheblend_ratio)
    pair = runner.load_pair_from(cfg)
    examples, ev = runner.evaluator_for(cfg, pair, task)
    run = runner.start_run(cfg, "evaluate", task)
    runner.write_json(run / "env.json", runner.environment(cfg.device))
    t0 = time.perf_counter()
    ev.fill(plans, examples, desc="cells")  # what is missing, in batches, with a live bar
    rows_by_plan = record_cells(ev, plans, examples, run / "samples.jsonl")
    summary = quality_summary("evaluate", cfg, task, pair, ev, len(examples), rows_by_plan, t0)
    print_table(f"{cfg.model_pair.name} on {task.name}/{cfg.split} ({len(examples)} examples)", summary["quality"])
    return finish(run, summary)


def throughput(pair_name: str, n_examples: int = 16, batch_size: int = 16, plans: list[str] = ()) -> dict:
    """Cells per second of batched evaluation against the one-at-a-time executor, measured in one run
    (``scripts/bench_batched.py``): both compute the same (plan, example) cells on the first
    ``n_examples`` profiling examples, one after the other, with no cell store. One at a time is
    ``Evaluator.run`` per cell, example-major (each context captured once, the plans of a context
    sharing recomputed layers: the best the batch-1 executor does); batched is ``Evaluator.compute``
    with ``batch_size`` examples a call, which also computes every cell's teacher-forced NLL and KL.
    Also counts the cells that decode the same tokens on both sides (float rounding differs between
    batch shapes, so a near-tie can flip a token)."""
    import torch

    from ds_study.pair import load_pair
    from ds_study.plans import parse_plan

    cfg = runner.compose("evaluate", [f"model_pair={pair_name}", "split=profile", f"limit={n_examples}"])
    task = runner.validate(cfg)
    pair = load_pair(cfg.model_pair.receiver, cfg.model_pair.sender, dtype=cfg.dtype, device=cfg.device)
    examples = runner.prepare(pair, task, runner.records_of(cfg, task), cfg.max_length)
    plans = [parse_plan(p, pair.n_layers) for p in plans]
    n_cells = len(plans) * len(examples)
    print(f"{pair_name}: {len(examples)} examples x {len(plans)} plans = {n_cells} cells, "
          f"{torch.get_num_threads()} threads", flush=True)

    one = runner.Evaluator(pair, task, keep=1)
    t0 = time.perf_counter()
    single = {}
    for ex in examples:
        for p in plans:
            single[(p.name, ex.id)] = one.run(p, ex).token_ids
    t_one = time.perf_counter() - t0
    print(f"one at a time: {t_one:.1f} s, {n_cells / t_one:.2f} cells/s", flush=True)

    many = runner.Evaluator(pair, task, batch_size=batch_size)
    t0 = time.perf_counter()
    many.compute(plans, examples)
    t_batch = time.perf_counter() - t0
    print(f"batched (batch {batch_size}): {t_batch:.1f} s, {n_cells / t_batch:.2f} cells/s", flush=True)

    same = sum(many.cell(p, ex)["prediction"] == runner.prediction_text(pair.tokenizer, single[(p.name, ex.id)])
               for ex in examples for p in plans)
    print(f"speed-up {t_one / t_batch:.2f}x; identical predictions {same} of {n_cells}")
    return {"pair": pair_name, "examples": len(examples), "plans": [p.name for p in plans], "cells": n_cells,
            "batch_size": batch_size, "one_at_a_time_s": round(t_one, 2), "batched_s": round(t_batch, 2),
            "speedup": round(t_one / t_batch, 2), "identical_predictions": same,
            "env": runner.environment(cfg.device)}


cli = hydra_main("evaluate")(main)  # user errors in one or two lines, bugs with their traceback (ds_study.cli)


if __name__ == "__main__":
    cli()
