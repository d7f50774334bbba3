"""A paced serial link: the one place that decides when each byte of a transfer is handed over.

Kept free of torch so that the link worker process (``ds_study.link_worker``) can pace its copies
with exactly the schedule the in-process loaders use, without importing torch.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Callable


def sleep_until(t: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``t`` (CLOCK_MONOTONIC: the same clock in every process)."""
    while (d := t - time.perf_counter()) > 0:
        time.sleep(d)


def primed_sha256(dtype: str, shape: tuple):
    """A sha256 primed like ``caches.tensors_sha256({"t": tensor})`` for a tensor of this dtype
    (``str(tensor.dtype)``) and shape: fed the tensor's bytes in order, it gives the same digest."""
    h = hashlib.sha256()
    for part in (b"t", dtype.encode(), str(tuple(shape)).encode()):
        h.update(part)
    return h


def offsets(sizes) -> list[int]:
    """Where each of the concatenated pieces of one transfer starts, plus the total at the end."""
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out


def pieces(bounds: list[int], lo: int, hi: int):
    """(j, a, b): the part [a, b) of piece j that bytes [lo, hi) of the transfer cover (``bounds`` from
    ``offsets``); a link chunk may span piece boundaries."""
    for j in range(len(bounds) - 1):
        a, b = max(lo, bounds[j]) - bounds[j], min(hi, bounds[j + 1]) - bounds[j]
        if a < b:
            yield j, a, b


def _bytes(t):
    if not t.is_contiguous():
        raise ValueError("link transfers need contiguous tensors")
    import torch

    return t.reshape(-1).view(torch.uint8)


@dataclass
class Link:
    """A serial link of ``gbps`` Gbit/s (None: as fast as memory copies) and a per-transfer latency.

    Transfers move in chunks, and chunk j is handed over only once the link could have delivered
    it (start + latency + bytes through j / rate), against absolute deadlines. A transfer starts
    when its data is ready or when the previous transfer ends on the wire, whichever is later
    (``schedule``): a thread that wakes up late delays when it *notices* bytes, never when the
    wire carries them, so scheduling lag does not pile up across items. The same schedule paces
    local copies, CUDA copies (chunk issue is throttled), the link worker process's copies and
    distributed sends.
    """

    gbps: float | None = None
    latency_s: float = 0.0
    chunk_bytes: int = 1 << 18

    def __post_init__(self):
        if self.gbps is not None and not self.gbps > 0:
            raise ValueError(f"link bandwidth must be positive (Gbit/s) or None, got {self.gbps}")
        if self.latency_s < 0 or self.chunk_bytes <= 0:
            raise ValueError("link latency must be >= 0 and chunk_bytes > 0")
        self._lock = threading.Lock()
        self.busy_until = 0.0  # perf_counter time at which the last scheduled transfer leaves the wire

    @property
    def bytes_per_s(self) -> float | None:
        return None if self.gbps is None else self.gbps * 1e9 / 8

    def seconds(self, nbytes: int) -> float:
        """Time the link needs for one transfer of ``nbytes`` (the analytic load time)."""
        return self.latency_s + (0.0 if self.gbps is None else nbytes / self.bytes_per_s)

    def schedule(self, nbytes: int, ready: float | None = None) -> float:
        """Book the wire for one transfer whose data is ready at ``ready`` (default now); its start."""
        ready = time.perf_counter() if ready is None else ready
        start = max(ready, self.busy_until)
        self.busy_until = start + self.seconds(nbytes)
        return start

    def chunks(self, nbytes: int, start: float | None = None):
        """Yield (lo, hi) byte ranges of one transfer, each when the link has delivered it."""
        start = self.schedule(nbytes) if start is None else start
        for lo in range(0, nbytes, self.chunk_bytes):
            hi = min(nbytes, lo + self.chunk_bytes)
            if self.gbps is not None or self.latency_s:
                sleep_until(start + self.seconds(hi))
            yield lo, hi

    def transfer(self, nbytes: int, on_chunk: Callable[[int, int], None],
                 cancelled: Callable[[], bool] | None = None, ready: float | None = None,
                 on_start: Callable[[float], None] | None = None) -> float | None:
        """One paced transfer of ``nbytes``: ``on_chunk(lo, hi)`` moves each byte range once the link
        has delivered it (``on_start`` first learns when the transfer starts on the wire). Returns that
        start, or None if ``cancelled()`` turned true midway (then the unsent rest is not booked: the
        next transfer may start now)."""
        with self._lock:
            start = self.schedule(nbytes, ready)
            booked_until = self.busy_until
            if on_start is not None:
                on_start(start)
            for lo, hi in self.chunks(nbytes, start):
                if cancelled is not None and cancelled():
                    if self.busy_until == booked_until:  # the rest never goes on the wire: free it from now
                        self.busy_until = max(start, time.perf_counter())
                    return None
                on_chunk(lo, hi)
            return start

    def copy(self, srcs: list, dsts: list, stream=None, cancelled: Callable[[], bool] | None = None,
             on_segment: Callable[[int, object], None] | None = None, ready: float | None = None) -> float | None:
        """Copy each source tensor into its destination as one paced transfer; returns the time it
        started on the wire, or None if cancelled midway.

        ``ready``: when the data was ready to go (default now). ``on_segment(j, bytes)`` sees every
        copied byte range of source j, in order (used to checksum an entry while it is on the link
        instead of before or after)."""
        flat = [(_bytes(s), _bytes(d)) for s, d in zip(srcs, dsts)]
        bounds = offsets(s.numel() for s, _ in flat)

        def move(lo: int, hi: int) -> None:
            for j, a, b in pieces(bounds, lo, hi):
                s, d = flat[j]
                d[a:b].copy_(s[a:b], non_blocking=stream is not None)
                if on_segment is not None:
                    on_segment(j, s[a:b])

        if stream is None:
            return self.transfer(bounds[-1], move, cancelled, ready)
        import torch

        with torch.cuda.stream(stream):
            return self.transfer(bounds[-1], move, cancelled, ready)
