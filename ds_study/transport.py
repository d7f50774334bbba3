"""A real transport: the sender and the receiver as two processes, torch.distributed point-to-point.

The sender (rank 0) prefills the context one layer at a time and sends each requested item (a
transition E, a layer's K and V) as soon as it exists, paced by a Link, with a header that carries
shapes and checksums. The receiver (rank 1) asks for the items its strategy needs, receives them on
a thread into ``engine.Arrivals``, and serves the request with ``engine.execute`` meanwhile. If the
sender dies or stalls, the receive fails or times out and the receiver falls back to its own full
prefill; a received item whose checksum does not match is rejected and recomputed. The receiver
never waits longer than its timeout for anything, and exits without tearing down a dead group.

    python -m ds_study.transport sender   --model zoo:code --port 29512 --gbps 1
    python -m ds_study.transport receiver --model zoo:qa --port 29512 --plan 6-7 \
        --strategy pipelined --prompt prompt.json --out result.json

gloo on CPU (loopback only), NCCL with ``--backend nccl`` on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch

from ds_study.caches import tensors_sha256
from ds_study.link import Link
from ds_study.serving import (Arrivals, Item, Request, RequestResult, check_request, context_hash, error_line,
                              execute, model_identity, transfer_items)
from ds_study.executor import LayerKV, run_layers

SENDER, RECEIVER = 0, 1
DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int, timeout_s: float, backend: str = "gloo", addr: str = "127.0.0.1") -> None:
    import torch.distributed as dist

    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=timeout_s))


def _wire_device(backend: str) -> str:
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


def _segments(tensors: list[torch.Tensor], lo: int, hi: int):
    """Byte ranges of a chunk [lo, hi) of the tensors laid end to end, per tensor."""
    base = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        a, b = max(lo, base), min(hi, base + n)
        if a < b:
            yield t.reshape(-1).view(torch.uint8)[a - base:b - base]
        base += n


# --------------------------------------------------------------------------------------------
# Sender


class LiveCapture:
    """The sender's prefill, advanced one layer at a time as requested items need it."""

    def __init__(self, model, token_ids: list[int]):
        self.model = model
        device = next(model.parameters()).device
        ids = torch.tensor([token_ids], device=device)
        self.pos = torch.arange(len(token_ids), device=device).unsqueeze(0)
        self.hidden = model.model.embed_tokens(ids)
        self.kv, self.embeds, self.next_layer = LayerKV(), {0: self.hidden}, 0

    @torch.no_grad()
    def _advance_to(self, layer: int) -> None:
        while self.next_layer < layer:
            self.hidden = run_layers(self.model, self.hidden, self.pos, self.next_layer, self.next_layer + 1, self.kv)
            self.next_layer += 1
            self.embeds[self.next_layer] = self.hidden

    def tensors(self, item: Item) -> list[torch.Tensor]:
        if item.kind == "e":
            self._advance_to(item.layer)
            return [self.embeds[item.layer]]
        self._advance_to(item.layer + 1)
        return [self.kv.k[item.layer], self.kv.v[item.layer]]


def serve(model, identity: str, link: Link, backend: str = "gloo", log=print) -> None:
    """Answer one receiver request: capture layer by layer, send each item paced by ``link``."""
    from ds_study.pair import shape_of

    wire = _wire_device(backend)
    req = recv_json(RECEIVER, wire)
    n = model.config.num_hidden_layers
    items = [Item(int(layer), kind) for layer, kind in req["items"]]
    bad = [it for it in items if not 0 <= it.layer < n or it.kind not in ("e", "kv")]
    hello = {"sender": identity, "context": context_hash(req["prefix_ids"]), "shape": shape_of(model.config)}
    if bad:
        hello["error"] = f"items {[it.name for it in bad]} do not exist in a {n}-layer sender"
    send_json(hello, RECEIVER, wire)
    if bad:
        return
    cap = LiveCapture(model, req["prefix_ids"])
    import torch.distributed as dist

    for item in items:  # each item goes on the wire once computed and once the previous one has left
        ts = [t.detach().contiguous().to(wire) for t in cap.tensors(item)]
        send_json({"item": list(item), "chunk_bytes": link.chunk_bytes,
                   "tensors": [{"shape": list(t.shape), "dtype": str(t.dtype), "sha256": tensors_sha256({"t": t})}
                               for t in ts]}, RECEIVER, wire)
        total = sum(t.numel() * t.element_size() for t in ts)
        for lo, hi in link.chunks(total):
            for seg in _segments(ts, lo, hi):
                dist.send(seg, RECEIVER)
        log(f"SENT {item.name}", flush=True)
    try:
        recv_json(RECEIVER, wire)  # the receiver's ack: exiting earlier could cut the last bytes off
    except Exception:  # noqa: BLE001 - a receiver that fell back sends none; its timeout ends the wait
        pass


