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


cli = hydra_main("evaluate")(main)  # user errors in one or two lines, bugs with their traceback (ds_study.cli)


if __name__ == "__main__":
    cli()
