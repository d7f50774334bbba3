"""Reference pipelined engine: cache store, paced link, receiver strategies and their scheduler.

DroidSpeak's receiver (paper §4.2) gets the sender's per-layer KV and the hidden state E at each
transition layer over a network, and its latency depends on *how* it loads them:

- ``send_all``    (a) load E and every layer's KV, then recompute;
- ``send_reused`` (b) load only the transition E and the reused layers' KV, then recompute;
- ``pipelined``   (c) E first; recompute the group while the reused KV streams; the final prompt
                      pass waits on each layer's arrival, and loading for the next request may
                      overlap this request's recompute;
- ``full_prefill`` and ``full_reuse`` as the two ends.

This module holds what every run needs: a store of per-layer entries keyed by (sender, context,
layer, kind) with checksums, a link that paces copies to a bandwidth, the scheduling rules of the
strategies, a unit-cost simulator of those rules (the paper's Fig. 13), and the real executor that
follows the same rules with a loader thread and per-layer arrival events. Every run records, per
request and per layer, when loads and computation started and ended and how long anything waited.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
import time
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple
from unittest import mock

import torch
from transformers import DynamicCache

from ds_study.caches import KINDS, CacheChecksumError, ContextCache, tensors_sha256
from ds_study.link import Link, primed_sha256, sleep_until
from ds_study.executor import (Plan, PlanError, check_supported, decode, greedy_after, groups_plan, layer_runs, lower_right_exact,
                               parse_plan, prepare_suffix, recompute_group, recompute_group_streaming, run_layer,
                               streams_e_rows)

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


class EngineError(ValueError):
    """A request the engine cannot run (unknown strategy, wrong model); raised before any work."""


class StoreMiss(KeyError):
    """No entry under this key."""


class TransferFailed(RuntimeError):
    """The sender died, the link broke or an item did not arrive in time: fall back to full prefill."""


class EntryRejected(RuntimeError):
    """An entry failed its checksum on arrival; the receiver recomputes what it would have given."""

    def __init__(self, item: "Item", reason: str):
        super().__init__(f"{item.name}: {reason}")
        self.item = item


# --------------------------------------------------------------------------------------------
# Store


def model_identity(model_id: dict | str) -> str:
    """``name@sha12`` from a pair identity (name, weights_sha256): different weights, different entries."""
    if isinstance(model_id, str):
        return model_id
    sha = model_id.get("weights_sha256") or ""
    name = model_id.get("name") or "model"
    return f"{name}@{sha[:12]}" if sha else name


def context_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()[:16]


def error_line(e: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (just the type when the message is empty), for failure reasons."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit]}" if text else type(e).__name__


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=-]", "_", s)


@dataclass(frozen=True)
class EntryKey:
    """One stored tensor. ``receiver`` set means a cross-model entry: the sender's tensor prepared for
    that receiver. Such entries live in their own (lossy) namespace: their key never equals the key
    of an exact, same-model lookup, so they can never be served as an exact hit."""

    owner: str  # identity of the model that computed the tensor
    context: str  # context_hash of the token ids
    layer: int
    kind: str  # "k" | "v" | "e"
    receiver: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"entry kind must be one of {KINDS}, got {self.kind!r}")
        if self.receiver is not None and self.receiver == self.owner:
            raise ValueError(f"a cross-model entry needs two different models, got {self.owner!r} twice")

    @property
    def namespace(self) -> str:
        return "exact" if self.receiver is None else "cross"

    def relpath(self) -> Path:
        ns = _safe(self.owner) if self.receiver is None else f"{_safe(self.owner)}--to--{_safe(self.receiver)}"
        return Path(self.namespace, ns, self.context, f"{self.layer:03d}.{self.kind}.safetensors")


def entry_key(sender: str, receiver: str, context: str, layer: int, kind: str) -> EntryKey:
    """The key a receiver looks up: exact when it reads its own cache, cross-model otherwise."""
    return EntryKey(sender, context, layer, kind, None if sender == receiver else receiver)


@dataclass
class Entry:
    tensor: torch.Tensor
    sha256: str


class KVStore:
    """Per-layer K, V and E entries in memory, optionally persisted one safetensors file per entry.

    Every entry carries the sha256 of its bytes, taken when it was put; ``get`` verifies it (a
    corrupt entry raises CacheChecksumError and is dropped from memory), so corruption is rejected
    rather than served. ``pin_memory`` keeps CPU entries in page-locked memory for async GPU copies.
    """

    def __init__(self, root: str | Path | None = None, pin_memory: bool = False):
        self.root = Path(root) if root is not None else None
        self.pin_memory = pin_memory
        self._mem: dict[EntryKey, Entry] = {}

    def put(self, key: EntryKey, tensor: torch.Tensor) -> str:
        t = tensor.detach().clone(memory_format=torch.contiguous_format)  # the store owns its bytes
        if self.pin_memory and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        sha = tensors_sha256({"t": t})
        self._mem[key] = Entry(t, sha)
        if self.root is not None:
            from safetensors.torch import save_file

            path = self.root / key.relpath()
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"t": t.cpu()}, str(path), metadata={"sha256": sha, "key": json.dumps(asdict(key))})
        return sha

    def _from_disk(self, key: EntryKey) -> Entry | None:
        if self.root is None or not (self.root / key.relpath()).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.root / key.relpath()), framework="pt") as f:
            meta, t = f.metadata() or {}, f.get_tensor("t")
        if "sha256" not in meta:
            raise CacheChecksumError(f"{self.root / key.relpath()}: no checksum in the entry")
        return Entry(t.pin_memory() if self.pin_memory else t, meta["sha256"])

    def get(self, key: EntryKey, verify: bool = True) -> torch.Tensor:
        entry = self._mem.get(key) or self._from_disk(key)
        if entry is None:
            raise StoreMiss(f"no {key.namespace} entry for {key}")
        if verify and tensors_sha256({"t": entry.tensor}) != entry.sha256:
            self._mem.pop(key, None)
            raise CacheChecksumError(f"entry {key} is corrupt (checksum mismatch); rejected")
        self._mem[key] = entry
        return entry.tensor

    def reread(self, key: EntryKey) -> bool:
        """Drop the in-memory copy of a persisted entry (found corrupt in flight), so the next use reads
        the file again. An entry held only in memory is kept: later requests reject it and repair,
        which beats failing them over to full prefill."""
        if self.root is None or not (self.root / key.relpath()).is_file():
            return False
        self._mem.pop(key, None)
        return True

    def checksum(self, key: EntryKey) -> str:
        entry = self._mem.get(key) or self._from_disk(key)
        if entry is None:
            raise StoreMiss(f"no {key.namespace} entry for {key}")
        return entry.sha256

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._mem or (self.root is not None and (self.root / key.relpath()).is_file())

    def nbytes(self, key: EntryKey) -> int:
        t = self.get(key, verify=False)
        return t.numel() * t.element_size()

    def lookup_exact(self, model: str, context: str, layer: int, kind: str) -> torch.Tensor:
        """A model's own cached tensor; never answered from a cross-model entry."""
        return self.get(EntryKey(model, context, layer, kind))

    def lookup_cross(self, sender: str, receiver: str, context: str, layer: int, kind: str) -> torch.Tensor:
        return self.get(EntryKey(sender, context, layer, kind, receiver))

    def put_cache(self, cache: ContextCache, owner: str, receiver: str | None = None,
                  layers: list[int] | None = None, kinds: tuple[str, ...] = KINDS) -> list[EntryKey]:
        """Store a captured context layer by layer (exact namespace, or cross-model for ``receiver``)."""
        ctx = context_hash(cache.token_ids)
        keys = []
        for i in layers if layers is not None else range(cache.n_layers):
            for kind in kinds:
                if kind == "e" and cache.embeds is None:
                    continue
                key = EntryKey(owner, ctx, i, kind, receiver)
                self.put(key, cache.tensor(kind, i))
                keys.append(key)
        return keys


