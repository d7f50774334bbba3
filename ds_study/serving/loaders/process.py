"""The link worker loader (``loader="process"``): the receiver's side of ``ds_study.link_worker``.

``Engine(loader="process")`` (the default for host-memory stores on CPU) stages every item a run
will load into a shared-memory arena before the run's clock starts, hands the worker the run's
jobs, and computes while the worker paces the copies into the receiver's destinations (views of
the same arena). The compute thread reads the worker's reports only when it waits for an item
(``WorkerArrivals._block``), so no second thread of this process ever takes the interpreter lock
from it; see ``link_worker`` for why that matters.

Workers are reused across runs (one per concurrently running engine) and replaced when one dies.
A worker that dies mid-run fails the run's unfinished requests with the reason, and they fall back
to full prefill; nothing waits longer than the engine's timeout.
"""

from __future__ import annotations

import atexit
import mmap
import os
import select
import subprocess
import sys
import tempfile
import threading
import time

import torch

from ds_study.link import Link
from ds_study.link_worker import FrameReader, write_frame
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.errors import error_line
from ds_study.serving.loaders.base import Loader, LoaderUnavailable, Run, item_sources, reject_corrupt
from ds_study.serving.rules import STREAMING, Item
from ds_study.serving.store import KVStore, context_hash
from ds_study.serving.timeline import Request

ALIGN = 64  # every staged region starts on a cache line (and any dtype's element boundary)


class NeedsThreadLoader(LoaderUnavailable):
    """This run cannot go through a worker (its entries are not in host memory): use the loader thread."""


class WorkerUnavailable(NeedsThreadLoader):
    """No worker could take this run (it would not start, or no room for its arena)."""

    warn = True


def available() -> bool:
    """Whether a worker can run here (a POSIX system: select() on pipes, shared file mappings)."""
    return os.name == "posix"


def _arena_dir(size: int) -> str:
    """Where an arena of ``size`` bytes fits: shared memory (/dev/shm) if it has room, else the temp
    directory (a file mapping: the page cache still serves it from memory). A mapping larger than
    its file system's free space would kill this process with SIGBUS when written, so neither
    having room is an error here, before anything is written."""
    for d in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(d) and os.access(d, os.W_OK):
            st = os.statvfs(d)
            if st.f_bavail * st.f_frsize >= size + (64 << 20):  # and some room to spare
                return d
    raise WorkerUnavailable(f"no room for a {size / 2**20:.0f} MiB link arena in /dev/shm or "
                            f"{tempfile.gettempdir()}")


