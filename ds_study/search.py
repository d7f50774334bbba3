"""Offline profiling and selection (DroidSpeak §4.2): which layers should the receiver recompute?

- **Exhaustive profiling** scores every contiguous group ``[a, b]`` at granularity ``g`` (starts
  and lengths in steps of g, the last group clipped to the last layer) plus full reuse on the
  profiling split: ``ceil(L/g) * (ceil(L/g) + 1) / 2 + 1`` plans, O(L^2).
- **Frontier**: the best quality for each number ``k`` of recomputed layers (k = 0 is full reuse,
  k = L full prefill). Ties go to fewer transition points, then to the earlier group.
- **Selection**: the fewest recomputed layers whose frontier quality is within ``delta`` of the
  receiver's full prefill (relative by default; absolute: within ``100 * delta`` points).
- **Greedy search**: a much cheaper walk over groups (see ``greedy``), reported side by side with
  the exhaustive frontier for every recompute budget.

Quality is the dataset's own metric (F1, Rouge-L, code similarity) aggregated LongBench-style
over the profiling examples. Every (plan, example) cell goes through ``runner.Evaluator``, which
appends it to the pair's cell file at once, so every search here resumes after an interruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ds_study.frontier import (Point, budget_frontier, candidate_groups, comparison, critical_layers, frontier,
                               frontier_rows, groups_str, n_exhaustive, plan_of, ranking_reliability, selections,
                               sensitivity_plans)
from ds_study import search_report as report
from ds_study.plans import Plan, layer_runs, parse_plan

# --------------------------------------------------------------------------------------------
# Greedy search


@dataclass
class GreedyResult:
    points: list[Point]  # in evaluation order
    evaluations: int  # distinct plans scored (each on the whole profiling split)
    log: list[str] = field(default_factory=list)


class CountingOracle:
    """Scores plans (given as group tuples) with ``score_fn`` once each, counting distinct plans."""

    def __init__(self, score_fn: Callable[[list[tuple]], list[float]]):
        self.score_fn, self.seen = score_fn, {}

    def __call__(self, groups_list: list[tuple]) -> list[float]:
        todo = [g for g in dict.fromkeys(tuple(g) for g in groups_list) if g not in self.seen]
        if todo:
            self.seen.update(zip(todo, self.score_fn(todo)))
        return [self.seen[tuple(g)] for g in groups_list]

    @property
    def evaluations(self) -> int:
        return len(self.seen)


def greedy_evaluations(n_units: int, width: int) -> int:
    """Most plans the greedy scores: full reuse, full prefill, then up to ``width`` per growth step."""
    return 2 + width * max(0, n_units - 1)


def greedy_budget(n_layers: int, g: int, max_fraction: float) -> int:
    """Plans the greedy may score: max_fraction of exhaustive profiling, and never fewer than a walk needs."""
    return max(greedy_evaluations(math.ceil(n_layers / g), 1), math.floor(max_fraction * n_exhaustive(n_layers, g)))


def layer_prior(dev_csv: Path, column: str) -> list[float]:
    """Per-layer sensitivity prior from the deviation profile: bigger means the sender's KV hurts more."""
    import pandas as pd

    df = pd.read_csv(dev_csv).sort_values("layer")
    if column == "attn":
        return list(1 - df["attn_cos"])
    if column == "kv":
        return list(df["k_dev"] + df["v_dev"])
    return list(df[column])