# --------------------------------------------------------------------------------------------
# Checksums on the wire


def entry_hasher(t: torch.Tensor):
    """A sha256 primed like ``tensors_sha256({"t": t})``: feed it t's bytes in order to get the same digest."""
    return primed_sha256(str(t.dtype), tuple(t.shape))


# --------------------------------------------------------------------------------------------
# Strategies: what is sent, in which order, and what waits on what


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


# --------------------------------------------------------------------------------------------
# Timeline records


@dataclass
class Span:
    """One interval of one request: a load on the link, or a layer's computation, or a wait."""

    request: str
    op: str  # "load" | "recompute" | "final" | "wait" | "fallback"
    start: float  # seconds (or units) since the run started
    end: float
    layer: int | None = None
    kind: str | None = None  # loads: "e" | "kv"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class RequestResult:
    request: str
    strategy: str
    plan: str
    arrival: float
    ttft: float
    token_ids: list[int] = field(default_factory=list)
    bytes_loaded: int = 0
    fallback: str | None = None  # "full_prefill" when the transfer failed
    reason: str | None = None
    repaired_plan: str | None = None  # the plan actually run after rejected entries
    rejected: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    first_logits: torch.Tensor | None = None
    loader: str = ""  # what moved the items: "process" (link worker), "thread", or "" (none / given)

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("spans", "first_logits")}
        out["spans"] = [s.to_json() for s in self.spans]
        return out


# --------------------------------------------------------------------------------------------
# Unit-cost simulator of the scheduling rules (paper Fig. 13)


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


# --------------------------------------------------------------------------------------------
# Real execution: arrivals, the waiting cache, per-layer clocks


