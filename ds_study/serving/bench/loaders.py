"""How much the engine's loader slows the computation beside it: why the CPU loader is a process.

``contention`` recomputes one group (layers 2-3 of the receiver over one pycode context, from the
sender's E, every input in memory) while one of the engine's loaders (``serving.loaders``: the
store loader thread or the link worker process, driven as the engine drives them: staged, started,
finished) moves a queue of pipelined requests' items (E, then the reused layers' KV, checksummed
in flight) in 64 KiB chunks, at 0.2 Gbit/s (a chunk every 2.6 ms, the CPU benchmarks' link) and at
0.8 Gbit/s (every 0.65 ms). Settings are interleaved round by round, and the queue is long enough
to keep the link busy for every recomputation of a round (checked: ``link_busy_throughout``). The
result: each setting's median recompute time and its ratio to the same recomputation with no
loader (results/engine/loader_contention.json, ``scripts/bench_loader_contention.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ds_study.data import TASKS, load_records
from ds_study.executor import capture, recompute_group
from ds_study.link import Link
from ds_study.pair import load_pair
from ds_study.records import bench_environment, write_json
from ds_study.runner import REPO_ROOT, prepare
from ds_study.serving.loaders import Job, Run, create_loader
from ds_study.serving.loaders.base import item_sources
from ds_study.serving.rules import check_request, transfer_items
from ds_study.serving.store import KVStore, context_hash, model_identity, publish
from ds_study.serving.timeline import Request

RESULT = REPO_ROOT / "results" / "engine" / "loader_contention.json"


def contention(receiver: str = "zoo:code", sender: str = "zoo:qa", rounds: int = 5, reps: int = 6,
               out_path: Path = RESULT) -> dict:
    """``reps`` recomputations per setting and round, ``rounds`` rounds; writes and returns the result."""
    torch.set_num_threads(1)
    pair = load_pair(receiver, sender)
    (example,) = prepare(pair, TASKS["pycode"], load_records("pycode", "test", limit=1),
                         pair.receiver.config.max_position_embeddings)
    prompt = example.prompt
    ids = prompt.prefix_ids
    sc = capture(pair.sender, ids)
    sender_e = SimpleNamespace(embeds={2: sc.embeds[2]})  # what the recomputation reads
    rid, sid = model_identity(pair.receiver_id), model_identity(pair.sender_id)
    store = KVStore()
    publish(store, sc, sid, rid)
    n = pair.receiver.config.num_hidden_layers
    strategy, plan = check_request("pipelined", "2-3", n)
    items = transfer_items(strategy, plan, n)
    probe = Request("probe", pair.receiver, rid, sid, plan, ids, prompt.suffix_ids)
    per_request = sum(t.numel() * t.element_size() for it in items
                      for t in item_sources(store, probe, it, context_hash(ids))[1])
    env = bench_environment()
    sys.setswitchinterval(2e-4)  # as Engine.run sets it

    def recompute() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            recompute_group(pair.receiver, 2, 3, ids, sender_e)
        return time.perf_counter() - t

    def measure(loader: str | None, gbps: float) -> tuple[list[float], bool]:
        """``reps`` recomputations while ``loader`` moves a queue of requests' items."""
        if loader is None:
            return [recompute() for _ in range(reps)], True
        link = Link(gbps, 0.0, 1 << 16)
        n_req = int(2.0 * reps * 0.040 / link.seconds(per_request)) + 2  # > reps x ~40 ms of link time
        reqs = [Request(f"q{i}", pair.receiver, rid, sid, plan, ids, prompt.suffix_ids) for i in range(n_req)]
        moving = create_loader(loader)  # as the engine drives it: staged, started, finished
        arrs = moving.stage(Run([Job(r, strategy, plan, items) for r in reqs], store, link))
        t0 = time.perf_counter()
        moving.start(t0)
        got = [recompute() for _ in range(reps)]
        busy = time.perf_counter() < t0 + n_req * link.seconds(per_request)
        for a in arrs:
            a.cancelled.set()
            a.prefilled.set()
        moving.finish([])
        return got, busy

    settings = [(None, 0.2), ("thread", 0.2), ("process", 0.2), ("thread", 0.8), ("process", 0.8)]
    times: dict[str, list[float]] = {}
    busy_all: dict[str, bool] = {}
    for _ in range(3):
        recompute()  # warm-up
    for _ in range(rounds):
        for loader, gbps in settings:
            key = "none" if loader is None else f"{loader} loader, {gbps:g} Gbit/s"
            got, busy = measure(loader, gbps)
            times.setdefault(key, []).extend(got)
            busy_all[key] = busy_all.get(key, True) and busy
    base = statistics.median(times["none"])
    rows = [{"setting": k, "median_ms": 1e3 * statistics.median(v), "ratio_to_none": statistics.median(v) / base,
             "link_busy_throughout": busy_all[k], "n": len(v), "ms": [1e3 * x for x in v]} for k, v in times.items()]
    env["loadavg_end"] = os.getloadavg()
    out = {"what": "recompute time of layers 2-3 while the engine's loader moves pipelined requests' items",
           "pair": f"{receiver} <- {sender}", "n_prefix": len(ids), "chunk_bytes": 1 << 16,
           "bytes_per_request": per_request, "environment": env, "results": rows}
    write_json(out_path, out)
    return out
