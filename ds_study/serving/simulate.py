"""A unit-cost simulator of the strategies' scheduling rules in virtual time (the paper's Fig. 13).

One serial link, one serial compute unit: it shows what each strategy's ordering costs without
any model, and tests pin the paper's numbers on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_study.serving.rules import STREAMING, Item, check_request, resolve_strategy, transfer_items
from ds_study.serving.timeline import RequestResult, Span


@dataclass
class SimJob:
    name: str
    n_layers: int
    plan: object  # anything parse_plan accepts
    arrival: float = 0.0


def simulate(jobs: list[SimJob], strategy: str, load_cost: float = 1.0, compute_cost: float = 1.0,
             final_cost: float = 0.0) -> list[RequestResult]:
    """Run the engine's scheduling rules in virtual time: one serial link, one serial compute unit.

    Every item on the link costs ``load_cost`` and every recomputed layer ``compute_cost``; the
    final prompt pass costs ``final_cost`` per layer and waits on each reused layer's arrival.
    Streaming strategies let the link run ahead into the next request; the others serve one
    request at a time (load, then compute), in FIFO order.
    """
    strategy = resolve_strategy(strategy)
    link_free = compute_free = prev_done = 0.0
    results = []
    for job in sorted(jobs, key=lambda j: j.arrival):
        strat, plan = check_request(strategy, job.plan, job.n_layers)
        spans: list[Span] = []
        t = max(job.arrival, link_free) if strat in STREAMING else max(job.arrival, link_free, prev_done)
        arrived: dict[Item, float] = {}
        for it in transfer_items(strat, plan, job.n_layers):
            spans.append(Span(job.name, "load", t, t + load_cost, it.layer, it.kind))
            t += load_cost
            arrived[it] = t
        link_free = t
        c = max(job.arrival, compute_free)
        if strat not in STREAMING:
            c = max(c, link_free)
        for a, b in plan.groups:
            if a > 0:
                c = max(c, arrived[Item(a, "e")])
            for i in range(a, b + 1):
                spans.append(Span(job.name, "recompute", c, c + compute_cost, i))
                c += compute_cost
        for i in range(job.n_layers):
            w = arrived.get(Item(i, "kv"), c)
            if w > c:
                spans.append(Span(job.name, "wait", c, w, i))
                c = w
            if final_cost:
                spans.append(Span(job.name, "final", c, c + final_cost, i))
            c += final_cost
        compute_free = prev_done = c
        nbytes = len(arrived)  # in units: one per item
        results.append(RequestResult(job.name, strat, plan.name, job.arrival, c - job.arrival,
                                     bytes_loaded=nbytes, spans=spans))
    return results