class LinkWorker:
    """One running worker process, its pipes and its shared-memory arena."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [_package_root(), os.environ.get("PYTHONPATH")]
                                                           if p))
        self.proc = subprocess.Popen([sys.executable, "-m", "ds_study.link_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, bufsize=0)
        self.cmd_fd, self.reports = self.proc.stdin.fileno(), FrameReader(self.proc.stdout.fileno())
        _widen_pipe(self.proc.stdout.fileno())
        self.arena: torch.Tensor | None = None  # uint8 view of the shared mapping
        self.size = 0

    def alive(self) -> bool:
        return self.proc.poll() is None and not self.reports.eof

    def send(self, *msg) -> None:
        write_frame(self.cmd_fd, msg)

    def ensure_arena(self, nbytes: int, timeout_s: float) -> None:
        """A shared mapping of at least ``nbytes``, mapped by both processes (the file itself is
        unlinked once both hold it, so nothing is left behind on disk)."""
        if self.arena is not None and self.size >= nbytes:
            return
        size = max(nbytes, min(2 * self.size, 2 * nbytes), 1 << 20)
        fd, path = tempfile.mkstemp(prefix="ds_study-link-", dir=_arena_dir(size))
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
            try:
                self.send("arena", path, size)
            except OSError as e:
                raise WorkerUnavailable(f"the link worker is gone ({error_line(e)})") from None
            got = self.reports.wait(timeout_s)
            if got != [("arena-ok",)]:
                raise WorkerUnavailable(f"the link worker did not map its arena (got {got!r}, exit code "
                                        f"{self.proc.poll()})")
        finally:
            os.close(fd)
            os.unlink(path)
        self.arena, self.size = torch.frombuffer(mapping, dtype=torch.uint8), size

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.stdin.close()
                self.proc.wait(timeout=2)
            except Exception:  # noqa: BLE001 - a worker that does not quit is killed
                self.proc.kill()
                self.proc.wait()


def _widen_pipe(fd: int) -> None:
    """Room for many reports while the compute side does not read (it reads only when it waits): a
    full pipe would block the worker's next report and with it the link's pacing. Linux only (its
    default pipe holds 64 KiB, about a thousand reports); elsewhere the default stays."""
    import fcntl

    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)
        except OSError:  # above /proc/sys/fs/pipe-max-size for an unprivileged process: keep the default
            pass


def _package_root() -> str:
    import ds_study

    return os.path.dirname(os.path.dirname(os.path.abspath(ds_study.__file__)))


_IDLE: list[LinkWorker] = []
_ALL: list[LinkWorker] = []
_LOCK = threading.Lock()


def acquire() -> LinkWorker:
    with _LOCK:
        while _IDLE:
            w = _IDLE.pop()
            if w.alive():
                return w
            w.close()
        w = LinkWorker()
        _ALL.append(w)
        return w


def release(w: LinkWorker) -> None:
    with _LOCK:
        if w.alive():
            _IDLE.append(w)
        else:
            w.close()
            _ALL.remove(w)


@atexit.register
def _close_all() -> None:
    for w in list(_ALL):
        w.close()


class _Forwarded(threading.Event):
    """A flag of one request that the worker must also learn about (cancelled, prefilled)."""

    def __init__(self, on_set):
        super().__init__()
        self._on_set = on_set

    def set(self) -> None:
        if not self.is_set():
            super().set()
            self._on_set()


class WorkerArrivals(Arrivals):
    """Arrivals filled from a worker's reports, read whenever the compute side waits."""

    def __init__(self, items: list[Item], run: "WorkerRun", job: int):
        super().__init__(items, 0.0)
        self.run, self.job = run, job
        self.cancelled = _Forwarded(lambda: run.forward("cancel", job))
        self.prefilled = _Forwarded(lambda: run.forward("prefilled", job, self.prefilled_at))

    def _block(self, left: float) -> None:
        self.run.pump(left)

    def settle(self) -> None:
        self.run.pump(0.0)


