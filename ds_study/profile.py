"""Profile a sender -> receiver pair: per-layer deviation and the quality of the baselines.

    python -m ds_study.profile                          # default embedded pair, 50 profiling examples
    python -m ds_study.profile model_pair=smol_qa dataset=pyqa limit=10
    python -m ds_study.profile model_pair=custom model_pair.receiver=DIR model_pair.sender=DIR model_pair.task=hotpotqa

Writes a new directory under ``results/runs/``: config.yaml, env.json, samples.jsonl (one line per
example and plan), summary.json, deviation.csv (per layer: mean of k_dev, v_dev, e_dev, cosines,
attn_cos, and their std/p25/p75 over examples), deviation_per_example.csv and deviation.png.
With ``search.enabled`` (the default, ds_study/conf/search.yaml) it then profiles recompute groups
(ds_study.search): critical layers, the frontier, the selected plans for each delta, and the
greedy-vs-exhaustive table, into the same run directory (points_g*.csv, frontier_g*.csv, greedy.csv,
search.json). ``search.publish=true`` also writes them to ``results/search/<pair>/<dataset>/`` (the
committed files the figures read): the explicit "regenerate committed results" step.
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from ds_study import deviation, figures, metrics, runner
from ds_study.cli import hydra_main


def summarize_plans(task, rows_by_plan: dict[str, list[dict]]) -> list[dict]:
    return [{"plan": p, "score": metrics.quality(rows), "metric": task.metric, "n": len(rows),
             "mean_seconds": round(sum(r["seconds"] for r in rows) / len(rows), 4)}
            for p, rows in rows_by_plan.items()]


def record_cells(ev, plans, examples, path, before=None) -> dict[str, list[dict]]:
    """Every (example, plan) cell of ``ev``, by plan, also written to ``path`` (samples.jsonl, one
    line a cell, example-major); ``before(example)`` runs first for each example."""
    rows_by_plan = {p.name: [] for p in plans}
    with open(path, "w") as samples:
        for ex in examples:
            if before is not None:
                before(ex)
            for plan in plans:
                row = ev.cell(plan, ex)
                rows_by_plan[plan.name].append(row)
                samples.write(json.dumps(row) + "\n")
    return rows_by_plan


def quality_summary(job: str, cfg: DictConfig, task, pair, ev, n_examples: int, rows_by_plan: dict, t0: float,
                    **extra) -> dict:
    """summary.json of a run that scored plans (evaluate, profile): what ran on what, ``extra``,
    and the quality table."""
    return {"job": job, "pair": cfg.model_pair.name, "dataset": task.name, "split": cfg.split,
            "n_examples": n_examples, **extra, "models": pair.identities(), "metric": task.metric,
            "metric_versions": metrics.metric_versions([task.metric]), "quality": summarize_plans(task, rows_by_plan),
            "seconds": round(time.perf_counter() - t0, 1), "cells_file": str(ev.store.path)}


def finish(run, summary: dict) -> dict:
    """Write the run's summary.json and say where the run is."""
    runner.write_json(run / "summary.json", summary)
    print(f"\nresults: {run}")
    return summary


@torch.no_grad()
def cost(pair_name: str, n_examples: int = 10, repeats: int = 3) -> dict:
    """What the deviation profile costs next to plain forward passes (``scripts/bench_profile.py``).

    Per profiling example: (a) one plain forward pass of the receiver and one of the sender over the
    shared context (the cheapest thing any profiler must do), and (b) what the deviation profile does
    (capture K/V/E of both models, per-layer deviation and attention-output cosines); both timed in
    the same run after a warm-up, medians over ``repeats``, goal (b)/(a) <= 2.5. Also the bytes of
    K, V and E per token per layer, measured against the analytic formula of the model config."""
    from ds_study.caches import analytic_bytes_per_token
    from ds_study.executor import capture

    cfg = runner.compose("profile", [f"model_pair={pair_name}", f"limit={n_examples}"])
    task = runner.validate(cfg)
    pair = runner.load_pair_from(cfg)
    examples = runner.prepare(pair, task, runner.records_of(cfg, task), cfg.max_length)
    r, s = pair.receiver, pair.sender

    def plain():
        for ex in examples:
            ids = torch.tensor([ex.prompt.prefix_ids])
            r(input_ids=ids)
            s(input_ids=ids)

    def profile():
        for ex in examples:
            sc, rc = capture(s, ex.prompt.prefix_ids), capture(r, ex.prompt.prefix_ids)
            deviation.layer_deviation(r, rc, sc)

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    plain(), profile()  # warm-up
    t_plain = statistics.median(timed(plain) for _ in range(repeats))
    t_prof = statistics.median(timed(profile) for _ in range(repeats))

    cache = capture(r, examples[0].prompt.prefix_ids)
    analytic = analytic_bytes_per_token(r.config, cache.keys[0].element_size())
    measured = {k: cache.bytes_per_token(k) for k in ("k", "v", "e")}
    return {
        "command": f"python scripts/bench_profile.py --pair {pair_name} --examples {n_examples} --repeats {repeats}",
        "pair": pair_name, "examples": len(examples),
        "mean_context_tokens": round(sum(e.prompt.n_prefix for e in examples) / len(examples), 1),
        "plain_forward_both_models_s": round(t_plain, 4), "deviation_profile_s": round(t_prof, 4),
        "ratio": round(t_prof / t_plain, 3), "goal_ratio_max": 2.5,
        "bytes_per_token_per_layer": {"measured": measured, "analytic": analytic,
                                      "match": all(measured[k] == analytic[k] for k in measured)},
        "e_over_one_layer_kv": analytic["e"] / (analytic["k"] + analytic["v"]),
        "env": runner.environment(cfg.device),
    }