def greedy(n_layers: int, g: int, score_fn: Callable[[list[tuple]], list[float]], prior: Sequence[float],
           width: int = 1, budget: int | None = None, max_groups: int = 1, new_group_margin: float = 0.5,
           name_of: Callable[[tuple], str] | None = None) -> GreedyResult:
    """Grow the recomputed layers one granule at a time, guided by a free per-layer prior.

    ``score_fn`` takes plans (each a tuple of groups) and returns their qualities; ``prior[i]`` is a
    per-layer sensitivity estimate that costs no quality evaluation (from the deviation profile).
    The walk scores full reuse and full prefill, seeds a group at the granule the prior ranks most
    sensitive, then adds one granule per step, so it keeps one plan per recompute count. A step's
    candidates are the granules adjacent to a group (ranked by prior) and, while there are fewer
    than ``max_groups`` groups, a far granule, which ranks first only if its prior beats the best
    adjacent one by more than ``new_group_margin`` (relative): every extra group adds a transition
    whose sender E carries error forward (paper §4.1). With ``width`` 1 a step follows the prior
    alone (ceil(L/g) + 1 plans in all, scored in one pass at the end); with ``width`` 2 it scores its
    top two candidates and keeps the better one. With a ``budget`` of plans, steps score two
    candidates while the budget can still pay one plan for every remaining step, so spare
    evaluations go to the first, smallest recompute budgets, where groups differ most.
    """
    oracle = CountingOracle(score_fn)
    name_of = name_of or (lambda gr: plan_of(gr, n_layers).name)
    units = [(a, min(a + g, n_layers) - 1) for a in range(0, n_layers, g)]  # granules [0, g-1], [g, 2g-1], ...
    unit_prior = [sum(prior[a:b + 1]) / (b - a + 1) for a, b in units]
    full = ((0, n_layers - 1),)
    log: list[str] = []

    def plan(chosen: set[int]) -> tuple:
        return tuple((units[lo][0], units[hi][1]) for lo, hi in layer_runs(chosen))

    def candidates(chosen: set[int]) -> list[int]:
        free = [u for u in range(len(units)) if u not in chosen]
        adjacent = [u for u in free if u - 1 in chosen or u + 1 in chosen]
        apart = [u for u in free if u not in adjacent and len(layer_runs(chosen | {u})) <= max_groups]
        ranked = [(unit_prior[u], u) for u in adjacent]
        if apart:  # a new group must beat extending by the margin
            far = min(apart, key=lambda u: (-unit_prior[u], u))
            ranked.append((unit_prior[far] / (1 + new_group_margin), far))
        return [u for _, u in sorted(ranked, key=lambda t: (-t[0], t[1]))]

    oracle([(), full])
    chosen: set[int] = set()
    walk: list[tuple] = []
    while len(chosen) < len(units) - 1:
        pool = candidates(chosen) if chosen else sorted(range(len(units)), key=lambda u: (-unit_prior[u], u))
        steps_left = len(units) - 1 - len(chosen)
        w = width
        if budget is not None:  # planned = scored + walk steps not scored yet
            planned = oracle.evaluations + sum(1 for p in walk if p not in oracle.seen)
            w = 2 if budget - planned >= steps_left + 1 else 1
        options = [chosen | {u} for u in pool[:w]]
        if len(options) > 1:
            scores = oracle([plan(c) for c in options])
            chosen = options[max(range(len(options)), key=lambda i: (scores[i], -i))]
        else:
            chosen = options[0]  # the prior alone decides; scored with the rest of the walk below
        if walk and len(plan(chosen)) > len(walk[-1]):
            log.append(f"new group: {groups_str(plan(chosen))}")
        walk.append(plan(chosen))
    oracle(walk)  # plans scored during the walk are not scored again
    points = [Point(name_of(gr), gr, score) for gr, score in oracle.seen.items()]
    return GreedyResult(points, oracle.evaluations, log)


# --------------------------------------------------------------------------------------------
# Running on a pair


def evaluate(ev, plans: Sequence[Plan], examples, desc: str = "", out_err: bool = False) -> dict[str, list[dict]]:
    """Cells of every plan on every example, example-major: each context is captured once and the
    plans of one context share recomputed layers. Finished cells come from the cell file."""
    from tqdm import tqdm

    ev.fill(list(plans), list(examples), out_err, desc=desc or "cells")  # computes what is missing, with a live bar
    rows: dict[str, list[dict]] = {p.name: [] for p in plans}
    for ex in tqdm(examples, desc=f"{desc or 'cells'} (read)", dynamic_ncols=True, leave=False):
        for p in plans:
            rows[p.name].append(ev.cell(p, ex, out_err=out_err))
    return rows


def quality(rows: list[dict], target: str = "task") -> float:
    """A plan's quality under the search target (``metrics.TARGETS``)."""
    from ds_study import metrics

    return metrics.quality(rows, target)