class WorkerRun:
    """One engine run's jobs on one worker: staging, the run, the reports, the end."""

    def __init__(self, store: KVStore, link: Link, jobs: list[tuple[Request, str, list[Item]]], verify: bool,
                 timeout_s: float):
        self.store, self.link, self.verify, self.timeout_s = store, link, verify, timeout_s
        self.arrivals = [WorkerArrivals(items, self, j) for j, (_, _, items) in enumerate(jobs)]
        self.requests = [req for req, _, _ in jobs]
        self.worker: LinkWorker | None = None
        self.done = False
        self.spec = self._stage(jobs)

    def _stage(self, jobs) -> dict:
        """Lay out every entry in the arena (its staged source and the receiver's destination), copy
        the sources in, and describe the run for the worker, which then only moves bytes. An entry
        the store cannot give is reported when the worker reaches it, as the loader thread would."""
        staged, offset = [], 0  # per job, per item: (keys, [(tensor, sha256, src, dst, nbytes)] or the error)
        for req, _, items in jobs:
            ctx = context_hash(req.prefix_ids)
            per_item = []
            for item in items:
                try:
                    keys, srcs, want = item_sources(self.store, req, item, ctx)
                except Exception as e:  # noqa: BLE001 - the worker reports it when it gets there
                    per_item.append((None, error_line(e)))
                    continue
                if any(t.device.type != "cpu" for t in srcs):
                    raise NeedsThreadLoader(f"{item.name} of {req.name} is not in host memory")
                entries = []
                for t, sha in zip(srcs, want):
                    n = t.numel() * t.element_size()
                    entries.append((t, sha, offset, offset + _aligned(n), n))
                    offset += 2 * _aligned(n)
                per_item.append((keys, entries))
            staged.append(per_item)
        self.worker = acquire()
        try:
            self.worker.ensure_arena(max(offset, 1), self.timeout_s)
        except Exception:
            release(self.worker)
            self.worker = None
            raise
        arena = self.worker.arena
        self.dsts: dict[tuple[int, Item], tuple] = {}
        self.keys: dict[tuple[int, Item], list] = {}
        spec_jobs = []
        for j, ((req, strategy, items), per_item) in enumerate(zip(jobs, staged)):
            spec_items = []
            for item, (keys, entries) in zip(items, per_item):
                if isinstance(entries, str):
                    spec_items.append({"name": item.name, "error": entries, "entries": [], "stream_rows": False})
                    continue
                self.keys[(j, item)] = keys
                dsts = []
                for t, _, src, dst, n in entries:
                    arena[src:src + n].copy_(t.reshape(-1).view(torch.uint8))
                    dsts.append(arena[dst:dst + n].view(t.dtype).view(t.shape))
                self.dsts[(j, item)] = tuple(dsts)
                spec_items.append({"name": item.name, "error": None, "stream_rows": item.kind == "e" and len(dsts) == 1,
                                   "entries": [{"src": src, "dst": dst, "nbytes": n, "sha256": sha,
                                                "dtype": str(t.dtype), "shape": tuple(t.shape)}
                                               for t, sha, src, dst, n in entries]})
            spec_jobs.append({"arrival": req.arrival, "streaming": strategy in STREAMING, "items": spec_items})
        return {"gbps": self.link.gbps, "latency_s": self.link.latency_s, "chunk_bytes": self.link.chunk_bytes,
                "verify": self.verify, "jobs": spec_jobs}

    def start(self, t0: float) -> None:
        for arr in self.arrivals:
            arr.t0 = t0
        self.t0 = t0
        self.forward("run", dict(self.spec, t0=t0, busy_until=self.link.busy_until))

    def forward(self, *msg) -> None:
        if self.worker is None or self.done:
            return
        try:
            self.worker.send(*msg)
        except OSError as e:  # the worker is gone: pump() reports it
            self._died(f"link worker process unreachable: {error_line(e)}")

    def pump(self, timeout: float) -> None:
        """Apply the worker's reports: wait up to ``timeout`` seconds for the first (0: only those
        already there), then take whatever else is already there and return."""
        if self.worker is None or self.done:
            return
        reports = self.worker.reports
        deadline, got = time.perf_counter() + timeout, False
        while not self.done:
            frames = reports.frames()
            for msg in frames:
                self._apply(msg)
            got = got or bool(frames)
            if reports.eof:
                self._died(f"link worker process died (exit code {self.worker.proc.wait()})")
                return
            left = 0.0 if got else max(0.0, deadline - time.perf_counter())
            if not select.select([reports.fd], [], [], left)[0]:
                return
            reports.feed()

    def _apply(self, msg) -> None:
        kind = msg[0]
        if kind == "done":
            self.done = True
            self.link.busy_until = max(self.link.busy_until, msg[1])
            return
        arr = self.arrivals[msg[1]]
        if kind == "fail":
            arr.fail(msg[2])
            return
        item = arr.items[msg[2]]
        if kind == "begin":
            arr.begin(item, self.dsts[(msg[1], item)][0], at=msg[3])
        elif kind == "progress":
            arr.advance(item, msg[3])
        elif kind == "deliver":
            arr.deliver(item, self.dsts[(msg[1], item)], msg[3] - self.t0, msg[4] - self.t0,
                        request=self.requests[msg[1]].name)
        elif kind == "reject":
            keys = self.keys[(msg[1], item)]
            reject_corrupt(self.store, arr, item, [keys[k] for k in msg[4]], msg[3])

    def _died(self, reason: str) -> None:
        self.done = True
        for arr in self.arrivals:
            if len(arr.tensors) + len(arr.rejected) < len(arr.items):
                arr.fail(reason)

    def finish(self) -> None:
        """After the last request: every request is cancelled or prefilled by now; wait for the
        worker's end of run (bounded by the timeout), then give the worker back (or kill it)."""
        if self.worker is None:
            return
        deadline = time.perf_counter() + self.timeout_s
        while not self.done and time.perf_counter() < deadline:
            self.pump(deadline - time.perf_counter())
        for arr in self.arrivals:  # the arena is reused by the next run: drop every view of it
            arr.tensors.clear()
            arr._partial.clear()
        self.dsts.clear()
        w, self.worker = self.worker, None
        if not self.done:
            w.proc.kill()
            w.proc.wait()
        release(w)


class ProcessLoader(Loader):
    """``WorkerRun`` behind the ``Loader`` interface: staged before the clock, started at t0."""

    name = "process"

    def stage(self, run: Run) -> list[Arrivals]:
        if run.on_cuda or not available():
            raise NeedsThreadLoader("the link worker moves host memory on a POSIX system; use loader='thread'")
        self.worker_run = WorkerRun(run.store, run.link, [(job.request, job.strategy, job.items) for job in run.jobs],
                                    run.verify, run.timeout_s)
        return self.worker_run.arrivals

    def start(self, t0: float) -> None:
        self.worker_run.start(t0)

    def finish(self, results) -> None:
        self.worker_run.finish()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
