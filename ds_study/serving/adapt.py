"""Runtime adaptation of the plan (paper §4.4, Fig. 21), and its bandwidth-aware extension.

The study's frontier gives, per recompute count k, the best plan's quality. At each receiver
prefill a policy picks k:

- ``LoadPolicy`` (the paper): with requests waiting, the fewest recomputed layers whose quality
  meets the target; otherwise the most recomputation whose estimated TTFT meets the SLO, the
  estimate priced at the bandwidth the system was profiled at (the paper does not adapt to it);
- ``BandwidthAwarePolicy`` (beyond the paper, its stated limitation): the same rules priced at
  the *measured* bandwidth, and under load the plan within the target that is *fastest* there,
  which is not the one with the fewest recomputed layers once loading KV costs more than
  recomputing it;
- ``FixedPolicy``: one plan throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_study.serving.load_sim import Costs


@dataclass(frozen=True)
class Point:
    """One frontier point: recompute ``k`` layers (in ``transitions`` groups) at this quality."""

    k: int
    quality: float
    plan: str = ""
    transitions: int = 1


class FixedPolicy:
    def __init__(self, point: Point):
        self.point, self.name = point, f"fixed k={point.k}"

    def __call__(self, unit, req, now) -> int:
        return self.point.k


class LoadPolicy:
    """Paper §4.4. ``gbps``: the bandwidth its latency model assumes (profiling time)."""

    name = "adaptive (load)"

    def __init__(self, frontier: list[Point], costs: Costs, target: float, slo_s: float, gbps: float | None):
        self.points = sorted(frontier, key=lambda p: p.k)
        self.ok = [p for p in self.points if p.quality >= target] or [self.points[-1]]
        self.costs, self.slo_s, self.gbps = costs, slo_s, gbps

    def estimate(self, p: Point, tokens: int) -> float:
        if p.k >= self.costs.n_layers:
            return self.costs.prefill_s("full_prefill", tokens)
        return self.costs.droidspeak_s(p.k, tokens, self.gbps, p.transitions if p.k else 0)

    def under_load(self, tokens: int) -> Point:
        return self.ok[0]

    def __call__(self, unit, req, now) -> int:
        tokens = len(req.prefix_ids) + len(req.suffix_ids)
        if unit.waiting:
            return self.under_load(tokens).k
        waited = now - req.arrival
        meets = [p for p in self.points if waited + self.estimate(p, tokens) <= self.slo_s]
        return (max(meets, key=lambda p: p.k) if meets else self.under_load(tokens)).k


class BandwidthAwarePolicy(LoadPolicy):
    """``LoadPolicy`` priced at the measured link bandwidth, and fastest-within-target under load."""

    name = "adaptive (load + bandwidth)"

    def under_load(self, tokens: int) -> Point:
        return min(self.ok, key=lambda p: (self.estimate(p, tokens), p.k))
