"""The link worker: a separate process that moves a run's items over a paced Link.

Why a process and not a thread: a loader thread shares the interpreter lock with the thread that
computes. Each time it wakes to hand over a chunk it takes the lock from the compute thread, and on
this project's 2-core CPU machine that slowed a group's recomputation by 9% with a wake-up every
2.6 ms and by 30% every 0.65 ms, while the same loop in another process cost nothing measurable
(docs/engine.md, "Measurements on CPU"). A NIC or a copy engine does not take the receiver's interpreter
lock either, so the worker is the more faithful model of a link.

The worker imports no torch: it copies bytes between regions of a shared-memory arena (the staged
sources and the receiver's destinations), checksums each entry as it crosses (sha256, primed like
``caches.tensors_sha256``) and paces every transfer with ``ds_study.link.Link``, the same schedule
the in-process loaders use. It reads commands on stdin and reports on stdout, as length-prefixed
pickles; data never goes through the pipes, and every report of progress is written after the bytes
it reports, so whoever reads the report sees them. Parent side: ``ds_study.serving.loaders.process``.

Commands: ("arena", path, size) maps a new arena; ("run", spec) runs one engine run's jobs in order
(FIFO on one link, as ``serving.loaders.thread.StoreLoader``); during a run, ("cancel", job) and
("prefilled", job, perf_counter time) arrive; ("quit",) ends the worker, as does the end of stdin.
Reports: ("arena-ok",), ("begin", job, item, wire start), ("progress", job, item, bytes),
("deliver", job, item, wire start, arrival), ("reject", job, item, bytes sent, bad entry indices),
("fail", job, reason), ("done", link busy_until).
"""

from __future__ import annotations

import mmap
import os
import pickle
import select
import struct
import sys
import time

from ds_study.link import Link, offsets, pieces, primed_sha256, sleep_until

FRAME = struct.Struct("<I")


def write_frame(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(FRAME.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


class FrameReader:
    """Splits what arrives on a pipe into frames."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.eof = fd, bytearray(), False

    def feed(self) -> None:
        """One read of whatever is there (the fd must be readable or the read blocks)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            self.eof = True
        self.buf += chunk

    def frames(self) -> list:
        out = []
        while len(self.buf) >= FRAME.size:
            (n,) = FRAME.unpack_from(self.buf)
            if len(self.buf) < FRAME.size + n:
                break
            out.append(pickle.loads(bytes(self.buf[FRAME.size:FRAME.size + n])))
            del self.buf[:FRAME.size + n]
        return out

    def wait(self, timeout: float | None) -> list:
        """Frames that are complete after waiting at most ``timeout`` seconds (None: until one is)."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not (out := self.frames()) and not self.eof:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            if select.select([self.fd], [], [], left)[0]:
                self.feed()
            elif left is not None and left <= 0:
                break
        return out


class Worker:
    def __init__(self, cmd_fd: int, report_fd: int):
        self.cmds, self.report_fd = FrameReader(cmd_fd), report_fd
        self.arena: memoryview | None = None
        self.cancelled: set[int] = set()
        self.prefilled: dict[int, float] = {}
        self.stopping = False

    def report(self, *msg) -> None:
        write_frame(self.report_fd, msg)

    def take(self, frames: list) -> None:
        for msg in frames:
            if msg[0] == "cancel":
                self.cancelled.add(msg[1])
            elif msg[0] == "prefilled":
                self.prefilled[msg[1]] = msg[2]
            elif msg[0] == "quit":
                self.stopping = True

    def poll(self, timeout: float = 0.0) -> None:
        self.take(self.cmds.wait(timeout))
        if self.cmds.eof:  # the parent is gone
            os._exit(0)

    def serve(self) -> None:
        while not self.stopping:
            frames = self.cmds.wait(None)
            if self.cmds.eof:
                return
            while frames:
                msg = frames.pop(0)
                if msg[0] == "arena":
                    _, path, size = msg
                    with open(path, "r+b") as f:
                        self.arena = memoryview(mmap.mmap(f.fileno(), size))
                    self.report("arena-ok")
                elif msg[0] == "run":
                    # what came in the same read belongs to this run (the parent sends the next
                    # "run" only after this one's "done"): a "prefilled" left here would stall it
                    self.run(msg[1], early=frames)
                    frames = []
                else:
                    self.take([msg])

    def run(self, spec: dict, early: list = ()) -> None:
        self.cancelled, self.prefilled = set(), {}
        self.take(early)
        self.link = Link(spec["gbps"], spec["latency_s"], spec["chunk_bytes"])
        self.link.busy_until = spec["busy_until"]
        prev = None
        for j, job in enumerate(spec["jobs"]):
            released = spec["t0"] + job["arrival"]  # the request exists from here on
            sleep_until(released)
            if not job["streaming"] and prev is not None:  # (a), (b): wait for the previous prefill
                while prev not in self.prefilled and j not in self.cancelled and not self.stopping:
                    self.poll(0.05)
                released = max(released, self.prefilled.get(prev, released))
            for i, item in enumerate(job["items"]):
                self.poll()
                if j in self.cancelled or self.stopping:
                    break
                try:
                    if item["error"] is not None:  # staging could not read the entry from the store
                        self.report("fail", j, f"loading {item['name']} failed: {item['error']}")
                        break
                    if not self.send(j, i, item, released, spec["verify"]):
                        break
                except Exception as e:  # noqa: BLE001 - whatever breaks fails this request now, never hangs it
                    self.report("fail", j, f"loading {item['name']} failed: {type(e).__name__}: {e}")
                    break
            prev = j
        self.report("done", self.link.busy_until)

    def send(self, j: int, i: int, item: dict, released: float, verify: bool) -> bool:
        """Move one item, checksumming each entry on the way; False when the request stops midway."""
        arena, entries = self.arena, item["entries"]
        hashers = [primed_sha256(e["dtype"], e["shape"]) for e in entries] if verify else None
        bounds = offsets(e["nbytes"] for e in entries)

        def move(lo: int, hi: int) -> None:
            for k, a, b in pieces(bounds, lo, hi):
                e = entries[k]
                src = arena[e["src"] + a:e["src"] + b]
                arena[e["dst"] + a:e["dst"] + b] = src
                if hashers is not None:
                    hashers[k].update(src)
            if item["stream_rows"]:  # written after the bytes, so whoever reads it sees them
                self.report("progress", j, i, hi - lo)

        def on_start(start: float) -> None:
            if item["stream_rows"]:
                self.report("begin", j, i, start)

        def cancelled() -> bool:
            self.poll()
            return j in self.cancelled or self.stopping

        start = self.link.transfer(bounds[-1], move, cancelled, released, on_start)
        if start is None:
            return False
        if hashers is not None:
            bad = [k for k, (h, e) in enumerate(zip(hashers, entries)) if h.hexdigest() != e["sha256"]]
            if bad:
                self.report("reject", j, i, bounds[-1], bad)
                return True
        self.report("deliver", j, i, start, time.perf_counter())
        return True


def main() -> None:
    report_fd = os.dup(sys.stdout.fileno())  # reports only; anything printed goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    Worker(sys.stdin.fileno(), report_fd).serve()


if __name__ == "__main__":
    main()
