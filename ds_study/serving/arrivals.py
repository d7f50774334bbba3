"""What has reached the receiver for one request: the meeting point of a loader and the compute side.

Every loader fills one ``Arrivals`` per request and ``execute`` waits on it, per item or per row
of a streaming E, so loaders and the computation never know about each other.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from ds_study.serving.errors import EntryRejected, TransferFailed
from ds_study.serving.rules import Item
from ds_study.serving.timeline import Span


class Arrivals:
    """What has reached the receiver for one request: per-item tensors and arrival events.

    A loader (a thread reading the store over a Link, the link worker process, or a
    torch.distributed receiver) calls ``deliver``/``reject``/``fail``; the compute side calls
    ``wait``, which blocks until the item is there, raising TransferFailed on failure or timeout and
    EntryRejected on a checksum mismatch. On CUDA a delivery may carry an event that the consuming
    stream waits on. Every wait blocks in ``_block``: here on a condition a loader thread notifies;
    ``loaders.process.WorkerArrivals`` instead reads the worker's reports there.
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