def scorer(ev, examples, n_layers: int, desc: str = "", target: str = "task") -> Callable[[list[tuple]], list[float]]:
    """score_fn for greedy: plans given as group tuples -> quality on the profiling split."""
    def score_fn(groups_list):
        plans = [plan_of(gr, n_layers) for gr in groups_list]
        rows = evaluate(ev, plans, examples, desc=desc)
        return [quality(rows[p.name], target) for p in plans]
    return score_fn


def exhaustive(ev, examples, n_layers: int, granularities: Sequence[int], target: str = "task") -> dict[int, list[Point]]:
    """Score full reuse and every group at each granularity; coarser grids reuse the finer one's cells."""
    grids = {g: [()] + [((a, b),) for a, b in candidate_groups(n_layers, g)] for g in granularities}
    union = list(dict.fromkeys(gr for g in sorted(grids) for gr in grids[g]))
    union.sort(key=lambda gr: (gr[0][0], gr[0][1]) if gr else (-1, -1))  # start-major: GroupMemo reuse
    plans = {gr: plan_of(gr, n_layers) for gr in union}
    rows = evaluate(ev, list(plans.values()), examples, desc=f"exhaustive g={','.join(map(str, granularities))}")
    scores = {gr: quality(rows[plans[gr].name], target) for gr in union}
    return {g: [Point(plans[gr].name, gr, scores[gr]) for gr in grids[g]] for g in granularities}


def paired_se(ev, plan_a: str, plan_b: str, examples, target: str = "task") -> float:
    """Standard error (quality points) of the mean per-example difference between two scored plans:
    how far apart two profiled qualities can be by the choice of examples alone."""
    from ds_study.metrics import example_value

    if plan_a == plan_b:
        return 0.0
    d = [100 * (example_value(ev.store.get(plan_a, ex.id), target) - example_value(ev.store.get(plan_b, ex.id), target))
         for ex in examples]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    return round(math.sqrt(var / len(d)), 2)


def reliabilities(ev, points: Sequence[Point], examples) -> dict | None:
    """Split-half ranking reliability of these plans under every quality target (``metrics.TARGETS``),
    from the same cells: which signal can the profiling split rank plans by?"""
    from ds_study.metrics import TARGETS, example_value

    if len(examples) < 4 or len(points) < 3:
        return None
    return {t: ranking_reliability({p.plan: [example_value(ev.store.get(p.plan, ex.id), t) for ex in examples]
                                    for p in points}) for t in TARGETS}


def holdout_check(cfg, pair, task, table: list[dict], points: dict, n_layers: int) -> dict:
    """Score every plan of the comparison table on a held-out split and add its columns to ``table``.

    Both frontiers are picked on the same 50 profiling examples, and the exhaustive one keeps the
    best of many noisy estimates, so its profiled qualities are biased upward (the winner's curse);
    the greedy scores fewer plans and is less biased. Scoring the chosen plans on examples neither
    search saw says whether a shortfall is real.
    """
    from omegaconf import OmegaConf

    from ds_study import runner

    sc = cfg.search
    target = str(sc.get("target") or "task")
    hcfg = OmegaConf.merge(cfg, {"split": sc.holdout_split, "limit": sc.get("holdout_limit")})
    examples, ev = runner.evaluator_for(hcfg, pair, task)
    plans = {n: plan_of(points[n].groups, n_layers)
             for n in sorted({r[c] for r in table for c in ("exhaustive_plan", "greedy_plan")})}
    rows = evaluate(ev, list(plans.values()), examples, f"held-out ({sc.holdout_split})")
    score = {n: quality(rows[p.name], target) for n, p in plans.items()}
    for r in table:
        e, g = r["exhaustive_plan"], r["greedy_plan"]
        r["exhaustive_holdout"], r["greedy_holdout"] = score[e], score[g]
        r["diff_holdout"] = round(score[g] - score[e], 2)
        r["se_holdout"] = paired_se(ev, plans[e].name, plans[g].name, examples, target)
        if target != "task":  # what the continuous target's choice is worth in the task metric
            r["exhaustive_holdout_task"] = quality(rows[plans[e].name])
            r["greedy_holdout_task"] = quality(rows[plans[g].name])
    return {"split": sc.holdout_split, "n_examples": len(examples), "plans": len(plans)}


