"""The serving loop as a discrete-event simulation (simpy), for loads and scales the CPU cannot serve.

It runs the scheduler of ``serving.server.Server`` in virtual time: per compute unit, an iteration
is at most one waiting request's prefill (first come, first served; held while its model's batch
is full), then one decode step of each model's running batch. Every duration comes from a
``Costs`` table fitted to measurements (``calibrate`` from a real server's iteration log, or
``gpu_costs`` from the committed H200 engine runs); nothing is assumed. Units host the sender, the
receiver or both roles (``colocated``: the CPU server), and requests reach the units hosting their
role round-robin, as the paper's router does.

A receiver's plan may be chosen per request by a ``policy`` (``serving.adapt``): it sees the
unit's queue and the time and returns the plan's recompute count; the cost table prices it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import simpy

from ds_study.serving.report import RequestRecord
from ds_study.serving.workload import ServeRequest


@dataclass
class Costs:
    """Seconds per iteration of the serving loop, from measurements.

    ``prefill[key]``: (prompt tokens, seconds) points, interpolated linearly (clamped at the ends);
    keys are "sender" and the receiver strategies ("full_prefill", "full_reuse", "cacheblend",
    "droidspeak"). ``layer`` and ``suffix``: the same kind of points for one recomputed layer and for
    the final pass with every layer's KV in place, which price a droidspeak plan of any size
    (``droidspeak_s``); ``kv_bytes_per_token_layer`` and ``e_bytes_per_token`` what it loads.
    ``decode``: (a, b, c) of a + b * batch + c * batch * width seconds per decode step; None where no
    decode step was measured (then requests must ask for one token).
    """

    prefill: dict[str, tuple[list[float], list[float]]]
    decode: tuple[float, float, float] | None
    n_layers: int
    layer: tuple[list[float], list[float]] | None = None
    suffix: tuple[list[float], list[float]] | None = None
    kv_bytes_per_token_layer: float = 0.0
    e_bytes_per_token: float = 0.0
    pipeline_overhead: float = 1.0  # measured pipelined TTFT / max(compute, load)
    source: str = ""

    def prefill_s(self, key: str, tokens: int) -> float:
        if key not in self.prefill:
            raise KeyError(f"no measured prefill cost for {key!r} (have {', '.join(self.prefill)})")
        xs, ys = self.prefill[key]
        return float(np.interp(tokens, xs, ys))

    def droidspeak_s(self, k: int, tokens: int, gbps: float | None, transitions: int = 1) -> float:
        """A pipelined plan recomputing ``k`` layers (``transitions`` groups starting past layer 0):
        max(compute, load) times the measured pipelining overhead."""
        if self.layer is None or self.suffix is None:
            raise KeyError("no per-layer costs: droidspeak plans of other sizes cannot be priced")
        compute = k * float(np.interp(tokens, *self.layer)) + float(np.interp(tokens, *self.suffix))
        nbytes = tokens * ((self.n_layers - k) * self.kv_bytes_per_token_layer + transitions * self.e_bytes_per_token)
        load = 0.0 if gbps is None else nbytes * 8 / (gbps * 1e9)
        return max(compute, load) * self.pipeline_overhead

    def decode_s(self, batch: int, width: int) -> float:
        if self.decode is None:
            raise KeyError("no measured decode step cost: simulate requests of one output token")
        a, b, c = self.decode
        return a + b * batch + c * batch * width

    def to_json(self) -> dict:
        return asdict(self)


def _line(xs, ys) -> tuple[list[float], list[float]]:
    """A least-squares line through (xs, ys), as two points spanning the xs."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    if len(set(xs.tolist())) < 2:
        return [float(xs.min())], [float(ys.mean())]
    slope, icept = np.polyfit(xs, ys, 1)
    lo, hi = float(xs.min()), float(xs.max())
    return [lo, hi], [icept + slope * lo, icept + slope * hi]


def calibrate(iterations: list[dict], n_layers: int, kv_bytes_per_token_layer: float = 0.0,
              e_bytes_per_token: float = 0.0, source: str = "") -> Costs:
    """Costs from real server iteration logs (``Server.iterations``): a line in prompt tokens per
    prefill kind, and a + b * batch + c * batch * width per decode step (least squares).
    Per-layer costs follow from two kinds measured on the same prompts: a recomputed layer is
    (full_prefill - full_reuse) / n_layers, the final pass is what full_reuse takes."""
    prefill: dict[str, tuple] = {}
    by_key: dict[str, list] = {}
    for it in iterations:
        if it["op"] == "prefill":
            key = "sender" if it["role"] == "sender" else it["served_as"]
            by_key.setdefault(key, []).append((it["tokens"], it["end"] - it["start"]))
    for key, pts in by_key.items():
        prefill[key] = _line(*zip(*pts))
    steps = [it for it in iterations if it["op"] == "decode"]
    decode = None
    if len(steps) >= 3:
        X = np.array([[1.0, s["batch"], s["batch"] * s["width"]] for s in steps])
        y = np.array([s["end"] - s["start"] for s in steps])
        decode = tuple(float(v) for v in np.linalg.lstsq(X, y, rcond=None)[0])
    layer = suffix = None
    if "full_prefill" in prefill and "full_reuse" in prefill:
        toks = sorted(set(prefill["full_prefill"][0]) | set(prefill["full_reuse"][0]))
        fp = np.interp(toks, *prefill["full_prefill"])
        fr = np.interp(toks, *prefill["full_reuse"])
        layer = (toks, ((fp - fr) / n_layers).tolist())
        suffix = (toks, fr.tolist())
    return Costs(prefill, decode, n_layers, layer, suffix, kv_bytes_per_token_layer, e_bytes_per_token, 1.0, source)


