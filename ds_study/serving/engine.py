"""The engine's facade: validate a run's requests, stage a loader, serve the requests in arrival order.

``Engine.run`` is the one entry point every caller goes through (benchmarks, the two-process
transport, tests); what it composes lives in its own modules: the rules, the arrivals, the
executor and the loaders, which it knows only through the ``Loader`` interface and registry.
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
from ds_study.serving.loaders import AUTO, Job, Loader, LoaderUnavailable, Run, create_loader, loader_names
from ds_study.serving.rules import check_request, transfer_items
from ds_study.serving.store import KVStore
from ds_study.serving.timeline import Request, RequestResult


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
    paper's schedule). ``keep_cache``: each result carries the cache its decoding ran on
    (``RequestResult.cache``), for a server that decodes on in a batch (``serving.server``).

    ``loader``: what moves the items, a name in the registry (``ds_study.serving.loaders.LOADERS``),
    made fresh for every run with ``loader_options`` as its constructor's arguments. ``"process"``:
    the link worker process (``loaders.process``), which never takes this process's interpreter lock
    from the compute thread; ``"thread"``: a loader thread of this process (``loaders.thread``;
    needed for CUDA copies and for stores with entries on a GPU); ``"distributed"``: a sender
    process over torch.distributed (``loaders.distributed``; ``store`` and ``link`` unused, the
    sender paces); ``"auto"`` (default): the first of ``loaders.AUTO`` that can serve the run, i.e.
    the worker for host-memory stores on CPU, the thread otherwise.
    """

    def __init__(self, store: KVStore | None, link: Link | None, timeout_s: float = 30.0, device=None,
                 verify: bool = True, gil_switch_s: float | None = 2e-4, e_chunk_tokens: int = 64,
                 suffix_graphs: bool | None = None, overlap_recompute: bool = True, loader: str = "auto",
                 loader_options: dict | None = None, keep_cache: bool = False):
        if loader not in loader_names():
            raise EngineError(f"unknown loader {loader!r}; use one of {', '.join(loader_names())}")
        self.store, self.link, self.timeout_s, self.verify = store, link, timeout_s, verify
        self.loader, self.loader_options = loader, dict(loader_options or {})
        self.device = torch.device(device) if device is not None else None
        self.gil_switch_s, self.e_chunk_tokens = gil_switch_s, e_chunk_tokens
        # None: on CUDA only (where it pays); True on CPU runs the same static-buffer steps eagerly
        self.suffix_graphs = (self.device is not None and self.device.type == "cuda") if suffix_graphs is None \
            else suffix_graphs
        self.overlap_recompute = overlap_recompute
        self.keep_cache = keep_cache  # results carry the cache decoding ran on (a server decodes on from it)
        self.in_flight: list[Arrivals] = []  # the current run's arrivals: a server fails them if a sender dies

    def run(self, requests: list[Request], strategy: str) -> list[RequestResult]:
        previous = sys.getswitchinterval()
        if self.gil_switch_s:
            sys.setswitchinterval(self.gil_switch_s)
        try:
            return self._run(requests, strategy)
        finally:
            sys.setswitchinterval(previous)

    def _run(self, requests: list[Request], strategy: str) -> list[RequestResult]:
        jobs = []
        for req in requests:  # every request is validated before anything moves
            check_supported(req.model)
            n = req.model.config.num_hidden_layers
            strat, plan = check_request(strategy, req.plan, n)
            jobs.append(Job(req, strat, plan, transfer_items(strat, plan, n)))
        jobs.sort(key=lambda job: job.request.arrival)
        loader, arrivals = self._stage(Run(jobs, self.store, self.link, self.device, self.verify, self.timeout_s))
        return self._serve(jobs, arrivals, loader)

    def _stage(self, run: Run) -> tuple[Loader, list[Arrivals]]:
        """The run's loader, staged: the one asked for, or under "auto" the first that can serve it."""
        names = AUTO if self.loader == "auto" else (self.loader,)
        for k, name in enumerate(names):
            loader = create_loader(name, **self.loader_options)
            try:
                arrivals = loader.stage(run)
            except LoaderUnavailable as e:
                if self.loader != "auto":
                    raise EngineError(f"loader={name!r} cannot serve this run: {e}") from None
                if e.warn and k + 1 < len(names):
                    warnings.warn(f"{e}; moving items with the {names[k + 1]} loader instead", RuntimeWarning,
                                  stacklevel=4)
                continue
            if len(arrivals) != len(run.jobs):
                raise EngineError(f"loader {name!r} staged {len(arrivals)} requests of {len(run.jobs)}")
            return loader, arrivals
        raise EngineError(f"none of the loaders {', '.join(names)} can serve this run")

    def _serve(self, jobs: list[Job], arrivals: list[Arrivals], loader: Loader) -> list[RequestResult]:
        """Start the loader's clock, serve every request in arrival order on this thread, then stop it."""
        t0 = time.perf_counter()
        self.in_flight = arrivals
        loader.start(t0)
        results = []
        try:
            for job, arr in zip(jobs, arrivals):
                sleep_until(t0 + job.request.arrival)
                res = execute(job.request, job.strategy, job.plan, arr, self.timeout_s, self.e_chunk_tokens,
                              self.suffix_graphs, self.overlap_recompute, self.keep_cache)
                res.loader = loader.name if arr.items else ""
                results.append(res)
        finally:  # also when a request raised: release a loader waiting for a prefill that will not come
            for arr in arrivals:
                arr.cancelled.set()
                arr.prefilled.set()
            self.in_flight = []
            loader.finish(results)
        return results
