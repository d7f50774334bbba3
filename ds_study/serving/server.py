"""A serving loop with both models: sender requests publish their caches, receiver requests reuse
them through the pipelined engine, and decoding is batched across requests at every iteration.

One compute unit (this thread) runs an iteration at a time: at most one waiting request's
prefill, then one decode step of every running request, per model (``DecodeBatch``). Prefills go
first-come first-served, so a receiver request always finds its context's sender request already
served. The KV/E store is shared; sender replicas (the paper's 4 + 4 per node, routed round-robin)
publish under their own identities, so a replica that dies takes only its own contexts with it.

How a receiver's prefill runs depends on the strategy:
- ``full_prefill``, ``full_reuse`` and ``droidspeak`` (a recompute-group plan, pipelined) go
  through ``Engine`` as a one-request run, which loads over the ``Link`` while it computes, falls
  back to full prefill when a transfer fails and recomputes rejected entries;
- ``cacheblend`` (not a layer plan) loads every layer's KV over the link, then recomputes its
  selected tokens (``executor.cacheblend_prefill``); a missing or corrupt entry means full prefill.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ds_study.arch import layout
from ds_study.caches import CacheChecksumError, ContextCache
from ds_study.executor import cacheblend_prefill, capture, suffix_pass
from ds_study.link import Link
from ds_study.plans import parse_plan
from ds_study.serving.batch import DecodeBatch, Row
from ds_study.serving.engine import Engine
from ds_study.serving.errors import EngineError, error_line
from ds_study.serving.report import RequestRecord
from ds_study.serving.store import EntryKey, KVStore, StoreMiss, context_hash
from ds_study.serving.timeline import Request
from ds_study.serving.workload import ServeRequest

SERVE_STRATEGIES = {
    "full_prefill": "the receiver prefills every context itself",
    "full_reuse": "the receiver decodes from the sender's KV, streamed layer by layer",
    "cacheblend": "load every layer's KV, recompute the most deviating tokens (CacheBlend across models)",
    "droidspeak": "recompute the plan's layer groups from the sender's E while the reused KV streams",
}
ENGINE_STRATEGY = {"full_prefill": "full_prefill", "full_reuse": "full_reuse", "droidspeak": "pipelined"}


def droidspeak_plan(spec, n_layers: int):
    """The plan of the droidspeak strategy: recompute groups that recompute some layers and reuse others."""
    plan = parse_plan(spec, n_layers) if spec else None
    if plan is None or plan.kind != "groups" or not plan.groups or not plan.reused_layers(n_layers):
        raise EngineError(f"strategy droidspeak needs recompute groups that leave some layers reused "
                          f"(e.g. plan=2-5 of {n_layers} layers), got {spec!r}")
    return plan


@dataclass
class Fault:
    """A fault injected during a run: sender replica ``replica`` dies ``at_s`` seconds into the run,
    or into request ``during``'s prefill (its cache is gone and its transfers in flight fail); or
    (``corrupt``) one reused KV entry of context ``corrupt_context`` is corrupted in the store right
    after the sender publishes it."""

    kind: str  # "kill_replica" | "corrupt"
    replica: int = 0
    at_s: float = 0.0
    during: str | None = None  # kill_replica: count at_s from this request's prefill start
    corrupt_context: int = 0


class Server:
    """Sender and receiver models, the shared store and link, and the scheduler of one strategy."""

    def __init__(self, receiver, sender, receiver_id: str, sender_id: str, strategy: str, plan: str | None = None,
                 link: Link | None = None, max_batch: int = 16, loader: str = "auto", timeout_s: float = 60.0,
                 cacheblend_ratio: float = 0.15, replicas: int = 1):
        if strategy not in SERVE_STRATEGIES:
            raise EngineError(f"unknown serving strategy {strategy!r}; choose one of {', '.join(SERVE_STRATEGIES)}")
        n = receiver.config.num_hidden_layers
        if strategy == "droidspeak":
            self.plan = droidspeak_plan(plan, n)
        else:
            self.plan = parse_plan(strategy if strategy != "cacheblend" else "full_reuse", n)
        if max_batch < 1 or replicas < 1:
            raise EngineError("max_batch and replicas must be at least 1")
        self.receiver, self.sender, self.rid, self.sid = receiver, sender, receiver_id, sender_id
        self.strategy, self.max_batch, self.ratio = strategy, max_batch, cacheblend_ratio
        self.link = link or Link()
        self.store = KVStore()
        self.engine = Engine(self.store, self.link, timeout_s=timeout_s, loader=loader, keep_cache=True)
        self.replicas = replicas
        self.dead: set[int] = set()
        self._current: ServeRequest | None = None  # the receiver request in the engine now
        self.iterations: list[dict] = []  # what each iteration ran and how long it took (the simulator's calibration)
        self._armed: dict[str, Fault] = {}  # request name -> the kill its prefill sets off
        self._timers: list[threading.Timer] = []
        self._readers: dict[str, int] = {}  # context hash -> receiver requests still to read its entries
        self._lock = threading.Lock()

    # -------------------------------------------------------------- identities and the store
    def replica_id(self, k: int) -> str:
        return self.sid if self.replicas == 1 else f"{self.sid}#r{k}"

    def _publish_kinds(self) -> tuple[list[int], list[int]]:
        """(layers whose KV the sender publishes, layers whose E it publishes) for this strategy."""
        n = self.receiver.config.num_hidden_layers
        if self.strategy == "full_prefill":
            return [], []
        if self.strategy == "droidspeak":
            return list(self.plan.reused_layers(n)), list(self.plan.transition_layers())
        return list(range(n)), []

    def kill(self, k: int) -> None:
        """Sender replica ``k`` dies: its entries are gone and a transfer from it in flight fails."""
        with self._lock:
            self.dead.add(k)
            self.store.drop_owner(self.replica_id(k))
            cur = self._current
            if cur is not None and cur.replica == k:
                for arr in self.engine.in_flight:
                    arr.fail(f"sender replica {k} died")

    # -------------------------------------------------------------- prefills
    @torch.no_grad()
    def _sender_prefill(self, req: ServeRequest, rec: RequestRecord, corrupt: bool):
        cc = capture(self.sender, req.prefix_ids, with_embeds=self.strategy == "droidspeak")
        kv_layers, e_layers = self._publish_kinds()
        with self._lock:
            if req.replica not in self.dead:
                owner = self.replica_id(req.replica)
                self.store.put_cache(cc, owner, self.rid, layers=kv_layers, kinds=("k", "v"))
                if e_layers:
                    self.store.put_cache(cc, owner, self.rid, layers=e_layers, kinds=("e",))
                if corrupt and kv_layers:
                    key = EntryKey(owner, context_hash(req.prefix_ids), kv_layers[0], "k", self.rid)
                    self.store.get(key, verify=False).add_(1.0)  # in place: its checksum no longer matches
        cache = DynamicCache(ddp_cache_data=list(zip(cc.keys, cc.values)), config=self.sender.config)
        return self._first_token(self.sender, req, cache)

    def _first_token(self, model, req: ServeRequest, cache) -> tuple[int, list]:
        p = next(model.parameters())
        hidden = suffix_pass(model, torch.tensor([req.suffix_ids], device=p.device), cache)[0]
        first = int(layout(model).head(hidden[-1:])[0].argmax())
        return first, [(layer.keys, layer.values) for layer in cache.layers]

    @torch.no_grad()
    def _receiver_prefill(self, req: ServeRequest, rec: RequestRecord):
        if self.strategy == "cacheblend":
            return self._cacheblend(req, rec)
        strategy = ENGINE_STRATEGY[self.strategy]
        r = Request(req.name, self.receiver, self.rid, self.replica_id(req.replica), self.plan,
                    req.prefix_ids, req.suffix_ids, max_new_tokens=1)
        with self._lock:
            self._current = req
        try:
            (res,) = self.engine.run([r], strategy)
        finally:
            with self._lock:
                self._current = None
        rec.fallback, rec.reason, rec.repaired_plan, rec.rejected = res.fallback, res.reason, res.repaired_plan, res.rejected
        rec.bytes_loaded = res.bytes_loaded
        if res.fallback:
            rec.served_as = res.fallback
        return res.token_ids[0], [(layer.keys, layer.values) for layer in res.cache.layers]

    def _cacheblend(self, req: ServeRequest, rec: RequestRecord):
        n, ctx, owner = self.receiver.config.num_hidden_layers, context_hash(req.prefix_ids), self.replica_id(req.replica)
        try:
            keys, values = [], []
            for i in range(n):
                for kind, out in (("k", keys), ("v", values)):
                    t = self.store.get(EntryKey(owner, ctx, i, kind, self.rid))
                    dst = torch.empty_like(t)
                    self.link.copy([t], [dst])  # paced: all of it before any computation (not pipelined)
                    out.append(dst)
                    rec.bytes_loaded += t.numel() * t.element_size()
            layers = cacheblend_prefill(self.receiver, req.prefix_ids, ContextCache(keys, values), self.ratio)
        except (StoreMiss, CacheChecksumError) as e:
            rec.fallback, rec.reason, rec.served_as = "full_prefill", error_line(e), "full_prefill"
            cc = capture(self.receiver, req.prefix_ids, with_embeds=False)
            layers = list(zip(cc.keys, cc.values))
        cache = DynamicCache(ddp_cache_data=layers, config=self.receiver.config)
        return self._first_token(self.receiver, req, cache)

    # -------------------------------------------------------------- the loop
    def run(self, requests: list[ServeRequest], faults: list[Fault] = (), progress=None) -> list[RequestRecord]:
        """Serve ``requests`` at their arrival times; one record per request, in completion order.
        ``progress``: called with (records done, requests waiting) after every iteration."""
        corrupt = {f.corrupt_context for f in faults if f.kind == "corrupt"}
        batches = {"sender": DecodeBatch(self.sender), "receiver": DecodeBatch(self.receiver)}
        pending = deque(sorted(requests, key=lambda r: r.arrival))
        waiting: deque[ServeRequest] = deque()
        done: list[RequestRecord] = []
        t0 = time.perf_counter()
        clock = lambda: time.perf_counter() - t0  # noqa: E731
        timers = [self._timer(f) for f in faults if f.kind == "kill_replica" and f.during is None]
        self._armed = {f.during: f for f in faults if f.kind == "kill_replica" and f.during is not None}
        self._timers = timers
        try:
            while pending or waiting or any(len(b) for b in batches.values()):
                while pending and pending[0].arrival <= clock():
                    waiting.append(pending.popleft())
                busy = False
                if waiting and len(batches[waiting[0].role]) < self.max_batch:
                    busy = True
                    req = waiting.popleft()
                    start = clock()
                    rec, first, layers = self._prefill(req, clock, corrupt)
                    self.iterations.append({"op": "prefill", "role": req.role, "served_as": rec.served_as,
                                            "tokens": rec.n_prompt_tokens, "start": start, "end": clock()})
                    if first in req.eos or req.max_new_tokens <= 1:
                        done.append(rec)
                    else:
                        batches[req.role].join(Row(rec, first, rec.n_prompt_tokens, req.max_new_tokens - 1, req.eos),
                                               layers)
                for role, b in batches.items():
                    if len(b):
                        busy = True
                        start, width, size = clock(), b.mask.shape[1], len(b)
                        stepped = b.step()
                        now = clock()
                        self.iterations.append({"op": "decode", "role": role, "batch": size, "width": width,
                                                "start": start, "end": now})
                        for row, tok, finished in stepped:
                            if tok is not None:
                                row.key.token_ids.append(tok)
                                row.key.token_times.append(now)
                            if finished:
                                done.append(row.key)
                if progress is not None:
                    progress(len(done), len(waiting))
                if not busy and pending:
                    time.sleep(max(0.0, pending[0].arrival - clock()))
        finally:
            for t in self._timers:
                t.cancel()
        return done

    def _timer(self, fault: Fault) -> threading.Timer:
        t = threading.Timer(fault.at_s, self.kill, (fault.replica,))
        t.daemon = True
        t.start()
        return t

    def _prefill(self, req: ServeRequest, clock, corrupt: set) -> tuple[RequestRecord, int, list]:
        """Prefill one request: its record (first token in), the first token, and its K/V per layer."""
        if req.name in self._armed:
            self._timers.append(self._timer(self._armed.pop(req.name)))
        strategy = "sender" if req.role == "sender" else self.strategy
        plan = "full_prefill" if req.role == "sender" else self.plan.name
        rec = RequestRecord(req.name, req.role, req.context, req.replica, strategy, strategy, plan, req.arrival,
                            prefill_start=clock(), n_prompt_tokens=len(req.prefix_ids) + len(req.suffix_ids))
        ctx = context_hash(req.prefix_ids)
        if req.role == "sender":
            first, layers = self._sender_prefill(req, rec, req.context in corrupt)
            self._readers[ctx] = self._readers.get(ctx, 0) + 1
        else:
            first, layers = self._receiver_prefill(req, rec)
            self._readers[ctx] = self._readers.get(ctx, 1) - 1
            if self._readers[ctx] <= 0:  # no receiver of this context is left: free its entries
                del self._readers[ctx]
                with self._lock:
                    self.store.drop_context(ctx)
        rec.token_times.append(clock())
        if first not in req.eos:
            rec.token_ids.append(first)
        return rec, first, layers
