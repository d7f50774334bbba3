"""The loader thread (``loader="thread"``): moves a run's items from the store over a paced ``Link``
inside this process.

Needed for CUDA copies (a side stream from pinned host memory, each arrival with an event) and for
stores with entries on a GPU; on CPU the link worker process is preferred, since this thread takes
the interpreter lock from the compute thread each time it wakes.
"""

from __future__ import annotations

import threading

import torch

from ds_study.caches import CacheChecksumError
from ds_study.link import Link, sleep_until
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.errors import error_line
from ds_study.serving.loaders.base import Loader, Run, item_sources, reject_corrupt
from ds_study.serving.rules import STREAMING, Item
from ds_study.serving.store import KVStore, context_hash, entry_hasher
from ds_study.serving.timeline import Request


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


def _and_advance(feed, arr: Arrivals, item: Item):
    """An on_segment callback that also reports the copied bytes of ``item`` to ``arr``."""
    def on_segment(j, seg):
        if feed is not None:
            feed(j, seg)
        arr.advance(item, seg.numel() * seg.element_size())
    return on_segment


class ThreadLoader(Loader):
    """``StoreLoader`` behind the ``Loader`` interface: started ahead in ``stage``, released at t0.

    On CUDA its copies go on a side stream of the run's device, and each arrival carries an event."""

    name = "thread"

    def stage(self, run: Run) -> list[Arrivals]:
        self.arrivals = [Arrivals(job.items, 0.0) for job in run.jobs]
        stream = torch.cuda.Stream(run.device) if run.on_cuda else None
        jobs = [(job.request, job.strategy, arr) for job, arr in zip(run.jobs, self.arrivals)]
        self.thread = StoreLoader(run.store, run.link, jobs, run.device, stream, run.verify)
        self.thread.start()
        self.timeout_s = run.timeout_s
        return self.arrivals

    def start(self, t0: float) -> None:
        for arr in self.arrivals:
            arr.t0 = t0
        self.thread.go.set()

    def finish(self, results) -> None:
        self.thread.join(timeout=self.timeout_s)