# --------------------------------------------------------------------------------------------
# Receiver


class DistLoader(threading.Thread):
    """Receive the requested items from the sender into ``arrivals``; any error fails the request."""

    def __init__(self, arrivals: Arrivals, request: str, backend: str = "gloo", device=None):
        super().__init__(daemon=True, name="ds-dist-loader")
        self.arr, self.request, self.wire, self.device = arrivals, request, _wire_device(backend), device
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
                    for seg in _segments(bufs, lo, min(total, lo + head["chunk_bytes"])):
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


def receive(model, identity: str, plan, strategy: str, prefix_ids: list[int], suffix_ids: list[int],
            max_new_tokens: int, port: int, timeout_s: float, backend: str = "gloo",
            eos_token_id=None) -> RequestResult:
    """Run the receiver side of one request against a sender at ``port``; never raises on transfer errors."""
    from ds_study.pair import shape_of

    n = model.config.num_hidden_layers
    strategy, plan = check_request(strategy, plan, n)  # a clear error before any work
    items = transfer_items(strategy, plan, n)
    req = Request("receiver", model, identity, "?", plan, prefix_ids, suffix_ids, max_new_tokens, eos_token_id)
    t0 = time.perf_counter()
    arr = Arrivals(items, t0)
    wire = _wire_device(backend)
    sender_id = None
    try:
        init(RECEIVER, port, timeout_s, backend)
        send_json({"prefix_ids": list(prefix_ids), "items": [list(it) for it in items], "receiver": identity},
                  SENDER, wire)
        hello = recv_json(SENDER, wire)
        sender_id = hello.get("sender")
        if "error" in hello:
            raise RuntimeError(hello["error"])
        if hello["shape"] != shape_of(model.config):
            raise RuntimeError(f"sender shape {hello['shape']} differs from the receiver's")
        if hello["context"] != context_hash(prefix_ids):
            raise RuntimeError("sender answered for a different context")
        # TTFT counts from here: connecting and the handshake are set-up (a server keeps its
        # connections), and how late the sender process started is not the receiver's time
        arr.t0 = time.perf_counter()
        loader = DistLoader(arr, req.name, backend, next(model.parameters()).device)
        loader.start()
    except Exception as e:  # noqa: BLE001
        arr.fail(f"could not reach the sender: {error_line(e)}")
    req.sender = sender_id or "?"
    result = execute(req, strategy, plan, arr, timeout_s)
    if result.fallback is None:
        try:
            send_json({"done": True}, SENDER, wire)
        except Exception:  # noqa: BLE001 - the ack is best effort
            pass
    return result


# --------------------------------------------------------------------------------------------
# Command line


def _load(ref: str):
    from transformers import AutoModelForCausalLM

    from ds_study.pair import local_dir, resolve, weights_sha256

    path = resolve(ref)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, model_identity({"name": ref, "weights_sha256": weights_sha256(local_dir(path))})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ds_study.transport", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="role", required=True)
    for role in ("sender", "receiver"):
        s = sub.add_parser(role)
        s.add_argument("--model", required=True, help="zoo:NAME, a checkpoint directory or a Hub id")
        s.add_argument("--port", type=int, required=True)
        s.add_argument("--timeout", type=float, default=30.0, help="seconds any wait may take")
        s.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
        s.add_argument("--threads", type=int, default=1)
        if role == "sender":
            s.add_argument("--gbps", type=float, default=None, help="link bandwidth, Gbit/s (default unpaced)")
            s.add_argument("--latency-ms", type=float, default=0.0)
            s.add_argument("--chunk-bytes", type=int, default=1 << 18)
        else:
            s.add_argument("--plan", default="full_reuse")
            s.add_argument("--strategy", default="pipelined")
            s.add_argument("--prompt", required=True, help="JSON file with prefix_ids and suffix_ids")
            s.add_argument("--max-new-tokens", type=int, default=16)
            s.add_argument("--out", required=True, help="where to write the result JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, identity = _load(args.model)
    if args.role == "sender":
        link = Link(args.gbps, args.latency_ms / 1e3, args.chunk_bytes)
        init(SENDER, args.port, args.timeout, args.backend)
        serve(model, identity, link, args.backend)
        os._exit(0)
    prompt = json.loads(open(args.prompt).read())
    res = receive(model, identity, args.plan, args.strategy, prompt["prefix_ids"], prompt["suffix_ids"],
                  args.max_new_tokens, args.port, args.timeout, args.backend)
    out = res.to_json() | {"receiver": identity, "port": args.port, "backend": args.backend}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # never block in the teardown of a group whose peer may be dead


if __name__ == "__main__":
    main()
