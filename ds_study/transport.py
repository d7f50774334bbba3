"""A real transport: the sender and the receiver as two processes, torch.distributed point-to-point.

The sender (rank 0) prefills the context one layer at a time and sends each requested item (a
transition E, a layer's K and V) as soon as it exists, paced by a Link, with a header that carries
shapes and checksums. The receiver (rank 1) serves its request through the engine
(``ds_study.serving.Engine``) with the torch.distributed loader (``serving.loaders.distributed``,
which also holds the wire protocol): it asks for the items its strategy needs and receives them on
a thread while the engine computes. If the sender dies or stalls, the receive fails or times out
and the receiver falls back to its own full prefill; a received item whose checksum does not match
is rejected and recomputed. The receiver never waits longer than its timeout for anything, and
exits without tearing down a dead group.

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

import torch

from ds_study.caches import tensors_sha256
from ds_study.arch import layout
from ds_study.executor import LayerKV, run_layers
from ds_study.link import Link
from ds_study.serving import Engine, Item, Request, RequestResult, context_hash, model_identity
from ds_study.serving.loaders.distributed import RECEIVER, SENDER, init, recv_json, segments, send_json, wire_device


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Sender


class LiveCapture:
    """The sender's prefill, advanced one layer at a time as requested items need it."""

    def __init__(self, model, token_ids: list[int]):
        self.model = model
        device = next(model.parameters()).device
        ids = torch.tensor([token_ids], device=device)
        self.pos = torch.arange(len(token_ids), device=device).unsqueeze(0)
        self.hidden = layout(model).embed(ids)
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

    wire = wire_device(backend)
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
            for seg in segments(ts, lo, hi):
                dist.send(seg, RECEIVER)
        log(f"SENT {item.name}", flush=True)
    try:
        recv_json(RECEIVER, wire)  # the receiver's ack: exiting earlier could cut the last bytes off
    except Exception:  # noqa: BLE001 - a receiver that fell back sends none; its timeout ends the wait
        pass


# --------------------------------------------------------------------------------------------
# Receiver


def receive(model, identity: str, plan, strategy: str, prefix_ids: list[int], suffix_ids: list[int],
            max_new_tokens: int, port: int, timeout_s: float, backend: str = "gloo",
            eos_token_id=None) -> RequestResult:
    """Run the receiver side of one request against a sender at ``port``; never raises on transfer errors.

    The request goes through the engine like any other, with the torch.distributed loader: it is
    checked before any work, TTFT counts from the end of the handshake (connecting is set-up: a
    server keeps its connections, and how late the sender process started is not the receiver's
    time), and a failed transfer falls back to full prefill. The loader delivers whole items (no
    partial progress), so recompute groups wait for their whole E (``e_chunk_tokens=0``)."""
    req = Request("receiver", model, identity, "?", plan, prefix_ids, suffix_ids, max_new_tokens, eos_token_id)
    engine = Engine(None, None, timeout_s=timeout_s, e_chunk_tokens=0, loader="distributed",
                    loader_options={"port": port, "backend": backend})
    (result,) = engine.run([req], strategy)
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