class Arrivals:
    """What has reached the receiver for one request: per-item tensors and arrival events.

    A loader (a thread reading the store over a Link, the link worker process, or a
    torch.distributed receiver) calls ``deliver``/``reject``/``fail``; the compute side calls
    ``wait``, which blocks until the item is there, raising TransferFailed on failure or timeout and
    EntryRejected on a checksum mismatch. On CUDA a delivery may carry an event that the consuming
    stream waits on. Every wait blocks in ``_block``: here on a condition a loader thread notifies;
    ``process_loader.WorkerArrivals`` instead reads the worker's reports there.
    """

    def __init__(self, items: list[Item], t0: float):
        self.items = list(items)
        self.t0 = t0
        self._events = {it: threading.Event() for it in self.items}
        self.tensors: dict[Item, tuple] = {}
        self.cuda_events: dict[Item, object] = {}
        self.rejected: dict[Item, str] = {}
        self.failure: str | None = None
        self.spans: list[Span] = []
        self.bytes = 0
        self.cancelled = threading.Event()  # set by the receiver when it stops consuming
        self.prefilled = threading.Event()  # set when the request's first token is out...
        self.prefilled_at = 0.0  # ...at this perf_counter time
        self._partial: dict[Item, torch.Tensor] = {}  # destination being filled (host loaders only)
        self._progress: dict[Item, int] = {}  # bytes of it copied so far
        self._began: dict[Item, float] = {}  # when its copy began
        self._cond = threading.Condition()  # re-entrant: a _block may deliver to this very object

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def begin(self, item: Item, tensor: torch.Tensor, at: float | None = None) -> None:
        """The loader starts filling ``tensor`` (an item's only tensor) front to back, on the wire from
        perf_counter time ``at`` (default now): see ``wait_rows``."""
        with self._cond:
            self._partial[item], self._progress[item] = tensor, 0
            self._began[item] = time.perf_counter() if at is None else at

    def advance(self, item: Item, nbytes: int) -> None:
        with self._cond:
            self._progress[item] += nbytes
            self._cond.notify_all()

    def _block(self, left: float) -> None:
        """Wait (holding ``_cond``) at most ``left`` seconds for something to change."""
        self._cond.wait(left)

    def settle(self) -> None:
        """Take in whatever the loader has already reported, without waiting (before reading totals)."""

    def _wait_for(self, ready: Callable[[], object], timeout_s: float, what: str):
        """``ready()``'s first true value, blocking in between; TransferFailed once ``timeout_s`` is over."""
        deadline = time.perf_counter() + timeout_s
        with self._cond:
            while not (got := ready()):
                left = deadline - time.perf_counter()
                if left <= 0:
                    raise TransferFailed(f"timed out after {timeout_s:g} s waiting for {what}")
                self._block(left)
            return got

    def wait_rows(self, item: Item, rows: int, timeout_s: float, soon_s: float = 0.0) -> tuple[torch.Tensor, int] | None:
        """(tensor, rows in place) once at least ``rows`` token rows of the item's (1, T, H) tensor
        have arrived (the rest may still be arriving), or None once the whole item was delivered,
        rejected or failed (then use ``wait``). Also None if, at the rate it has been arriving, the
        rest is due within ``soon_s``: then one step over the whole item beats several partial ones.
        The bytes are not checksum-verified yet: the consumer must ``wait`` for the item before
        trusting what it computed from them."""
        def ready():  # True: wait for the whole item instead; (tensor, rows): go on with these rows
            if self._events[item].is_set():
                return True
            if item in self._partial:
                t, done = self._partial[item], self._progress[item]
                if soon_s and done:
                    rate = done / max(1e-9, time.perf_counter() - self._began[item])
                    if (t.numel() * t.element_size() - done) / rate < soon_s:
                        return True
                have = done // (t.numel() // t.shape[-2] * t.element_size())
                if rows <= have < t.shape[-2]:  # all rows in: wait for the item itself (its checksum)
                    return t, have
            return None

        got = self._wait_for(ready, timeout_s, item.name)
        return None if got is True else got

    def _set(self, item: Item) -> None:
        with self._cond:
            self._events[item].set()
            self._cond.notify_all()

    def deliver(self, item: Item, tensors: tuple, start: float, end: float, cuda_event=None, request: str = "") -> None:
        self.tensors[item] = tensors
        if cuda_event is not None:
            self.cuda_events[item] = cuda_event
        self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        self.spans.append(Span(request, "load", start, end, item.layer, item.kind))
        self._set(item)

    def reject(self, item: Item, reason: str, nbytes: int = 0) -> None:
        """``nbytes``: what crossed the link before the entry was found corrupt (counted in ``bytes``)."""
        self.rejected[item] = reason
        self.bytes += nbytes
        self._set(item)

    def fail(self, reason: str) -> None:
        self.failure = reason
        for it in self._events:
            self._set(it)

    def wait(self, item: Item, timeout_s: float) -> tuple:
        if item not in self._events:
            raise TransferFailed(f"{item.name} was never scheduled for this request")
        self._wait_for(self._events[item].is_set, timeout_s, item.name)
        if item in self.rejected:
            raise EntryRejected(item, self.rejected[item])
        if item not in self.tensors:
            raise TransferFailed(self.failure or f"{item.name} did not arrive")
        if item in self.cuda_events:
            torch.cuda.current_stream().wait_event(self.cuda_events[item])
        return self.tensors[item]

    def wait_all(self, timeout_s: float) -> None:
        """Block until every item is delivered, rejected or failed (each wait bounded by the timeout)."""
        for it in self.items:
            self._wait_for(self._events[it].is_set, timeout_s, it.name)
        if self.failure is not None and len(self.tensors) + len(self.rejected) < len(self.items):
            raise TransferFailed(self.failure)


class ArrivalCache(DynamicCache):
    """The cache of the final prompt pass: before layer i attends, its context K/V must be there.

    Starts with zero-copy placeholders of the context's length (so positions and masks are right
    before anything arrived); on a layer's first ``update`` it calls ``fetch(i)`` -- which may
    block on that layer's arrival -- swaps the arrived K/V in, then appends the suffix K/V.
    A sliding-window layer holds what transformers' own layer would after the context: its last
    ``window - 1`` tokens, with the context's full length as the position count.
    """

    def __init__(self, config, n_tokens: int, fetch: Callable[[int], tuple], dtype, device):
        from ds_study.pair import shape_of

        super().__init__(config=config)
        shape = shape_of(config)
        self._keep: dict[int, int] = {}  # sliding layer -> how many trailing context tokens it holds
        for i, layer in enumerate(self.layers):
            n = n_tokens
            if getattr(layer, "is_sliding", False):
                n = self._keep[i] = min(n_tokens, layer.sliding_window - 1)
                layer.cumulative_length = n_tokens
            ph = torch.zeros((), dtype=dtype, device=device).expand(1, shape["num_key_value_heads"], n,
                                                                     shape["head_dim"])
            layer.device, layer.keys, layer.values, layer.is_initialized = device, ph, ph, True
        self._fetch = fetch
        self._ready: set[int] = set()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self._ready:
            k, v = self._fetch(layer_idx)
            if layer_idx in self._keep:
                k, v = k[..., k.shape[-2] - self._keep[layer_idx]:, :], v[..., v.shape[-2] - self._keep[layer_idx]:, :]
            layer = self.layers[layer_idx]
            layer.keys, layer.values = k.to(key_states.dtype), v.to(value_states.dtype)
            self._ready.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class LayerClock:
    """Forward hooks that time every decoder layer of the current phase, and the first lm_head call
    (the first token's logits: the end of TTFT). Host clock; on CUDA it measures launch order."""

    def __init__(self, model, request: str, t0: float, spans: list[Span]):
        self.model, self.request, self.t0, self.spans = model, request, t0, spans
        self.phase: str | None = None
        self.first_token_at: float | None = None
        self._start = 0.0
        self._handles = []

    def __enter__(self):
        for i, layer in enumerate(self.model.model.layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post(i)))
        self._handles.append(self.model.lm_head.register_forward_hook(self._head))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        return False

    def _pre(self, module, args):
        self._start = time.perf_counter() - self.t0

    def _post(self, i):
        def hook(module, args, out):
            if self.phase:
                self.spans.append(Span(self.request, self.phase, self._start, time.perf_counter() - self.t0, i))
        return hook

    def _head(self, module, args, out):
        if self.phase == "final" and self.first_token_at is None:
            if out.is_cuda:  # the logits must exist, not just be queued; decoding syncs right after anyway
                torch.cuda.synchronize(out.device)
            self.first_token_at = time.perf_counter() - self.t0
            self.phase = None  # decoding steps after the first token are not part of the prefill