PRIORS = ("v_dev", "attn", "kv", "k_dev", "e_dev")  # layer_prior's columns


def as_list(v) -> list:
    """A setting given as one value or a list (``search.deltas=0.05`` or ``[0.05,0.01]``)."""
    return [v] if isinstance(v, (int, float, str)) else list(v)


def check_config(sc, n_layers: int, split: str | None = None) -> None:
    """Every ``search.*`` setting, checked before any model is loaded or cell scored (a bad value
    found after the baselines would cost a real pair hours). ``split``: the one being profiled."""
    def fail(key: str, want: str, got) -> None:
        raise ValueError(f"search.{key} must be {want}, got {got!r}")

    def as_int(key: str, v, lo: int, hi: int | None = None) -> int:
        try:
            i = int(v)
        except (TypeError, ValueError):
            i = None
        if i is None or str(i) != str(v).strip() or i < lo or (hi is not None and i > hi):
            fail(key, f"an integer in [{lo}, {hi if hi is not None else 'inf'}]", v)
        return i

    if sc.method not in ("exhaustive", "greedy", "both"):
        fail("method", "exhaustive, greedy or both", sc.method)
    from ds_study.metrics import TARGETS

    if str(sc.get("target") or "task") not in TARGETS:
        fail("target", " | ".join(TARGETS), sc.target)
    grans = as_list(sc.granularity)
    if not grans:
        fail("granularity", "a non-empty list of layer counts, e.g. [2] or [1,2]", list(grans))
    for g in grans:
        as_int("granularity", g, 1, n_layers)
    as_int("greedy_granularity", sc.greedy_granularity, 1, n_layers)
    if sc.prior not in PRIORS:
        fail("prior", " | ".join(PRIORS), sc.prior)
    if str(sc.greedy_width) != "auto":
        as_int("greedy_width", sc.greedy_width, 1, 2)
    if not 0 < float(sc.max_fraction) <= 1:
        fail("max_fraction", "in (0, 1]", sc.max_fraction)
    as_int("max_groups", sc.max_groups, 1)
    if float(sc.new_group_margin) < 0:
        fail("new_group_margin", ">= 0", sc.new_group_margin)
    for key in ("delta_mode", "critical_mode"):
        if sc[key] not in ("relative", "absolute"):
            fail(key, "relative or absolute", sc[key])
    deltas = as_list(sc.deltas)
    if not deltas or any(not 0 <= float(d) < 1 for d in deltas):
        fail("deltas", "a non-empty list of fractions in [0, 1) (relative; absolute: 0.01 = 1 point)", list(deltas))
    sensitivity_layers(sc, n_layers)
    if not 0 <= float(sc.critical_threshold) < 1:
        fail("critical_threshold", "a fraction in [0, 1)", sc.critical_threshold)
    if sc.get("holdout_split") is not None:
        if sc.holdout_split not in ("profile", "test"):
            fail("holdout_split", "null, profile or test", sc.holdout_split)
        if sc.holdout_split == split:
            fail("holdout_split", f"the split not being profiled ({'test' if split == 'profile' else 'profile'})",
                 sc.holdout_split)
    if sc.get("holdout_limit") is not None:
        as_int("holdout_limit", sc.holdout_limit, 1)
    if not isinstance(sc.get("publish", False), bool):
        fail("publish", "true or false", sc.publish)
    if sc.get("out_root") and not sc.get("publish"):
        raise ValueError("search.out_root is where search.publish=true writes the stable result files; a profile "
                         "writes its own files into its run directory. Add search.publish=true or drop search.out_root")


def sensitivity_layers(sc, n_layers: int) -> list[int]:
    """The layers single-layer sensitivity scores: ``search.sensitivity_layers`` (one index or a list of
    distinct indices in [0, n_layers - 1]), or every layer when it is null or absent."""
    v = sc.get("sensitivity_layers")
    if v is None:
        return list(range(n_layers))
    want = f"null (every layer) or a non-empty list of distinct layer indices in [0, {n_layers - 1}], e.g. [15,18]"
    given = as_list(v)
    if not given or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n_layers for x in given) \
            or len(set(given)) != len(given):
        raise ValueError(f"search.sensitivity_layers must be {want}, got {v!r}")
    return [int(x) for x in given]


