"""Plans as scored points, and what is read off them: frontier, budget, selection, critical layers.

Exhaustive and greedy search (``ds_study.search``), the study and the figures all speak of plans as
*points* -- the groups a plan recomputes and its quality on the profiling split -- and read the same
things from them: the best plan per recompute count (the frontier), the best within a budget, the
cheapest plan within delta of full prefill, the layers whose single-layer reuse drops quality, and
whether the profiling split can rank the plans at all (split-half reliability). Nothing here runs a
model, so all of it is exact to test and cheap to recompute from committed cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ds_study.plans import Plan, groups_plan, parse_plan


def candidate_groups(n_layers: int, g: int = 1) -> list[tuple[int, int]]:
    """Every contiguous group at granularity g, start-major: [0, g-1], [0, 2g-1], ..., [g, 2g-1], ..."""
    if g < 1:
        raise ValueError(f"granularity must be >= 1, got {g}")
    out = []
    for a in range(0, n_layers, g):
        for end in range(a + g, n_layers + g, g):
            out.append((a, min(end, n_layers) - 1))
    return out


def plan_of(groups: Sequence[tuple[int, int]], n_layers: int) -> Plan:
    """The canonical plan for a set of groups: full reuse and full prefill keep their baseline names,
    so their cells are shared with the quality study and the profile job."""
    groups = sorted(tuple(g) for g in groups)
    if not groups:
        return parse_plan("full_reuse", n_layers)
    if groups == [(0, n_layers - 1)]:
        return parse_plan("full_prefill", n_layers)
    return groups_plan(groups, n_layers)


def n_exhaustive(n_layers: int, g: int) -> int:
    """Plans exhaustive profiling evaluates: all groups plus full reuse (full prefill is the group [0, L-1])."""
    m = math.ceil(n_layers / g)
    return m * (m + 1) // 2 + 1


@dataclass(frozen=True)
class Point:
    """One plan scored on the whole profiling split."""

    plan: str
    groups: tuple[tuple[int, int], ...]
    score: float

    @property
    def k(self) -> int:
        return sum(b - a + 1 for a, b in self.groups)

    @property
    def transitions(self) -> int:
        """Reuse -> recompute switches, each needing the sender's E (a group at layer 0 needs none)."""
        return sum(1 for a, _ in self.groups if a > 0)

    def tie_key(self) -> tuple:
        """Sort key: higher score first, then fewer transitions, then the earlier group."""
        return (-self.score, self.transitions, self.groups[0][0] if self.groups else -1, self.plan)

    def row(self) -> dict:
        return {"plan": self.plan, "groups": groups_str(self.groups), "k": self.k,
                "transitions": self.transitions, "score": self.score}


def groups_str(groups) -> str:
    return ",".join(f"{a}-{b}" for a, b in groups) or "none"


def parse_groups(s: str) -> tuple[tuple[int, int], ...]:
    if not s or s == "none":
        return ()
    return tuple(tuple(int(x) for x in part.split("-")) for part in s.split(","))


def frontier(points: Sequence[Point], n_layers: int) -> list[Point | None]:
    """frontier[k]: the best point with exactly k recomputed layers (None if none was scored)."""
    best: list[Point | None] = [None] * (n_layers + 1)
    for p in points:
        if best[p.k] is None or p.tie_key() < best[p.k].tie_key():
            best[p.k] = p
    return best


def budget_frontier(front: Sequence[Point | None]) -> list[Point | None]:
    """best[k]: the best point with *at most* k recomputed layers, i.e. the Pareto frontier read at a
    recompute budget (a point is dominated by one that recomputes no more and scores no less)."""
    out, cur = [], None
    for p in front:
        if p is not None and (cur is None or p.score > cur.score):
            cur = p
        out.append(cur)
    return out


def threshold(base: float, delta: float, mode: str = "relative") -> float:
    if mode == "relative":
        return (1 - delta) * base
    if mode == "absolute":
        return base - 100 * delta  # quality is on a 0-100 scale
    raise ValueError(f"delta mode must be 'relative' or 'absolute', got {mode!r}")


def select(front: Sequence[Point | None], base: float, delta: float, mode: str = "relative") -> Point | None:
    """The fewest recomputed layers whose frontier quality is within delta of full prefill."""
    t = threshold(base, delta, mode) - 1e-9  # scores are rounded to 0.01; don't lose ties to float noise
    for p in front:
        if p is not None and p.score >= t:
            return p
    return None