@dataclass
class Request:
    """One receiver request: reuse ``sender``'s cached context under ``plan``."""

    name: str
    model: torch.nn.Module  # the receiver
    receiver: str  # receiver identity (model_identity)
    sender: str  # identity of the model whose cached context is reused
    plan: object  # anything parse_plan accepts; ignored by full_prefill / full_reuse
    prefix_ids: list[int]
    suffix_ids: list[int]
    max_new_tokens: int = 1
    eos_token_id: int | list | None = None
    arrival: float = 0.0  # seconds after the run starts


class SuffixGraphs:
    """The final prompt pass as one CUDA graph per step (embedding, each decoder layer, norm + head),
    for one model, context length and suffix length.

    Eager transformers layers are host-bound for a short suffix: on an H200 host a 32-token pass
    over 32 Llama-3-8B layers took as long to launch as to run, about 1.5 ms per layer
    (``scripts/bench_gpu_pipeline.py --breakdown``), while the GPU needs a fraction of that. A graph
    replays a layer's kernels with one launch. One graph per layer rather than one for the pass keeps
    the pipelining: between two replays the compute stream waits on that layer's arrival event,
    which a graph cannot contain. Static buffers: the suffix ids, every layer's context K/V (an
    arrival is copied in on the device), the hidden-state chain and the outputs. ``capture=False``
    runs the same steps eagerly on the same buffers (CPU; tests compare it with ``decode``).
    Graphs are captured on the first request of a shape (``capture_s``); ``graphs_for`` keeps a few
    shapes per model. A server would pad context lengths to a few buckets; this engine does not.
    """

    def __init__(self, model, n_ctx: int, n_new: int, capture: bool):
        from torch.nn.attention.bias import causal_lower_right

        from ds_study.pair import shape_of

        p, cfg, shape = next(model.parameters()), model.config, shape_of(model.config)
        if not lower_right_exact(model, n_ctx, n_new):
            raise EngineError("a graphed final pass needs SDPA, full-attention layers, a context and >1 suffix token")
        self.model, self.n = model, cfg.num_hidden_layers
        kv_shape = (1, shape["num_key_value_heads"], n_ctx, shape["head_dim"])
        self.ids = torch.zeros((1, n_new), dtype=torch.long, device=p.device)
        self.k = [torch.zeros(kv_shape, dtype=p.dtype, device=p.device) for _ in range(self.n)]
        self.v = [torch.zeros(kv_shape, dtype=p.dtype, device=p.device) for _ in range(self.n)]
        self.positions = torch.arange(n_ctx, n_ctx + n_new, device=p.device).unsqueeze(0)
        self.mask = causal_lower_right(n_new, n_ctx + n_new)
        self.cache = DynamicCache(ddp_cache_data=list(zip(self.k, self.v)), config=cfg)
        self.graphs: list | None = None
        self.capture_s = 0.0
        self._keep: list = []  # every step's outputs stay allocated: the next graph reads them
        if capture:
            self._capture()

    def _reset(self) -> None:
        for i, layer in enumerate(self.cache.layers):
            layer.keys, layer.values = self.k[i], self.v[i]

    def _step(self, i: int) -> None:
        """Step -1: embedding and rotary tables; 0..n-1: decoder layer i; n: final norm and the head.

        Attention reads the context K/V once per KV head: transformers repeats K/V to every query
        head whenever a mask is given (4x the bytes of a Llama-3 layer's context), unless told to
        pass grouped heads to SDPA, which the lower-right causal bias supports (same values; on CPU
        bitwise, tested)."""
        inner = self.model.model
        if 0 <= i < self.n:
            with mock.patch.dict(os.environ, {FORCE_GQA: "1"}):  # restored afterwards, whatever it was
                self.hidden = run_layer(self.model, i, self.hidden, self.mask, self.pos_emb, self.positions, self.cache)
        elif i < 0:
            self.hidden = inner.embed_tokens(self.ids)
            self.pos_emb = inner.rotary_emb(self.hidden, position_ids=self.positions)
        else:
            self.normed = inner.norm(self.hidden)
            self.logits = self.model.lm_head(self.normed[:, -1:])
        self._keep.append(self.hidden)

    def _capture(self) -> None:
        t = time.perf_counter()
        side = torch.cuda.Stream(self.ids.device)
        side.wait_stream(torch.cuda.current_stream(self.ids.device))
        with torch.cuda.stream(side):  # warm-up outside capture: lazy library init, workspaces
            for _ in range(2):
                self._reset()
                for i in range(-1, self.n + 1):
                    self._step(i)
        torch.cuda.current_stream(self.ids.device).wait_stream(side)
        self._reset()
        self._keep.clear()
        pool, self.graphs = torch.cuda.graph_pool_handle(), []
        # one pool: replayed in capture order, so later steps may reuse earlier steps' temporaries
        for i in range(-1, self.n + 1):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):  # the loader thread may be copying
                self._step(i)
            self.graphs.append(g)
        torch.cuda.synchronize(self.ids.device)
        self.capture_s = time.perf_counter() - t

    def run(self, ids: torch.Tensor, fetch: Callable[[int], tuple]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The pass for suffix ``ids`` (1, n_new); ``fetch(i)`` gives layer i's context K/V (it may block
        and make the compute stream wait for the arrival). Returns the suffix's final-norm hidden
        states [n_new, hidden], the first token's logits [vocab], and per step (host launch start,
        end) times; the K/V of context plus suffix stay in ``self.cache`` until the next run."""
        times = []
        if self.graphs is None:
            self._reset()
            self._keep.clear()
        self.ids.copy_(ids, non_blocking=True)
        for i in range(-1, self.n + 1):
            start = time.perf_counter()
            if 0 <= i < self.n:
                k, v = fetch(i)
                self.k[i].copy_(k, non_blocking=True)
                self.v[i].copy_(v, non_blocking=True)
            if self.graphs is None:
                self._step(i)
            else:
                self.graphs[i + 1].replay()
            times.append((start, time.perf_counter()))
        return self.normed[0], self.logits[0, -1], times


FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers' SDPA integration on every call
_GRAPHS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
GRAPH_SHAPES_PER_MODEL = 4  # each holds a context's K/V twice (static copy + the pass's own)


def graphs_for(model, n_ctx: int, n_new: int) -> SuffixGraphs:
    """The model's graphed final pass for this shape, captured on first use (eager steps off CUDA)."""
    shapes = _GRAPHS.setdefault(model, OrderedDict())
    key = (n_ctx, n_new)
    if key not in shapes:
        while len(shapes) >= GRAPH_SHAPES_PER_MODEL:
            shapes.popitem(last=False)
        shapes[key] = SuffixGraphs(model, n_ctx, n_new, capture=next(model.parameters()).is_cuda)
    shapes.move_to_end(key)
    return shapes[key]


