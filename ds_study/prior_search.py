"""How many evaluations a search seeded by a label-free prior needs to reach the exhaustive frontier.

    python -m ds_study.prior_search --pair smol_sum_code [--dataset pysum] [--granularity 2] [--publish]

The greedy search (``search.greedy``) walks recompute groups guided by a free per-layer prior. This
replays that walk, at every evaluation budget from the smallest walk to the whole grid, for each
prior -- the deviation profile's columns (two forward passes, no labels), the measured single-layer
sensitivity under the same target (an oracle no search has before it starts) and uniform random
priors (the floor) -- and reports the fewest evaluations at which the walk's best plan at every
recompute budget is within ``--tolerance`` points of the exhaustive frontier.

It reads committed result files only (the pair's cells, the study's deviation profile and
sensitivity) and runs no model: with one recompute group every plan the walk can propose is a
contiguous group of the exhaustive grid, whose cells are already scored. Where the profiling split
cannot rank plans (split-half reliability, reported beside it), reaching its frontier means
matching its noise, and the count says little.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ds_study import metrics
from ds_study.frontier import (Point, budget_frontier, candidate_groups, frontier, n_exhaustive, plan_of,
                               ranking_reliability)
from ds_study.runner import REPO_ROOT
from ds_study.search import PRIORS, greedy, greedy_evaluations, layer_prior

RESULTS = REPO_ROOT / "results"


def read_cells(pair: str, dataset: str, split: str = "profile", cells_root: Path = RESULTS / "cells") -> dict[str, dict]:
    """{plan: {example id: cell}} of a pair's committed cell file(s) for one dataset and split."""
    files = sorted((cells_root / pair).glob(f"{dataset}_{split}_*.jsonl"))
    if not files:
        raise SystemExit(f"no cells of {pair} on {dataset}/{split} under {cells_root}; run the profile first")
    cells: dict[str, dict] = {}
    for f in files:
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "nll" in row:
                cells.setdefault(row["plan"], {})[row["id"]] = row
    return cells


def grid_scores(cells: dict, n_layers: int, g: int, target: str) -> tuple[dict[tuple, float], list[str], dict]:
    """Quality under ``target`` of full reuse and every contiguous group at granularity g, on the
    examples every one of those plans was scored on; and the per-example values for reliability."""
    grid = [()] + [((a, b),) for a, b in candidate_groups(n_layers, g)]
    names = {gr: plan_of(gr, n_layers).name for gr in grid}
    missing = [n for n in names.values() if n not in cells]
    if missing:
        raise SystemExit(f"{len(missing)} plans of the g={g} grid have no cells (e.g. {missing[0]}); run "
                         f"`python -m ds_study.profile --config-name profile_full` on this pair first")
    ids = sorted(set.intersection(*(set(cells[n]) for n in names.values())))
    if len(ids) < 4:
        raise SystemExit(f"only {len(ids)} examples have every grid plan scored; need at least 4")
    scores = {gr: metrics.quality([cells[n][i] for i in ids], target) for gr, n in names.items()}
    per_example = {n: [metrics.example_value(cells[n][i], target) for i in ids] for n in names.values()}
    return scores, ids, per_example


