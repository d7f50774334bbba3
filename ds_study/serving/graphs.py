"""The final prompt pass as per-layer CUDA graphs: one launch per layer instead of hundreds of kernels.

On CUDA a short suffix's eager pass is host-bound; graphs keep the per-layer pipelining (the
compute stream still waits on each layer's arrival between replays). Off CUDA the same steps run
eagerly on the same static buffers, so their exactness is tested on CPU.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import OrderedDict
from typing import Callable
from unittest import mock

import torch
from transformers import DynamicCache

from ds_study.arch import layout
from ds_study.executor import lower_right_exact, run_layer
from ds_study.serving.errors import EngineError


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
        parts = layout(self.model)
        if 0 <= i < self.n:
            with mock.patch.dict(os.environ, {FORCE_GQA: "1"}):  # restored afterwards, whatever it was
                self.hidden = run_layer(self.model, i, self.hidden, self.mask, self.pos_emb, self.positions, self.cache)
        elif i < 0:
            self.hidden = parts.embed(self.ids)
            self.pos_emb = parts.rotary(self.hidden, self.positions)
        else:
            self.normed = parts.norm(self.hidden)
            self.logits = parts.head(self.normed[:, -1:])
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