@torch.no_grad()
def _prefill_and_decode(req: Request, plan: Plan, fetch_e, fetch_kv, clock: LayerClock, recomputed: dict,
                        fetch_e_rows=None, chunk: int = 0, graphs: bool = False, overlap: bool = True):
    """Recompute the plan's groups (E from ``fetch_e``), then the final pass over all layers, taking
    reused layers' K/V from ``fetch_kv`` as they arrive, then greedy decoding.

    With ``graphs`` the final pass runs as ``SuffixGraphs``. On CUDA, with ``overlap``, the groups recompute on a
    side stream while the final pass runs on a high-priority one: the suffix's way through the
    layers before a group does not depend on that group, so it overlaps the recomputation instead
    of queueing behind it; the pass waits on a group's event only when it reaches that group.
    """
    model = req.model
    p = next(model.parameters())
    suffix = torch.tensor([req.suffix_ids], device=p.device)  # staged before any GPU work is queued (see decode)
    n_ctx, n_new = len(req.prefix_ids), len(req.suffix_ids)
    g = graphs_for(model, n_ctx, n_new) if graphs and lower_right_exact(model, n_ctx, n_new) else None
    streams = _overlap_streams(p.device) if g is not None and p.is_cuda and overlap else None
    own: dict[int, tuple] = {}
    ready: dict[int, object] = {}  # layer -> CUDA event: its group's recomputation is done

    def fetch(i: int) -> tuple:
        if i not in own:
            return fetch_kv(i)
        if i in ready:  # made on the recompute stream, read on this one
            torch.cuda.current_stream(p.device).wait_event(ready[i])
            for t in own[i]:
                t.record_stream(torch.cuda.current_stream(p.device))
        return own[i]

    if g is None:  # the eager final pass: what needs no arrival is made first, while E may still be on its way
        cache = ArrivalCache(model.config, n_ctx, fetch, p.dtype, p.device)
        prepared = prepare_suffix(model, suffix, n_ctx)
    for a, b in plan.groups:
        if (a, b) not in recomputed:
            clock.phase = "recompute"
            if streams:
                streams[0].wait_stream(torch.cuda.current_stream(p.device))
            with torch.cuda.stream(streams[0] if streams else None):  # None: the current stream
                if a > 0 and fetch_e_rows is not None and chunk:
                    # E streams in: recompute token chunks as their E rows land, then check the whole E
                    kv = recompute_group_streaming(model, a, b, n_ctx, lambda t, a=a: fetch_e_rows(a, t), chunk)
                    fetch_e(a)  # raises if E was rejected (checksum) or failed: nothing computed is kept
                    recomputed[(a, b)] = kv
                else:
                    sender = None if a == 0 else SimpleNamespace(embeds={a: fetch_e(a)})
                    recomputed[(a, b)] = recompute_group(model, a, b, req.prefix_ids, sender)
            clock.phase = None
        if streams:  # also for a group recomputed by an earlier attempt (repair): it ran on the same stream
            ev = torch.cuda.Event()
            ev.record(streams[0])
            ready.update({i: ev for i in range(a, b + 1)})
        kv = recomputed[(a, b)]
        own.update({i: (kv.k[i], kv.v[i]) for i in range(a, b + 1)})

    if g is not None:
        clock.phase = "final"
        if streams:
            streams[1].wait_stream(torch.cuda.current_stream(p.device))  # the staged suffix ids
        with torch.cuda.stream(streams[1] if streams else None):
            hidden, logits, times = g.run(suffix, fetch)
        if streams:
            torch.cuda.current_stream(p.device).wait_stream(streams[1])
        if g.graphs is not None:  # replays fire no module hooks: the first token's time and the layer spans
            if p.is_cuda:
                torch.cuda.synchronize(p.device)
            clock.first_token_at = time.perf_counter() - clock.t0
            clock.spans.extend(Span(req.name, "final", s - clock.t0, e - clock.t0, i)
                               for i, (s, e) in enumerate(times[1:-1]))
        clock.phase = None
        cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in g.cache.layers],
                             config=model.config)
        return greedy_after(model, cache, hidden, req.max_new_tokens, req.eos_token_id, logits=logits)
    clock.phase = "final"
    out = decode(model, [], suffix, req.max_new_tokens, req.eos_token_id, cache=cache, prepared=prepared)
    clock.phase = None
    return out