def print_table(title: str, table: list[dict]) -> None:
    print(f"\n{title}")
    print(f"  {'plan':<28}{'score':>8}  {'metric':<10}{'n':>5}")
    for r in table:
        print(f"  {r['plan']:<28}{r['score']:>8.2f}  {r['metric']:<10}{r['n']:>5}")


def main(cfg: DictConfig, pair=None) -> dict:
    """The profile; ``pair``: the loaded pair to profile (a caller that ran the study on it already,
    scripts/paper_study.py), else loaded here after every check that needs no weights."""
    task = runner.validate(cfg)
    runner.records_of(cfg, task)  # read before the weights load: a bad dataset fails in seconds
    n_layers = runner.receiver_layers(cfg)
    plans = runner.plans_of(cfg.plans, n_layers)
    if cfg.search.enabled:
        from ds_study import search

        search.check_config(cfg.search, n_layers, cfg.split)
    pair = pair if pair is not None else runner.load_pair_from(cfg)
    examples, ev = runner.evaluator_for(cfg, pair, task)
    run = runner.start_run(cfg, "profile", task)
    runner.write_json(run / "env.json", runner.environment(cfg.device))
    print(f"profiling {cfg.model_pair.name} (receiver {pair.receiver_id['name']} <- sender {pair.sender_id['name']}) on "
          f"{task.name}/{cfg.split}: {len(examples)} examples, {pair.n_layers} layers -> {run}")

    ev.fill(plans, examples, desc="baselines")  # the baselines' cells (in parallel with workers > 1), live bar
    per_example, t0 = [], time.perf_counter()

    def deviation_of(ex) -> None:
        sender_cache, receiver_cache = ev.caches(ex, need_receiver=cfg.deviation)
        if cfg.deviation:
            for row in deviation.layer_deviation(pair.receiver, receiver_cache, sender_cache):
                per_example.append({"id": ex.id, **row})

    rows_by_plan = record_cells(ev, plans, tqdm(examples, desc="examples", dynamic_ncols=True),
                                run / "samples.jsonl", before=deviation_of)
    summary = quality_summary("profile", cfg, task, pair, ev, len(examples), rows_by_plan, t0, n_layers=pair.n_layers)
    if cfg.deviation:
        import pandas as pd

        pd.DataFrame(per_example).to_csv(run / "deviation_per_example.csv", index=False)
        dev = deviation.summarize(per_example)
        dev.to_csv(run / "deviation.csv", index=False)
        figures.plot_deviation(run / "deviation.csv", run / "deviation",
                               title=f"{cfg.model_pair.name}: receiver {pair.receiver_id['name']} <- sender {pair.sender_id['name']}")
        summary["deviation_mean"] = {c: round(float(dev[c].mean()), 6) for c in deviation.COLUMNS}
        print("\nper-layer deviation (mean over examples)")
        print(dev[["layer", *deviation.COLUMNS]].to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print_table(f"quality on {task.name}/{cfg.split} ({len(examples)} examples)", summary["quality"])
    if cfg.search.enabled:  # ends with the frontier, the selected plans and the critical layers
        from ds_study import search

        summary["search"] = search.run_from_profile(cfg, pair, task, examples, ev, run)
    summary.update(seconds=round(time.perf_counter() - t0, 1), cells_computed=ev.n_run, cells_reused=ev.n_reused,
                   cells_from_earlier_runs=ev.n_cached)
    return finish(run, summary)


cli = hydra_main("profile")(main)  # user errors in one or two lines, bugs with their traceback (ds_study.cli)


if __name__ == "__main__":
    cli()
