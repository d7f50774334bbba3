"""The strategies' rules: what the link carries for a request, in which order, and what waits on what.

DroidSpeak's receiver (paper §4.2) gets the sender's per-layer KV and the hidden state E at each
transition layer, and its latency depends on *how* it loads them:

- ``send_all``    (a) load E and every layer's KV, then recompute;
- ``send_reused`` (b) load only the transition E and the reused layers' KV, then recompute;
- ``pipelined``   (c) E first; recompute the group while the reused KV streams; the final prompt
                      pass waits on each layer's arrival, and loading for the next request may
                      overlap this request's recompute;
- ``full_prefill`` and ``full_reuse`` as the two ends.

The simulator (``simulate``) and the real engine (``execute``) follow these same rules; requests
are checked here before any work starts, and rejected entries are repaired here.
"""

from __future__ import annotations

from typing import NamedTuple

from ds_study.plans import Plan, PlanError, groups_plan, layer_runs, parse_plan
from ds_study.serving.errors import EngineError


STRATEGIES: dict[str, str] = {
    "send_all": "(a) load E and every layer's KV, then recompute",
    "send_reused": "(b) load only the transition E and the reused layers' KV, then recompute",
    "pipelined": "(c) E first, recompute while the reused KV streams, final pass waits per layer",
    "full_prefill": "the receiver prefills the context itself; nothing is loaded",
    "full_reuse": "stream every layer's KV and recompute nothing; the final pass waits per layer",
}
ALIASES = {"a": "send_all", "b": "send_reused", "c": "pipelined"}
# Streaming strategies consume each item when it is needed, so the link may run ahead into the next
# request; the others load everything, then compute, one request at a time (paper Fig. 13 a, b).
STREAMING = ("pipelined", "full_reuse")


class Item(NamedTuple):
    """One unit on the link: a layer's K and V together ("kv"), or the E entering a layer ("e")."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"{'KV' if self.kind == 'kv' else 'E'}{self.layer}"

    def entry_kinds(self) -> tuple[str, ...]:
        return ("k", "v") if self.kind == "kv" else ("e",)


def resolve_strategy(name: str) -> str:
    s = ALIASES.get(name, name)
    if s not in STRATEGIES:
        raise EngineError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)} "
                          f"(or a/b/c for {', '.join(ALIASES.values())})")
    return s


def check_request(strategy: str, plan, n_layers: int) -> tuple[str, Plan]:
    """Validate a (strategy, plan) pair for an ``n_layers`` model before any work starts.

    ``full_prefill`` and ``full_reuse`` imply their own plan; the others take a recompute-group plan.
    """
    strategy = resolve_strategy(strategy)
    if strategy == "full_prefill":
        return strategy, parse_plan("full_prefill", n_layers)
    if strategy == "full_reuse":
        return strategy, parse_plan("full_reuse", n_layers)
    plan = parse_plan(plan, n_layers)
    if plan.kind != "groups":
        raise PlanError(f"the engine runs recompute-group plans; {plan.name!r} is not one")
    return strategy, groups_plan(plan.groups, n_layers, label=plan.label)  # re-checks range and overlap


def transfer_items(strategy: str, plan: Plan, n_layers: int) -> list[Item]:
    """What the link carries for one request, in order: transition E first, then KV in layer order."""
    strategy = resolve_strategy(strategy)
    if strategy == "full_prefill":
        return []
    es = [Item(a, "e") for a in plan.transition_layers()]
    layers = range(n_layers) if strategy == "send_all" else plan.reused_layers(n_layers)
    return es + [Item(i, "kv") for i in layers]


def repair_plan(plan: Plan, n_layers: int, bad_kv=(), bad_e=()) -> Plan:
    """The least extra recomputation that never reads a rejected entry.

    Rejected KV layers join the recomputed set; a group whose starting E is unavailable (rejected,
    or never sent because the layer was reused) grows backwards into the previous group, or down
    to layer 0, which starts from the receiver's own embeddings.
    """
    have_e = set(plan.transition_layers()) - set(bad_e)
    rec = set(plan.recomputed_layers()) | set(bad_kv)
    while True:
        runs = layer_runs(rec)
        orphan = next(((a, b) for a, b in runs if a > 0 and a not in have_e), None)
        if orphan is None:
            break
        prev_end = max((b for _, b in runs if b < orphan[0]), default=-1)
        rec |= set(range(prev_end + 1, orphan[0]))
    return groups_plan(runs, n_layers, label="repair:" + (",".join(f"{a}-{b}" for a, b in runs) or "none"))