_STREAMS: dict = {}


def _overlap_streams(device) -> tuple:
    """(recompute stream, high-priority final-pass stream) of a CUDA device, made once."""
    device = torch.device(device)
    if device not in _STREAMS:
        _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device, priority=-1))
    return _STREAMS[device]


@torch.no_grad()
def execute(req: Request, strategy: str, plan: Plan, arrivals: Arrivals, timeout_s: float,
            e_chunk_tokens: int = 0, graphs: bool = False, overlap: bool = True) -> RequestResult:
    """Serve one request on the calling thread while a loader fills ``arrivals``.

    Non-streaming strategies wait for every item first; streaming ones wait for each E just before
    its group (with ``e_chunk_tokens``, only for the E rows of the next token chunk, where the
    loader reports partial progress) and for each layer's KV just before the final pass reaches it. A failed or timed-out
    transfer falls back to the receiver's own full prefill; rejected entries are recomputed under
    ``repair_plan``. Either is recorded in the result.
    """
    t0, n = arrivals.t0, req.model.config.num_hidden_layers
    spans: list[Span] = []
    result = RequestResult(req.name, strategy, plan.name, req.arrival, 0.0, spans=spans)
    recomputed: dict = {}

    @contextmanager
    def waiting(item: Item):
        """One "wait" span per blocking wait, however it ends (arrival, failure, timeout)."""
        start = arrivals.now()
        try:
            yield
        finally:
            if arrivals.now() - start > 1e-4:
                spans.append(Span(req.name, "wait", start, arrivals.now(), item.layer, item.kind))

    def timed_wait(item: Item):
        with waiting(item):
            return arrivals.wait(item, timeout_s)

    fetch_e = lambda a: timed_wait(Item(a, "e"))[0]  # noqa: E731
    fetch_kv = lambda i: timed_wait(Item(i, "kv"))  # noqa: E731

    def fetch_e_rows(a: int, rows: int) -> tuple[torch.Tensor, int]:
        with waiting(Item(a, "e")):
            got = arrivals.wait_rows(Item(a, "e"), rows, timeout_s, soon_s=E_SOON_S)
            if got is None:  # all of E is in, or due soon (or it failed: wait raises)
                e = arrivals.wait(Item(a, "e"), timeout_s)[0]
                return e, e.shape[-2]
            return got

    streamable = strategy in STREAMING and e_chunk_tokens and streams_e_rows(req.model)  # else: whole E first
    stream = (fetch_e_rows, e_chunk_tokens) if streamable else (None, 0)
    fast = {"graphs": graphs, "overlap": overlap}
    with LayerClock(req.model, req.name, t0, spans) as clock:
        try:
            try:
                if strategy not in STREAMING:
                    start = arrivals.now()
                    arrivals.wait_all(timeout_s)
                    if arrivals.items:
                        spans.append(Span(req.name, "wait", start, arrivals.now()))
                    if arrivals.rejected:
                        raise EntryRejected(next(iter(arrivals.rejected)), "checksum mismatch")
                out = _prefill_and_decode(req, plan, fetch_e, fetch_kv, clock, recomputed, *stream, **fast)
            except EntryRejected:
                arrivals.wait_all(timeout_s)  # know every rejected entry before replanning
                bad_kv = [it.layer for it in arrivals.rejected if it.kind == "kv"]
                bad_e = [it.layer for it in arrivals.rejected if it.kind == "e"]
                fixed = repair_plan(plan, n, bad_kv, bad_e)
                result.rejected = sorted(it.name for it in arrivals.rejected)
                result.repaired_plan = fixed.name
                clock.phase, clock.first_token_at = None, None
                out = _prefill_and_decode(req, fixed, fetch_e, fetch_kv, clock, recomputed, **fast)
        except TransferFailed as e:
            arrivals.cancelled.set()
            result.fallback, result.reason = "full_prefill", str(e)
            spans.append(Span(req.name, "fallback", arrivals.now(), arrivals.now()))
            clock.phase, clock.first_token_at = None, None
            out = _prefill_and_decode(req, parse_plan("full_prefill", n), None, None, clock, {}, **fast)
    arrivals.prefilled_at = t0 + (clock.first_token_at if clock.first_token_at is not None else arrivals.now())
    arrivals.prefilled.set()
    result.ttft = (clock.first_token_at if clock.first_token_at is not None else arrivals.now()) - req.arrival
    result.token_ids, result.first_logits = out.token_ids, out.first_logits
    arrivals.settle()  # what a worker process reported while nobody waited
    result.bytes_loaded = arrivals.bytes
    result.spans = sorted(arrivals.spans + spans, key=lambda s: (s.start, s.end))
    return result


