"""Serving one request on the compute thread while a loader fills its ``Arrivals``.

Recompute the plan's groups from the arrived E, run the final prompt pass taking each reused
layer's K/V as it arrives (eagerly through a waiting cache, or as CUDA graphs), then decode. A
failed transfer falls back to full prefill and rejected entries are recomputed; per-layer clocks
put every computation on the request's timeline.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Callable

import torch
from transformers import DynamicCache

from ds_study.arch import layout
from ds_study.executor import (decode, greedy_after, lower_right_exact, prepare_suffix, recompute_group,
                               recompute_group_streaming, streams_e_rows)
from ds_study.plans import Plan, parse_plan
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.errors import EntryRejected, TransferFailed
from ds_study.serving.graphs import graphs_for
from ds_study.serving.rules import STREAMING, Item, repair_plan
from ds_study.serving.timeline import Request, RequestResult, Span


E_SOON_S = 5e-3  # streaming E: if the rest of E is due within this, recompute once over all of it
# (each extra streamed step cost about 5 ms on the CPU benchmark at 20 Gbit/s; see docs/engine.md)


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
        parts = layout(self.model)
        for i, layer in enumerate(parts.layers()):
            self._handles.append(layer.register_forward_pre_hook(self._pre))
            self._handles.append(layer.register_forward_hook(self._post(i)))
        self._handles.append(parts.head_module().register_forward_hook(self._head))
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


@torch.no_grad()
def _prefill_and_decode(req: Request, plan: Plan, fetch_e, fetch_kv, clock: LayerClock, recomputed: dict,
                        fetch_e_rows=None, chunk: int = 0, graphs: bool = False, overlap: bool = True):
    """Recompute the plan's groups (E from ``fetch_e``), then the final pass over all layers, taking
    reused layers' K/V from ``fetch_kv`` as they arrive, then greedy decoding. Returns the decoded
    tokens and the cache the decoding ran on (every prompt token's K/V, plus the generated ones').

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
        return greedy_after(model, cache, hidden, req.max_new_tokens, req.eos_token_id, logits=logits), cache
    clock.phase = "final"
    out = decode(model, [], suffix, req.max_new_tokens, req.eos_token_id, cache=cache, prepared=prepared)
    clock.phase = None
    return out, cache


_STREAMS: dict = {}


def _overlap_streams(device) -> tuple:
    """(recompute stream, high-priority final-pass stream) of a CUDA device, made once."""
    device = torch.device(device)
    if device not in _STREAMS:
        _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device, priority=-1))
    return _STREAMS[device]


@torch.no_grad()
def execute(req: Request, strategy: str, plan: Plan, arrivals: Arrivals, timeout_s: float,
            e_chunk_tokens: int = 0, graphs: bool = False, overlap: bool = True,
            keep_cache: bool = False) -> RequestResult:
    """Serve one request on the calling thread while a loader fills ``arrivals``.

    Non-streaming strategies wait for every item first; streaming ones wait for each E just before
    its group (with ``e_chunk_tokens``, only for the E rows of the next token chunk, where the
    loader reports partial progress) and for each layer's KV just before the final pass reaches it. A failed or timed-out
    transfer falls back to the receiver's own full prefill; rejected entries are recomputed under
    ``repair_plan``. Either is recorded in the result. ``keep_cache``: hand the cache decoding ran on
    to the result (``RequestResult.cache``), so a server can go on decoding the request in a batch.
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
                out, cache = _prefill_and_decode(req, plan, fetch_e, fetch_kv, clock, recomputed, *stream, **fast)
            except EntryRejected:
                arrivals.wait_all(timeout_s)  # know every rejected entry before replanning
                bad_kv = [it.layer for it in arrivals.rejected if it.kind == "kv"]
                bad_e = [it.layer for it in arrivals.rejected if it.kind == "e"]
                fixed = repair_plan(plan, n, bad_kv, bad_e)
                result.rejected = sorted(it.name for it in arrivals.rejected)
                result.repaired_plan = fixed.name
                clock.phase, clock.first_token_at = None, None
                out, cache = _prefill_and_decode(req, fixed, fetch_e, fetch_kv, clock, recomputed, **fast)
        except TransferFailed as e:
            arrivals.cancelled.set()
            result.fallback, result.reason = "full_prefill", str(e)
            spans.append(Span(req.name, "fallback", arrivals.now(), arrivals.now()))
            clock.phase, clock.first_token_at = None, None
            out, cache = _prefill_and_decode(req, parse_plan("full_prefill", n), None, None, clock, {}, **fast)
    arrivals.prefilled_at = t0 + (clock.first_token_at if clock.first_token_at is not None else arrivals.now())
    arrivals.prefilled.set()
    result.ttft = (clock.first_token_at if clock.first_token_at is not None else arrivals.now()) - req.arrival
    result.token_ids, result.first_logits = out.token_ids, out.first_logits
    if keep_cache:
        result.cache = cache
    arrivals.settle()  # what a worker process reported while nobody waited
    result.bytes_loaded = arrivals.bytes
    result.spans = sorted(arrivals.spans + spans, key=lambda s: (s.start, s.end))
    return result