@dataclass
class Unit:
    """One compute unit: a FIFO of waiting requests and a running batch per role it hosts."""

    name: str
    roles: tuple[str, ...]
    waiting: deque = field(default_factory=deque)
    batches: dict = field(default_factory=dict)  # role -> list of [record, tokens still to generate]
    wake: object = None


def simulate_serving(requests: list[ServeRequest], strategy: str, costs: Costs, units: int = 1,
                     sender_units: int = 0, max_batch: int = 16, gbps: float | None = None,
                     policy: Callable | None = None, plan_k: int = 0, plan_transitions: int = 1) -> list[RequestRecord]:
    """Serve ``requests`` in virtual time; one record per request (as ``Server.run`` returns).

    ``sender_units == 0``: ``units`` colocated units, each hosting both roles (the CPU server);
    otherwise ``sender_units`` units serve senders and ``units`` serve receivers. ``strategy`` prices
    receiver prefills from ``costs.prefill[strategy]``, or, for "droidspeak" with ``plan_k`` (or a
    ``policy(unit, request, now) -> k``), from ``costs.droidspeak_s`` at ``gbps``.
    """
    env = simpy.Environment()
    if sender_units:
        pool = [Unit(f"s{i}", ("sender",)) for i in range(sender_units)] + \
               [Unit(f"r{i}", ("receiver",)) for i in range(units)]
    else:
        pool = [Unit(f"u{i}", ("sender", "receiver")) for i in range(units)]
    for u in pool:
        u.batches = {role: [] for role in u.roles}
        u.wake = env.event()
    rr = {role: itertools.cycle([u for u in pool if role in u.roles]) for role in ("sender", "receiver")}
    done: list[RequestRecord] = []

    def prefill_cost(u: Unit, req: ServeRequest, rec: RequestRecord) -> float:
        tokens = rec.n_prompt_tokens
        if req.role == "sender":
            return costs.prefill_s("sender", tokens)
        if strategy == "droidspeak" and (policy is not None or plan_k):
            k = policy(u, req, env.now) if policy is not None else plan_k
            rec.plan = f"k={k}"
            if k >= costs.n_layers:
                return costs.prefill_s("full_prefill", tokens)
            return costs.droidspeak_s(k, tokens, gbps, plan_transitions if k else 0)
        return costs.prefill_s(strategy, tokens)

    def arrive(req: ServeRequest):
        yield env.timeout(req.arrival)
        u = next(rr[req.role])
        u.waiting.append(req)
        if not u.wake.triggered:
            u.wake.succeed()

    def serve(u: Unit):
        while True:
            if not u.waiting and not any(u.batches.values()):
                u.wake = env.event()
                yield u.wake
            if u.waiting and len(u.batches[u.waiting[0].role]) < max_batch:
                req = u.waiting.popleft()
                rec = RequestRecord(req.name, req.role, req.context, req.replica,
                                    "sender" if req.role == "sender" else strategy,
                                    "sender" if req.role == "sender" else strategy, "", req.arrival,
                                    prefill_start=env.now, n_prompt_tokens=len(req.prefix_ids) + len(req.suffix_ids))
                yield env.timeout(prefill_cost(u, req, rec))
                rec.token_times.append(env.now)
                if req.max_new_tokens <= 1:
                    done.append(rec)
                else:
                    u.batches[req.role].append([rec, req.max_new_tokens - 1])
            for role, batch in u.batches.items():
                if batch:
                    width = max(r.n_prompt_tokens + len(r.token_times) for r, _ in batch)
                    yield env.timeout(costs.decode_s(len(batch), width))
                    for entry in batch:
                        entry[0].token_times.append(env.now)
                        entry[1] -= 1
                    done.extend(r for r, left in batch if left <= 0)
                    batch[:] = [e for e in batch if e[1] > 0]

    for req in requests:
        env.process(arrive(req))
    for u in pool:
        env.process(serve(u))
    env.run()
    return done