def item_sources(store: KVStore, req: Request, item: Item, ctx: str) -> tuple[list, list, list]:
    """An item's store keys, its tensors as stored (unverified: the loader checksums them on the
    link) and the checksums they must match."""
    keys = [entry_key(req.sender, req.receiver, ctx, item.layer, k) for k in item.entry_kinds()]
    return keys, [store.get(k, verify=False) for k in keys], [store.checksum(k) for k in keys]


def reject_corrupt(store: KVStore, arr: Arrivals, item: Item, bad: list[EntryKey], nbytes: int) -> None:
    """Entries whose bytes failed their checksum on the link: reread them for later requests, reject the item."""
    for k in bad:
        store.reread(k)
    arr.reject(item, f"entry {item.name} is corrupt (checksum mismatch); rejected", nbytes)


class StoreLoader(threading.Thread):
    """The link side of the engine: moves each request's items from the store, FIFO over one Link.

    A streaming request's items start as soon as the link is free (and the request has arrived);
    a non-streaming request waits until the previous request's prefill is over (Fig. 13 a, b).
    """

    def __init__(self, store: KVStore, link: Link, jobs: list[tuple[Request, str, Arrivals]], device=None,
                 stream=None, verify: bool = True):
        super().__init__(daemon=True, name="ds-store-loader")
        self.store, self.link, self.jobs, self.device, self.stream = store, link, jobs, device, stream
        self.verify = verify
        self.go = threading.Event()  # started ahead, released at t0, so thread start-up is not timed

    def run(self):
        self.go.wait()
        if self.stream is not None:  # copies must not overtake work queued before the run
            self.stream.wait_stream(torch.cuda.default_stream(self.stream.device))
        prev: Arrivals | None = None
        for req, strategy, arr in self.jobs:
            released = arr.t0 + req.arrival  # the request exists from here on; its items are in the store
            sleep_until(released)
            if strategy not in STREAMING and prev is not None:
                prev.prefilled.wait()
                released = max(released, prev.prefilled_at)
            ctx = context_hash(req.prefix_ids)
            for item in arr.items:
                if arr.cancelled.is_set():
                    break
                try:
                    if not self._send(req, arr, item, ctx, released):
                        break
                except Exception as e:  # noqa: BLE001 - whatever breaks fails this request now, never hangs it
                    arr.fail(f"loading {item.name} failed: {error_line(e)}")
                    break
            prev = arr

    def _send(self, req: Request, arr: Arrivals, item: Item, ctx: str, released: float) -> bool:
        """Move one item over the link into ``arr``; False when the request stops (failed or cancelled)."""
        keys, srcs, want = item_sources(self.store, req, item, ctx)
        # Checksums are taken on the bytes as they go over the link (host memory); other
        # sources are verified before sending.
        on_host = all(s.device.type == "cpu" for s in srcs)
        hashers = [entry_hasher(s) for s in srcs] if self.verify and on_host else None
        if self.verify and not on_host:
            try:
                srcs = [self.store.get(k) for k in keys]
            except CacheChecksumError as e:
                arr.reject(item, str(e))
                return True
        feed = None if hashers is None else (lambda j, seg, hs=hashers: hs[j].update(seg.numpy()))
        dev = self.device or srcs[0].device
        if self.stream is None:
            dsts = [torch.empty(s.shape, dtype=s.dtype, device=dev) for s in srcs]
            if item.kind == "e" and len(dsts) == 1:  # E streams: its first rows are usable early
                arr.begin(item, dsts[0])
                feed = _and_advance(feed, arr, item)
        else:  # written on the side stream, read on the compute stream: tell the allocator both
            with torch.cuda.stream(self.stream):
                dsts = [torch.empty(s.shape, dtype=s.dtype, device=dev) for s in srcs]
            for d in dsts:
                d.record_stream(torch.cuda.default_stream(dev))
        start = self.link.copy(srcs, dsts, self.stream, cancelled=arr.cancelled.is_set, on_segment=feed,
                               ready=released)
        if start is None:
            return False
        nbytes = sum(d.numel() * d.element_size() for d in dsts)
        if hashers is not None:
            bad = [k for k, h, w in zip(keys, hashers, want) if h.hexdigest() != w]
            if bad:
                reject_corrupt(self.store, arr, item, bad, nbytes)
                return True
        ev = None
        if self.stream is not None:
            ev = torch.cuda.Event()
            ev.record(self.stream)
        arr.deliver(item, tuple(dsts), start - arr.t0, arr.now(), ev, req.name)  # wire start, arrival
        return True


E_SOON_S = 5e-3  # streaming E: if the rest of E is due within this, recompute once over all of it
# (each extra streamed step cost about 5 ms on the CPU benchmark at 20 Gbit/s; see docs/engine.md)


def _and_advance(feed, arr: Arrivals, item: Item):
    """An on_segment callback that also reports the copied bytes of ``item`` to ``arr``."""
    def on_segment(j, seg):
        if feed is not None:
            feed(j, seg)
        arr.advance(item, seg.numel() * seg.element_size())
    return on_segment


LOADERS = ("auto", "process", "thread")


