"""The engine's facade: validate a run's requests, start a loader, serve them in arrival order.

``Engine.run`` is the one entry point every caller (benchmarks, the two-process transport, tests)
goes through; what it composes lives in its own modules (rules, arrivals, execute, loaders).
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

from ds_study.executor import check_supported
from ds_study.link import Link, sleep_until
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.errors import EngineError
from ds_study.serving.execute import execute
from ds_study.serving.loaders.thread import StoreLoader
from ds_study.serving.rules import check_request, transfer_items
from ds_study.serving.store import KVStore
from ds_study.serving.timeline import Request, RequestResult


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