def sensitivity_plans(n_layers: int, layers: Sequence[int] | None = None) -> list[Plan]:
    """Receiver computes everything itself but reads the sender's KV at one layer: every layer, or
    only ``layers``."""
    return [parse_plan(f"reuse_only:{i}", n_layers) for i in (range(n_layers) if layers is None else layers)]


def critical_layers(layer_scores: Sequence[float], base: float, threshold_: float = 0.10,
                    mode: str = "relative", layers: Sequence[int] | None = None) -> list[int]:
    """Layers whose single-layer reuse drops quality by more than the threshold (default: 10% relative).
    ``layer_scores[i]`` is layer ``layers[i]`` (default: layer i)."""
    cut = threshold(base, threshold_, mode)
    layers = range(len(layer_scores)) if layers is None else layers
    return [layer for layer, s in zip(layers, layer_scores) if s < cut - 1e-9]


def frontier_rows(front, budget) -> list[dict]:
    out = []
    for k, (p, b) in enumerate(zip(front, budget)):
        out.append({"k": k, "plan": p.plan if p else None, "groups": groups_str(p.groups) if p else None,
                    "transitions": p.transitions if p else None, "score": p.score if p else None,
                    "budget_plan": b.plan if b else None, "budget_score": b.score if b else None})
    return out


def selections(front, base: float, deltas: Sequence[float], mode: str) -> list[dict]:
    out = []
    for d in deltas:
        p = select(front, base, d, mode)
        out.append({"delta": d, "mode": mode, "threshold": round(threshold(base, d, mode), 4),
                    "plan": p.plan if p else None, "groups": groups_str(p.groups) if p else None,
                    "k": p.k if p else None, "score": p.score if p else None})
    return out


def comparison(exh: list[Point], gre: list[Point], n_layers: int) -> list[dict]:
    """Per recompute budget k: the best plan with at most k recomputed layers, exhaustive vs greedy."""
    eb, gb = budget_frontier(frontier(exh, n_layers)), budget_frontier(frontier(gre, n_layers))
    return [{"k": k, "exhaustive_plan": e.plan, "exhaustive": e.score, "greedy_plan": g.plan, "greedy": g.score,
             "diff": round(g.score - e.score, 2)} for k, (e, g) in enumerate(zip(eb, gb))]


def ranking_reliability(scores: dict[str, Sequence[float]], n_splits: int = 200, seed: int = 0) -> dict:
    """Whether the profiling split can rank these plans at all: split the examples into random
    halves, rank the plans by their mean score on each half, and correlate the two rankings
    (Spearman). Near 1: the ranking is a property of the plans. Near 0: it is a property of which
    examples were drawn, so the best profiled plan is a noise maximum (the winner's curse) and no
    search with fewer evaluations can be expected to match it. ``scores[plan]``: per-example scores,
    the same examples in the same order for every plan. Costs no evaluation (reuses the cells)."""
    import random

    import pandas as pd

    df = pd.DataFrame({name: list(v) for name, v in scores.items()})
    if df.shape[1] < 3 or df.shape[0] < 4:
        raise ValueError("ranking reliability needs at least 3 plans scored on at least 4 examples")
    rng, rows, rhos = random.Random(seed), list(range(df.shape[0])), []
    for _ in range(n_splits):
        rng.shuffle(rows)
        half_a = df.iloc[rows[: len(rows) // 2]].mean().rank()
        half_b = df.iloc[rows[len(rows) // 2:]].mean().rank()
        rho = half_a.corr(half_b)  # Pearson on ranks: Spearman (NaN if a half ties every plan)
        if not math.isnan(rho):
            rhos.append(float(rho))
    out = {"n_plans": df.shape[1], "n_examples": df.shape[0], "n_splits": n_splits, "n_defined": len(rhos),
           "seed": seed}
    if not rhos:  # e.g. every plan scores 0 everywhere: nothing to rank
        return {**out, "spearman_median": None, "spearman_p05": None, "spearman_p95": None}
    rhos.sort()
    return {**out, "spearman_median": round(rhos[len(rhos) // 2], 3),
            "spearman_p05": round(rhos[int(0.05 * len(rhos))], 3), "spearman_p95": round(rhos[int(0.95 * len(rhos))], 3)}