class Engine:
    """Serve requests in arrival order with one compute unit (this thread) and one link (a loader).

    On CUDA (``device="cuda"``) the loader issues its copies on a side stream from the store's
    (pinned) host memory and each arrival carries a CUDA event the compute stream waits on.
    ``verify=False`` skips the in-flight checksum, which on a GPU link would run at hashing speed
    rather than copy speed. ``gil_switch_s``: Python's thread switch interval during a run. The
    compute thread holds the GIL while it issues kernels, so with the default 5 ms a loader thread
    whose chunk is due waits up to 5 ms to issue it; a short interval keeps the link on schedule (it
    matters only to the loader thread: the link worker process has an interpreter of its own).
    ``suffix_graphs``: run the final prompt pass as per-layer CUDA graphs (``SuffixGraphs``; default:
    on CUDA); with them on CUDA, ``overlap_recompute`` recomputes groups on a side stream while the
    final pass runs the layers before them. ``e_chunk_tokens``: streaming strategies start a recompute
    group once the first this-many token rows of its E have arrived, and go on chunk by chunk as E
    streams in (host-memory loaders report progress per link chunk; 0: wait for the whole E, as the
    paper's schedule).

    ``loader``: what moves the items. ``"process"``: the link worker process
    (``ds_study.serving.loaders.process``), which never takes this process's interpreter lock from the compute
    thread; ``"thread"``: a loader thread of this process (``StoreLoader``; needed for CUDA copies and
    for stores with entries on a GPU); ``"auto"`` (default): the worker for host-memory stores on
    CPU, the thread otherwise.
    """

    def __init__(self, store: KVStore, link: Link, timeout_s: float = 30.0, device=None, verify: bool = True,
                 gil_switch_s: float | None = 2e-4, e_chunk_tokens: int = 64, suffix_graphs: bool | None = None,
                 overlap_recompute: bool = True, loader: str = "auto"):
        if loader not in LOADERS:
            raise EngineError(f"unknown loader {loader!r}; use one of {', '.join(LOADERS)}")
        self.store, self.link, self.timeout_s, self.verify = store, link, timeout_s, verify
        self.loader = loader
        self.device = torch.device(device) if device is not None else None
        self.gil_switch_s, self.e_chunk_tokens = gil_switch_s, e_chunk_tokens
        # None: on CUDA only (where it pays); True on CPU runs the same static-buffer steps eagerly
        self.suffix_graphs = (self.device is not None and self.device.type == "cuda") if suffix_graphs is None \
            else suffix_graphs
        self.overlap_recompute = overlap_recompute

    def run(self, requests: list[Request], strategy: str) -> list[RequestResult]:
        previous = sys.getswitchinterval()
        if self.gil_switch_s:
            sys.setswitchinterval(self.gil_switch_s)
        try:
            return self._run(requests, strategy)
        finally:
            sys.setswitchinterval(previous)

    def _run(self, requests: list[Request], strategy: str) -> list[RequestResult]:
        checked = []
        for req in requests:  # every request is validated before anything moves
            check_supported(req.model)
            n = req.model.config.num_hidden_layers
            strat, plan = check_request(strategy, req.plan, n)
            checked.append((req, strat, plan, transfer_items(strat, plan, n)))
        checked.sort(key=lambda c: c[0].arrival)
        on_cuda = self.device is not None and self.device.type == "cuda"
        run = self._worker_run(checked, on_cuda)
        if run is not None:
            return self._serve(checked, run.arrivals, run.start, run.finish, "process")
        jobs = [(req, strat, Arrivals(items, 0.0)) for req, strat, _, items in checked]
        stream = torch.cuda.Stream(self.device) if on_cuda else None
        loader = StoreLoader(self.store, self.link, jobs, self.device, stream, self.verify)
        loader.start()

        def start(t0: float) -> None:
            for _, _, arr in jobs:
                arr.t0 = t0
            loader.go.set()

        return self._serve(checked, [arr for _, _, arr in jobs], start, lambda: loader.join(timeout=self.timeout_s),
                           "thread")

    def _worker_run(self, checked, on_cuda: bool):
        """The run staged for a link worker process, or None where the loader thread moves the items."""
        if self.loader == "thread" or (self.loader == "auto" and on_cuda):
            return None
        from ds_study.serving.loaders import process as process_loader

        if self.loader == "process" and (on_cuda or not process_loader.available()):
            raise EngineError("loader='process' moves host memory on a POSIX system; use loader='thread'")
        if not process_loader.available():
            return None
        try:
            return process_loader.WorkerRun(self.store, self.link, [(r, s, i) for r, s, _, i in checked],
                                            self.verify, self.timeout_s)
        except process_loader.NeedsThreadLoader as e:
            if self.loader == "process":
                raise EngineError(f"loader='process' cannot serve this run: {e}") from None
            if isinstance(e, process_loader.WorkerUnavailable):
                warnings.warn(f"{e}; moving items with a loader thread instead", RuntimeWarning, stacklevel=4)
            return None

    def _serve(self, checked, arrivals: list[Arrivals], start, finish, loader: str) -> list[RequestResult]:
        """Start the loader's clock, serve every request in arrival order on this thread, then stop it."""
        t0 = time.perf_counter()
        start(t0)
        results = []
        try:
            for (req, strat, plan, _), arr in zip(checked, arrivals):
                sleep_until(t0 + req.arrival)
                res = execute(req, strat, plan, arr, self.timeout_s, self.e_chunk_tokens, self.suffix_graphs,
                              self.overlap_recompute)
                res.loader = loader if arr.items else ""
                results.append(res)
        finally:  # also when a request raised: release a loader waiting for a prefill that will not come
            for arr in arrivals:
                arr.cancelled.set()
                arr.prefilled.set()
            finish()
        return results


def publish(store: KVStore, cache: ContextCache, sender: str, receiver: str) -> list[EntryKey]:
    """Put a sender's captured context where ``receiver`` looks it up (cross-model unless the same model)."""
    return store.put_cache(cache, sender, None if sender == receiver else receiver)


def sum_ttft(results: list[RequestResult]) -> float:
    return sum(r.ttft for r in results)
