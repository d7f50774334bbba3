"""The torch.distributed loader (``loader="distributed"``): one request's items from a live sender process.

The receiver asks a sender (``ds_study.transport``'s rank 0) for the items its strategy needs;
the sender prefills the context one layer at a time and sends each item once it exists, paced by
its own Link, with a header that carries shapes and checksums. This module holds the wire
protocol both sides speak and the receiver's loader: the handshake is staged before the run's
clock starts (a server keeps its connections), and a thread receives the items into the
request's ``Arrivals`` while the engine computes. Any error -- an unreachable, dead, stalled or
confused sender -- fails the request, which falls back to full prefill; a received item whose
checksum does not match is rejected and recomputed. gloo on CPU (loopback by default), NCCL on GPUs.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta

import torch

from ds_study.caches import tensors_sha256
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.errors import error_line
from ds_study.serving.loaders.base import Loader, LoaderUnavailable, Run
from ds_study.serving.rules import Item
from ds_study.serving.store import context_hash

SENDER, RECEIVER = 0, 1
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def init(rank: int, port: int, timeout_s: float, backend: str = "gloo", addr: str = "127.0.0.1") -> None:
    import torch.distributed as dist

    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=timeout_s))


def wire_device(backend: str) -> str:
    return "cuda" if backend == "nccl" else "cpu"


def send_json(obj, dst: int, device: str = "cpu") -> None:
    import torch.distributed as dist

    payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    dist.send(torch.tensor([payload.numel()], dtype=torch.int64, device=device), dst)
    dist.send(payload, dst)


def recv_json(src: int, device: str = "cpu"):
    import torch.distributed as dist

    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(n, src)
    payload = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.recv(payload, src)
    return json.loads(bytes(payload.cpu().tolist()).decode())


def segments(tensors: list[torch.Tensor], lo: int, hi: int):
    """Byte ranges of a chunk [lo, hi) of the tensors laid end to end, per tensor."""
    base = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        a, b = max(lo, base), min(hi, base + n)
        if a < b:
            yield t.reshape(-1).view(torch.uint8)[a - base:b - base]
        base += n


class DistLoader(threading.Thread):
    """Receive the requested items from the sender into ``arrivals``; any error fails the request."""

    def __init__(self, arrivals: Arrivals, request: str, backend: str = "gloo", device=None):
        super().__init__(daemon=True, name="ds-dist-loader")
        self.arr, self.request, self.wire, self.device = arrivals, request, wire_device(backend), device
        self.hello: dict | None = None

    def run(self):
        import torch.distributed as dist

        try:
            for item in self.arr.items:
                if self.arr.cancelled.is_set():  # the receiver fell back: stop competing with its prefill
                    return
                head = recv_json(SENDER, self.wire)
                if "error" in head:
                    raise RuntimeError(f"sender error: {head['error']}")
                if Item(*head["item"]) != item:
                    raise RuntimeError(f"sender sent {Item(*head['item']).name}, expected {item.name}")
                start = self.arr.now()
                bufs = [torch.empty(t["shape"], dtype=DTYPES[t["dtype"]], device=self.wire) for t in head["tensors"]]
                total = sum(b.numel() * b.element_size() for b in bufs)
                for lo in range(0, total, head["chunk_bytes"]):
                    for seg in segments(bufs, lo, min(total, lo + head["chunk_bytes"])):
                        dist.recv(seg, SENDER)
                bad = [i for i, (b, t) in enumerate(zip(bufs, head["tensors"]))
                       if tensors_sha256({"t": b}) != t["sha256"]]
                if bad:
                    self.arr.reject(item, "checksum mismatch after transfer", total)
                    continue
                dev = self.device or self.wire
                self.arr.deliver(item, tuple(b.to(dev) for b in bufs), start, self.arr.now(), request=self.request)
        except Exception as e:  # noqa: BLE001 - a dead or confused sender must never hang the receiver
            self.arr.fail(f"transfer from the sender failed: {error_line(e)}")


class DistributedLoader(Loader):
    """A run of one request against the sender at ``addr:port``: the handshake in ``stage`` (a
    failure there fails the request, which then falls back), the items on a ``DistLoader`` thread
    from ``start``, and the receiver's acknowledgement in ``finish`` once it served from them."""

    name = "distributed"

    def __init__(self, port: int, backend: str = "gloo", addr: str = "127.0.0.1"):
        self.port, self.backend, self.addr, self.wire = port, backend, addr, wire_device(backend)
        self.thread: DistLoader | None = None
        self.sender: str | None = None  # the sender's identity, from the handshake

    def stage(self, run: Run) -> list[Arrivals]:
        if len(run.jobs) != 1:
            raise LoaderUnavailable(f"a sender connection serves one request, not {len(run.jobs)}")
        job = run.jobs[0]
        req = job.request
        self.arr = Arrivals(job.items, 0.0)
        try:
            init(RECEIVER, self.port, run.timeout_s, self.backend, self.addr)
            send_json({"prefix_ids": list(req.prefix_ids), "items": [list(it) for it in job.items],
                       "receiver": req.receiver}, SENDER, self.wire)
            hello = recv_json(SENDER, self.wire)
            self.sender = hello.get("sender")
            if "error" in hello:
                raise RuntimeError(hello["error"])
            from ds_study.pair import shape_of

            if hello["shape"] != shape_of(req.model.config):
                raise RuntimeError(f"sender shape {hello['shape']} differs from the receiver's")
            if hello["context"] != context_hash(req.prefix_ids):
                raise RuntimeError("sender answered for a different context")
            device = run.device or next(req.model.parameters()).device
            self.thread = DistLoader(self.arr, req.name, self.backend, device)
        except Exception as e:  # noqa: BLE001 - the request falls back to full prefill with the reason
            self.arr.fail(f"could not reach the sender: {error_line(e)}")
        return [self.arr]

    def start(self, t0: float) -> None:
        self.arr.t0 = t0
        if self.thread is not None:
            self.thread.start()

    def finish(self, results) -> None:
        """Acknowledge a request served from the sender's items: a sender exiting before the ack could
        cut its last bytes off. A receiver that fell back sends none; the sender's timeout ends its wait."""
        if self.thread is not None and results and results[0].fallback is None:
            try:
                send_json({"done": True}, SENDER, self.wire)
            except Exception:  # noqa: BLE001 - the ack is best effort
                pass