def publish_root(cfg) -> Path:
    """Where ``search.publish=true`` writes the stable per-pair files the figures read:
    ``search.out_root``, or ``<results_root>/../search`` (the committed ``results/search``)."""
    sc = cfg.search
    return Path(sc.out_root) if sc.get("out_root") else Path(cfg.results_root).parent / "search"


def portable(obj, root: Path):
    """``obj`` with every string that is a path inside ``root`` made relative to it, so files meant
    to be committed do not carry the absolute checkout path of whoever regenerated them."""
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith(str(root) + "/"):
        return obj[len(str(root)) + 1:]
    return obj


def run_from_profile(cfg, pair, task, examples, ev, run: Path) -> dict:
    """Profiling and selection after ``ds_study.profile``'s baselines: sensitivity, exhaustive and/or
    greedy search, frontier, selected plans.

    Every file goes into the run directory ``run`` (points_g*.csv, frontier_g*.csv, greedy.csv,
    greedy_vs_exhaustive_*.{csv,json,md}, search.json), so a profile never changes committed files.
    Only with ``search.publish=true`` (regenerating the committed results) are the same files also
    written to ``<publish_root>/<pair>/<dataset>/`` and the greedy-vs-exhaustive table of every
    published pair to ``<publish_root>/greedy_vs_exhaustive.md``."""
    import sys

    from ds_study import metrics, runner

    sc, L = cfg.search, pair.n_layers
    check_config(sc, L, cfg.split)
    deltas = [float(d) for d in as_list(sc.deltas)]
    target = str(sc.get("target") or "task")
    label = metrics.get_metric(task.metric).label if target == "task" else f"exp(-{target.upper()})"
    n0 = ev.n_run
    base = quality(evaluate(ev, [parse_plan("full_prefill", L)], examples, "full prefill")["full_prefill"], target)
    result: dict = {"pair": cfg.model_pair.name, "receiver": pair.receiver_id["name"],
                    "sender": pair.sender_id["name"], "dataset": task.name, "split": cfg.split,
                    "command": " ".join(["python -m ds_study.profile", *sys.argv[1:]]),
                    "models": pair.identities(),
                    "base": base, "metric": task.metric, "metric_label": label, "n_examples": len(examples),
                    "n_layers": L, "delta_mode": sc.delta_mode, "deltas": deltas, "method": sc.method, "target": target}
    if sc.sensitivity:
        result["sensitivity"] = sensitivity_section(ev, examples, L, base, sc, target)
    exh = {}
    if sc.method in ("exhaustive", "both"):
        exh, result["exhaustive"] = exhaustive_section(ev, examples, L, base, sc, target, run)
        for g, pts in exh.items():
            report.print_exhaustive(result["exhaustive"][g], g, L, len(examples), base, label)
    gre = None
    if sc.method in ("greedy", "both"):
        gre, result["greedy"] = greedy_section(ev, pair, examples, L, base, sc, target, run)
    if exh and gre is not None:
        result["comparison"] = comparison_section(cfg, pair, task, ev, examples, exh, gre, label, result["command"], run)
        report.print_comparison(result["comparison"])
    scored = (["full_prefill"] + [p.name for p in runner.plans_of(cfg.get("plans") or [], L)]  # the profile's baselines
              + [p.name for p in sensitivity_plans(L, result.get("sensitivity", {}).get("layers", []))]
              + [p.plan for pts in exh.values() for p in pts] + ([p.plan for p in gre.points] if gre else []))
    result["plan_means"] = plan_means(ev, scored, examples)
    result["cells_computed"] = ev.n_run - n0
    report.print_selections(result, sc, base, label)
    runner.write_json(run / "search.json", result)
    if sc.get("publish"):
        publish(cfg, task, run, result, exh, gre)
    return result


