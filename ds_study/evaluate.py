"""Score one or more plans of a pair on a dataset split, with per-example results.

    python -m ds_study.evaluate model_pair=tiny plan=full_prefill split=test
    python -m ds_study.evaluate model_pair=tiny 'plan=[full_reuse,sender,cacheblend,"2-5"]' limit=20
    python -m ds_study.evaluate model_pair=tiny 'plan=[[0,1],[6,7]]'   # two recompute groups
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from ds_study import metrics, runner
from ds_study.cli import hydra_main
from ds_study.profile import print_table, summarize_plans


def main(cfg: DictConfig) -> dict:
    task = runner.validate(cfg)
    runner.records_of(cfg, task)  # read before the weights load: a bad dataset fails in seconds
    plans = runner.plans_of(cfg.plan, runner.receiver_layers(cfg), cfg.cacheblend_ratio)
    pair = runner.load_pair_from(cfg)
    examples, ev = runner.evaluator_for(cfg, pair, task)
    run = runner.start_run(cfg, "evaluate", task)
    runner.write_json(run / "env.json", runner.environment(cfg.device))
    rows_by_plan, t0 = {p.name: [] for p in plans}, time.perf_counter()
    ev.fill(plans, examples, desc="cells")  # what is missing, in batches, with a live bar
    with open(run / "samples.jsonl", "w") as samples:
        for ex in examples:
            for plan in plans:
                row = ev.cell(plan, ex)
                rows_by_plan[plan.name].append(row)
                samples.write(json.dumps(row) + "\n")
    table = summarize_plans(task, rows_by_plan)
    summary = {"job": "evaluate", "pair": cfg.model_pair.name, "dataset": task.name, "split": cfg.split,
               "n_examples": len(examples), "models": pair.identities(), "metric": task.metric,
               "metric_versions": metrics.metric_versions([task.metric]), "quality": table,
               "seconds": round(time.perf_counter() - t0, 1), "cells_file": str(ev.store.path)}
    runner.write_json(run / "summary.json", summary)
    print_table(f"{cfg.model_pair.name} on {task.name}/{cfg.split} ({len(examples)} examples)", table)
    print(f"\nresults: {run}")
    return summary


@hydra_main("evaluate")  # user errors in one or two lines, bugs with their traceback (ds_study.cli)
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