def evaluations_to_frontier(scores: dict[tuple, float], n_layers: int, g: int, prior, tolerance: float) -> dict:
    """Replay the greedy (one group, two candidates per step while the budget allows) at every budget;
    the fewest evaluations whose budget frontier is within ``tolerance`` of the exhaustive one."""
    exh = budget_frontier(frontier([_point(gr, s, n_layers) for gr, s in scores.items()], n_layers))
    m = -(-n_layers // g)

    def walk(budget: int):
        res = greedy(n_layers, g, lambda grs: [scores[tuple(gr)] for gr in grs], prior, width=2, budget=budget,
                     max_groups=1)
        got = budget_frontier(frontier(res.points, n_layers))
        gaps = [e.score - (b.score if b else 0.0) for e, b in zip(exh, got) if e is not None]
        return res.evaluations, max(gaps), sum(gaps) / len(gaps)

    quarter = max(greedy_evaluations(m, 1), n_exhaustive(n_layers, g) // 4)  # the 25% budget
    _, qmax, qmean = walk(quarter)
    out = {"max_gap_at_quarter": round(qmax, 3), "mean_gap_at_quarter": round(qmean, 3), "quarter_budget": quarter}
    for budget in range(greedy_evaluations(m, 1), n_exhaustive(n_layers, g) + 1):
        n_eval, gap, _ = walk(budget)
        if gap <= tolerance:
            return {**out, "evaluations": n_eval}
        if n_eval < budget:  # the walk scored every plan it can: more budget changes nothing
            return {**out, "evaluations": None, "walk_max_gap": round(gap, 3)}
    return {**out, "evaluations": None}


def _point(groups, score, n_layers) -> Point:
    return Point(plan_of(groups, n_layers).name, tuple(groups), score)


def priors_of(study_dir: Path, target: str, n_layers: int) -> dict[str, list[float]]:
    """Label-free priors from the study's deviation profile, and the measured sensitivity (oracle)."""
    dev = study_dir / "deviation.csv"
    if not dev.exists():
        raise SystemExit(f"no deviation profile at {dev}; run `python -m ds_study.study study=sensitivity` on this pair")
    out = {p: layer_prior(dev, p) for p in PRIORS}
    sens = study_dir / "sensitivity.json"
    if sens.exists():
        s = json.loads(sens.read_text())
        t = s.get("by_target", {}).get(target)
        if t and len(t["layer_scores"]) == n_layers:
            out["measured sensitivity (oracle)"] = [t["full_prefill"] - x for x in t["layer_scores"]]
    return out


def run(pair: str, dataset: str, g: int, tolerance: float, seeds: int) -> dict:
    study_dir = RESULTS / "study" / pair / dataset
    cells = read_cells(pair, dataset)
    n_layers = json.loads((study_dir / "sensitivity.json").read_text())["n_layers"] if (
        study_dir / "sensitivity.json").exists() else None
    if n_layers is None:
        raise SystemExit(f"no {study_dir / 'sensitivity.json'}: its layer count and sensitivity are needed")
    out = {"pair": pair, "dataset": dataset, "split": "profile", "granularity": g, "n_layers": n_layers,
           "tolerance": tolerance, "exhaustive_evaluations": n_exhaustive(n_layers, g),
           "smallest_walk": greedy_evaluations(-(-n_layers // g), 1), "max_groups": 1,
           "command": f"python -m ds_study.prior_search --pair {pair} --dataset {dataset} --granularity {g} "
                      f"--tolerance {tolerance:g} --seeds {seeds} --publish", "targets": {}}
    for target in metrics.TARGETS:
        scores, ids, per_example = grid_scores(cells, n_layers, g, target)
        rows = {name: evaluations_to_frontier(scores, n_layers, g, prior, tolerance)
                for name, prior in priors_of(study_dir, target, n_layers).items()}
        rng = random.Random(0)
        rand = [evaluations_to_frontier(scores, n_layers, g, [rng.random() for _ in range(n_layers)], tolerance)
                for _ in range(seeds)]
        reached = sorted(r["evaluations"] for r in rand if r["evaluations"] is not None)
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        rows["random (median of seeds)"] = {
            "evaluations": reached[len(reached) // 2] if len(reached) > len(rand) // 2 else None,
            "reached": f"{len(reached)}/{len(rand)}", "quarter_budget": rand[0]["quarter_budget"],
            "max_gap_at_quarter": med([r["max_gap_at_quarter"] for r in rand]),
            "mean_gap_at_quarter": med([r["mean_gap_at_quarter"] for r in rand])}
        out["targets"][target] = {"n_examples": len(ids), "reliability": ranking_reliability(per_example),
                                  "priors": rows}
    return out


def table(res: dict) -> str:
    lines = [f"evaluations for a one-group greedy walk to reach the g={res['granularity']} exhaustive frontier within "
             f"{res['tolerance']:g} points at every budget (exhaustive: {res['exhaustive_evaluations']}; smallest walk: "
             f"{res['smallest_walk']}), and its largest / mean shortfall with 25% of the exhaustive evaluations"]
    for t, v in res["targets"].items():
        r = v["reliability"]
        rel = "undefined" if r["spearman_median"] is None else f"{r['spearman_median']:.2f} [{r['spearman_p05']:.2f}, {r['spearman_p95']:.2f}]"
        lines.append(f"  target {t} ({v['n_examples']} examples; plan-ranking reliability {rel}):")
        lines.append(f"    {'prior':<32} {'evaluations':>12} {'max gap @25%':>13} {'mean gap @25%':>14}")
        for name, row in v["priors"].items():
            e = row["evaluations"]
            lines.append(f"    {name:<32} {'not reached' if e is None else e:>12} {row['max_gap_at_quarter']:>13.2f} "
                         f"{row['mean_gap_at_quarter']:>14.2f}"
                         + (f"  (seeds reaching it: {row['reached']})" if "reached" in row else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", required=True)
    ap.add_argument("--dataset", default=None, help="default: the only dataset the pair's study holds")
    ap.add_argument("--granularity", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=1.0, help="points below the exhaustive frontier allowed")
    ap.add_argument("--seeds", type=int, default=20, help="random priors (the floor)")
    ap.add_argument("--publish", action="store_true", help="write results/study/<pair>/<dataset>/prior_search.json")
    args = ap.parse_args(argv)
    if args.granularity < 1 or args.seeds < 1 or args.tolerance < 0:
        ap.error("--granularity and --seeds must be positive, --tolerance >= 0")
    dataset = args.dataset
    if dataset is None:
        found = sorted(p.name for p in (RESULTS / "study" / args.pair).glob("*") if p.is_dir())
        if len(found) != 1:
            ap.error(f"pass --dataset (the study of {args.pair} holds {found or 'none'})")
        dataset = found[0]
    res = run(args.pair, dataset, args.granularity, args.tolerance, args.seeds)
    print(table(res))
    if args.publish:
        path = RESULTS / "study" / args.pair / dataset / "prior_search.json"
        from ds_study.records import write_json

        write_json(path, res)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