def plan_means(ev, plans: Sequence[str], examples) -> dict[str, dict]:
    """Per plan, the mean teacher-forced NLL of the gold answer and the mean KL from the receiver's full
    prefill (nats per answer token, over the profiling examples), read from the cells already scored:
    the continuous numbers behind ``search.target=nll|kl``, before exp(-x) and rounding to 0.01 points.
    Plans with a missing cell, or cells without the continuous signals, are left out."""
    out = {}
    for name in dict.fromkeys(plans):
        rows = [ev.store.get(name, ex.id) for ex in examples]
        if rows and all(r is not None and "nll" in r and "kl" in r for r in rows):
            out[name] = {t: round(sum(r[t] for r in rows) / len(rows), 6) for t in ("nll", "kl")}
    return out


def sensitivity_section(ev, examples, L: int, base: float, sc, target: str) -> dict:
    """Single-layer reuse of every layer (paper Fig. 7), or of ``search.sensitivity_layers`` only, and
    the critical layers among them; ``layer_scores[i]`` is layer ``layers[i]``."""
    layers = sensitivity_layers(sc, L)
    plans = sensitivity_plans(L, layers)
    rows = evaluate(ev, plans, examples, "sensitivity")
    layer_scores = [quality(rows[p.name], target) for p in plans]
    return {"layers": layers, "layer_scores": layer_scores,
            "critical_layers": critical_layers(layer_scores, base, sc.critical_threshold, sc.critical_mode, layers),
            "critical_threshold": sc.critical_threshold, "critical_mode": sc.critical_mode}


def exhaustive_section(ev, examples, L: int, base: float, sc, target: str, out: Path) -> tuple[dict, dict]:
    """Every contiguous group at each granularity: points and frontier CSVs in ``out``, and per
    granularity the frontier, the selected plans and the plan-ranking reliability."""
    import pandas as pd

    exh = exhaustive(ev, examples, L, [int(x) for x in as_list(sc.granularity)], target)
    summary = {}
    for g, pts in exh.items():
        front = frontier(pts, L)
        budget = budget_frontier(front)
        pd.DataFrame([p.row() for p in pts]).to_csv(out / f"points_g{g}.csv", index=False)
        pd.DataFrame(frontier_rows(front, budget)).to_csv(out / f"frontier_g{g}.csv", index=False)
        summary[g] = {"evaluations": n_exhaustive(L, g), "frontier": frontier_rows(front, budget),
                      "selected": selections(front, base, [float(d) for d in as_list(sc.deltas)], sc.delta_mode),
                      "reliability": reliabilities(ev, pts, examples)}
    return exh, summary


def greedy_section(ev, pair, examples, L: int, base: float, sc, target: str, run: Path) -> tuple:
    """The greedy walk, guided by a per-layer deviation prior (measured here into ``run`` if the
    profile has not written it yet); greedy.csv in ``run``."""
    import pandas as pd

    from ds_study import deviation

    dev_csv = run / "deviation.csv"
    if not dev_csv.exists():
        per_ex = []
        for ex in examples:
            s_cache, r_cache = ev.caches(ex, need_receiver=True)
            per_ex += [{"id": ex.id, **r} for r in deviation.layer_deviation(pair.receiver, r_cache, s_cache)]
        deviation.summarize(per_ex).to_csv(dev_csv, index=False)
    prior = layer_prior(dev_csv, sc.prior)
    gg = int(sc.greedy_granularity)
    auto = str(sc.greedy_width) == "auto"
    width = 2 if auto else int(sc.greedy_width)
    budget = greedy_budget(L, gg, float(sc.max_fraction)) if auto else None
    gre = greedy(L, gg, scorer(ev, examples, L, "greedy", target), prior, width=width, budget=budget,
                 max_groups=int(sc.max_groups), new_group_margin=float(sc.new_group_margin))
    pd.DataFrame([{"step": i, **p.row()} for i, p in enumerate(gre.points)]).to_csv(run / "greedy.csv", index=False)
    gbudget = budget_frontier(frontier(gre.points, L))
    return gre, {"evaluations": gre.evaluations, "prior": sc.prior, "prior_values": prior,
                 "width": width, "budget": budget, "max_groups": int(sc.max_groups), "log": gre.log,
                 "points": [p.row() for p in gre.points],
                 "selected": selections(gbudget, base, [float(d) for d in as_list(sc.deltas)], sc.delta_mode)}


def comparison_section(cfg, pair, task, ev, examples, exh: dict, gre, label: str, command: str, root: Path) -> dict:
    """Greedy against the exhaustive frontier at every recompute budget, with the paired SE of each
    gap, the plan-ranking reliability and (``search.holdout_split``) the same plans held out; the
    table and its metadata go to ``root`` as greedy_vs_exhaustive_<pair>_<dataset>.{csv,json,md}."""
    import pandas as pd

    from ds_study import runner
    from ds_study.metrics import example_value

    sc, L = cfg.search, pair.n_layers
    target = str(sc.get("target") or "task")
    g = int(sc.greedy_granularity)
    pts = exh[g] if g in exh else exhaustive(ev, examples, L, [g], target)[g]
    table = comparison(pts, gre.points, L)
    for r in table:
        r["se"] = paired_se(ev, r["exhaustive_plan"], r["greedy_plan"], examples, target)
    n_ex = n_exhaustive(L, g)
    reliability = ranking_reliability({p.plan: [example_value(ev.store.get(p.plan, ex.id), target) for ex in examples]
                                       for p in pts}) if len(examples) >= 4 and len(pts) >= 3 else None
    holdout = None
    if sc.get("holdout_split"):
        holdout = holdout_check(cfg, pair, task, table, {p.plan: p for p in [*pts, *gre.points]}, L)
    meta = {"pair": cfg.model_pair.name, "receiver": pair.receiver_id["name"], "sender": pair.sender_id["name"],
            "dataset": task.name, "split": cfg.split, "n_examples": len(examples), "metric": label, "granularity": g,
            "greedy_evaluations": gre.evaluations, "exhaustive_evaluations": n_ex,
            "evaluation_ratio": gre.evaluations / n_ex,
            "max_shortfall": round(max(0.0, -min(r["diff"] for r in table)), 2),
            "ranking_reliability": reliability, "command": command}
    if holdout is not None:
        meta["holdout"] = holdout
        meta["max_shortfall_holdout"] = round(max(0.0, -min(r["diff_holdout"] for r in table)), 2)
    stem = f"greedy_vs_exhaustive_{cfg.model_pair.name}_{task.name}"  # one table per pair and dataset
    pd.DataFrame(table).to_csv(root / f"{stem}.csv", index=False)
    runner.write_json(root / f"{stem}.json", meta)
    return {**meta, "table": table, "markdown": str(report.write_comparison_md(root))}


def publish(cfg, task, run: Path, result: dict, exh: dict, gre) -> Path:
    """``search.publish=true``: copy this run's search files to the stable per-pair directory the
    figures read (``results/search/<pair>/<dataset>/`` by default, committed), and rebuild the
    greedy-vs-exhaustive markdown there. The explicit "regenerate committed results" step."""
    import shutil

    from ds_study import runner

    root = publish_root(cfg)
    out = root / cfg.model_pair.name / task.name
    out.mkdir(parents=True, exist_ok=True)
    # the directory holds the latest search only: drop tables of granularities or methods it did not run
    made = {f"{kind}_g{g}.csv" for g in exh for kind in ("points", "frontier")} | ({"greedy.csv"} if gre else set())
    for f in out.glob("*.csv"):
        if f.name not in made:
            f.unlink()
    for name in sorted(made):
        shutil.copyfile(run / name, out / name)
    if "comparison" in result:
        stem = f"greedy_vs_exhaustive_{cfg.model_pair.name}_{task.name}"
        for ext in (".csv", ".json"):
            shutil.copyfile(run / f"{stem}{ext}", root / f"{stem}{ext}")
        md = report.write_comparison_md(root)
        result = {**result, "comparison": {**result["comparison"], "markdown": str(md)}}
    runner.write_json(out / "search.json", portable(result, runner.REPO_ROOT))
    print(f"published the search to {out}")
    return out
