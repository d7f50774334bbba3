"""The pipelined engine on a GPU: a Llama-3-8B-shaped random-weight model, KV in host memory.

``scripts/bench_gpu_pipeline.py`` is the command line (its docstring says what is printed and the
goals); ``run`` takes its parsed arguments. The sender's per-layer KV and the transition E live in
pinned host memory (the "remote" store, ``capture_to_store``). The receiver recomputes the last
``--recompute`` layers (or each group of ``--plans``) from E and reuses the rest, with the engine's
real path: a loader thread issues host-to-device copies on a side CUDA stream (E first, then KV in
layer order), each arrival records a CUDA event, and the final prompt pass (per-layer CUDA graphs
unless ``--suffix-graphs off``) makes its stream wait on each layer's event just before it attends
to it. ``breakdown`` also times each compute phase alone: the recompute group, and the suffix pass
eager (transformers' mask, lower-right bias) and graphed. A paced link (e.g. 100 Gbit/s) throttles
the issue of 4 MB chunks: a chunk is copied only once the link could have delivered it.

Per context length (``bench_context``): full prefill (one pass over the prompt, and the engine's own
full prefill), (b) load-then-compute and (c) pipelined TTFT per link, the bound max(compute, load)
with compute = the same request with all items already on the GPU and load = bytes / link rate
(the measured host-to-device bandwidth for "host"), and the ratios. One JSON object per line on
stdout (``emit``), the human-readable table on stderr (``log``). Timings: warm-up then ``--reps``
measured repetitions, median; on CUDA, synchronized before each start and at the first token.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ds_study import runner
from ds_study.arch import layout
from ds_study.executor import LayerKV, recompute_group, run_layers, suffix_pass
from ds_study.link import Link
from ds_study.records import write_json
from ds_study.serving.arrivals import Arrivals
from ds_study.serving.engine import Engine
from ds_study.serving.execute import execute
from ds_study.serving.graphs import graphs_for
from ds_study.serving.rules import check_request, transfer_items
from ds_study.serving.store import KVStore, context_hash, entry_key, publish
from ds_study.serving.timeline import Request

SHAPES = {  # Llama-3-8B geometry (reference.md §2) and a tiny one for CPU tests
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=64, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(shape: str, device, dtype, max_tokens: int):
    import transformers as tf

    cfg = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=max_tokens, attn_implementation="sdpa",
                         tie_word_embeddings=False)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # create the weights in their final dtype, directly on the device
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = tf.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    return model


@torch.no_grad()
def capture_to_store(model, prefix: list[int], e_layer: int, store: KVStore, sid: str, rid: str, device) -> None:
    """The sender's prefill, one layer at a time: K/V of every layer and E at ``e_layer`` go to host memory."""
    from ds_study.caches import ContextCache

    ids = torch.tensor([prefix], device=device)
    pos = torch.arange(len(prefix), device=device).unsqueeze(0)
    hidden, n = layout(model).embed(ids), model.config.num_hidden_layers
    keys, values, embeds = [], [], [None] * n
    for i in range(n):
        if i == e_layer:
            embeds[i] = hidden.cpu()
        kv = LayerKV()
        hidden = run_layers(model, hidden, pos, i, i + 1, kv)
        keys.append(kv.k[i].cpu())
        values.append(kv.v[i].cpu())
    cache = ContextCache(keys, values, None, {}, list(prefix))
    publish(store, cache, sid, rid)
    store.put(entry_key(sid, rid, context_hash(prefix), e_layer, "e"), embeds[e_layer])


def timed(fn, reps: int, device, issued: list | None = None) -> list[float]:
    """Seconds per call from a synchronized start to the end of its device work, after a warm-up;
    ``issued`` also collects the seconds until each call returned to the host."""
    fn()  # warm-up
    out = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        if issued is not None:
            issued.append(time.perf_counter() - t)
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def h2d_bandwidth(device, nbytes: int, reps: int) -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ts = timed(lambda: dst.copy_(src, non_blocking=True), reps, device)
    return nbytes / statistics.median(ts)


def sync_points(fn, device) -> list[str]:
    """Where ``fn`` makes the host wait for the GPU (torch's sync debug mode), with the calling lines.

    A host wait in the middle of a request stops the host from issuing the next kernels while the
    GPU drains its queue; the only intended one is at the first token (its logits must exist)."""
    if device.type != "cuda":
        return []
    import traceback
    import warnings

    found: list[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/ds_study/" in f.filename or "bench_gpu" in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        found.append(f"{str(message).splitlines()[0][:80]} @ {where}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return found


def measured(fn, reps: int) -> float:
    """Median of ``reps`` calls after one warm-up call (each call times itself)."""
    return statistics.median([fn() for _ in range(reps + 1)][1:])


def gpu_ms(fn, reps: int, device) -> tuple[float, float]:
    """(median wall ms from a synchronized start to the end of the GPU work, median ms until ``fn``
    returns to the host). Where the second is close to the first, the host issues kernels no faster
    than the GPU runs them: the phase is host-bound."""
    issue: list[float] = []
    wall = timed(fn, reps, device, issue)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(issue)


@torch.no_grad()
def breakdown(model, prefix: list[int], suffix: list[int], plan: str, store: KVStore, args, device) -> dict:
    """Each compute phase alone, everything already on the device: the recompute group from E, and
    the 32-token suffix pass over all layers, with transformers' own forward (explicit boolean mask)
    and with the executor's lower-right causal path (``executor.suffix_pass``)."""
    from transformers import DynamicCache

    n, T = model.config.num_hidden_layers, len(prefix)
    a, b = (int(x) for x in plan.split("-"))
    ctx = context_hash(prefix)
    e = store.get(entry_key("sender", "receiver", ctx, a, "e"), verify=False).to(device)
    kv = [tuple(store.get(entry_key("sender", "receiver", ctx, i, k), verify=False).to(device) for k in ("k", "v"))
          for i in range(n)]
    ids = torch.tensor([suffix], device=device)

    def cache():
        return DynamicCache(ddp_cache_data=kv, config=model.config)

    rec = {"bench": "gpu_pipeline", "event": "breakdown", "tokens": T, "plan": plan, "suffix": len(suffix)}
    rec["recompute_ms"], rec["recompute_issue_ms"] = gpu_ms(
        lambda: recompute_group(model, a, b, prefix, SimpleNamespace(embeds={a: e})), args.reps, device)
    rec["suffix_hf_ms"], rec["suffix_hf_issue_ms"] = gpu_ms(
        lambda: layout(model).body(input_ids=ids, cache=cache(), use_cache=True), args.reps, device)
    rec["suffix_lower_right_ms"], rec["suffix_lower_right_issue_ms"] = gpu_ms(
        lambda: suffix_pass(model, ids, cache()), args.reps, device)
    graphs = graphs_for(model, T, len(suffix))  # the engine's per-layer graphs (captured here, reused by its runs)
    rec["graph_capture_s"] = graphs.capture_s
    rec["suffix_graphs_ms"], rec["suffix_graphs_issue_ms"] = gpu_ms(lambda: graphs.run(ids, kv.__getitem__), args.reps,
                                                                    device)
    emit(rec)
    log(f"# T={T:>6} {plan}: recompute {rec['recompute_ms']:.1f} ms (host issue {rec['recompute_issue_ms']:.1f}); "
        f"suffix pass: transformers mask {rec['suffix_hf_ms']:.1f} (issue {rec['suffix_hf_issue_ms']:.1f}), "
        f"lower-right {rec['suffix_lower_right_ms']:.1f} (issue {rec['suffix_lower_right_issue_ms']:.1f}), "
        f"per-layer graphs {rec['suffix_graphs_ms']:.1f} (issue {rec['suffix_graphs_issue_ms']:.1f}; "
        f"captured in {rec['graph_capture_s']:.2f} s)")
    return rec


def bench_context(model, prefix: list[int], suffix: list[int], plan: str, args, device, h2d) -> list[dict]:
    """Every measurement at one context length; returns one record per link."""
    n, T = model.config.num_hidden_layers, len(prefix)
    a = int(plan.split("-")[0])
    store = KVStore(pin_memory=device.type == "cuda")
    capture_to_store(model, prefix, a, store, "sender", "receiver", device)
    records = [breakdown(model, prefix, suffix, plan, store, args, device)] if args.breakdown else []

    def req():
        return Request("r", model, "receiver", "sender", plan, prefix, suffix, 1)

    def engine_run(strategy: str, link: Link):
        (res,) = Engine(store, link, timeout_s=300, device=device, verify=False,
                        suffix_graphs=args.suffix_graphs == "on", overlap_recompute=not args.no_overlap
                        ).run([req()], strategy)
        assert res.fallback is None, res.reason
        return res

    @torch.no_grad()
    def one_pass() -> int:
        h = layout(model).body(input_ids=torch.tensor([prefix + suffix], device=device)).last_hidden_state
        return int(layout(model).head(h[:, -1]).argmax())

    # The bound's compute part: the same request with every item already on the device.
    strat, pl = check_request("pipelined", plan, n)
    items = transfer_items(strat, pl, n)
    ctx = context_hash(prefix)
    on_dev = {it: tuple(store.get(entry_key("sender", "receiver", ctx, it.layer, k), verify=False).to(device)
                        for k in it.entry_kinds()) for it in items}
    nbytes = sum(t.numel() * t.element_size() for ts in on_dev.values() for t in ts)

    def compute_only() -> float:
        arr = Arrivals(items, 0.0)
        for it in items:
            arr.deliver(it, on_dev[it], 0, 0)
        sync(device)
        arr.t0 = time.perf_counter()
        return execute(req(), strat, pl, arr, 300, graphs=args.suffix_graphs == "on", overlap=not args.no_overlap).ttft

    one = statistics.median(timed(one_pass, args.reps, device))
    full = measured(lambda: engine_run("full_prefill", Link()).ttft, args.reps)
    comp = measured(compute_only, args.reps)
    ref_tok = one_pass()
    if args.sync_debug:
        for name, fn in (("compute_only", compute_only), ("pipelined_host", lambda: engine_run("pipelined", Link(None, 0.0, 1 << 40)))):
            pts = sync_points(fn, device)
            emit({"bench": "gpu_pipeline", "event": "sync_points", "tokens": T, "run": name, "points": pts})
            log(f"# host waits in {name} (T={T}): " + ("; ".join(pts) or "none"))
    on_dev.clear()
    for spec in args.links.split(","):
        if spec == "host":
            link, rate = Link(None, 0.0, 1 << 40), h2d  # unpaced: whole tensors, as fast as the copy engine
        else:
            link = Link(float(spec), 0.0, int(args.chunk_mb * (1 << 20)))
            rate = min(link.bytes_per_s, h2d) if h2d else link.bytes_per_s
        load = nbytes / rate if rate else 0.0
        pipe = measured(lambda: engine_run("pipelined", link).ttft, args.reps)  # noqa: B023 - called right here
        serial = measured(lambda: engine_run("send_reused", link).ttft, args.reps)  # noqa: B023
        tokens_c = engine_run("pipelined", link).token_ids
        base, bound = min(one, full), max(comp, load)
        rec = {"bench": "gpu_pipeline", "event": "result", "tokens": T, "plan": plan, "link": spec,
               "full_prefill_one_pass_ms": 1e3 * one, "full_prefill_engine_ms": 1e3 * full,
               "compute_only_ms": 1e3 * comp, "load_ms": 1e3 * load, "bytes_sent": nbytes,
               "bound_ms": 1e3 * bound, "pipelined_ms": 1e3 * pipe, "send_reused_ms": 1e3 * serial,
               "speedup_vs_full_prefill": base / pipe, "pipelined_over_bound": pipe / bound,
               "pipelined_equals_load_then_compute": tokens_c == engine_run("send_reused", link).token_ids,
               "first_token_equals_one_pass": tokens_c[:1] == [ref_tok], "reps": args.reps}
        emit(rec)
        records.append(rec)
        log(f"# T={T:>6} link={spec:>5}  full {1e3 * one:8.1f} / {1e3 * full:8.1f} ms  (b) {1e3 * serial:8.1f}  "
            f"(c) {1e3 * pipe:8.1f} ms  bound {1e3 * bound:8.1f} (compute {1e3 * comp:.1f}, load {1e3 * load:.1f})  "
            f"speedup {base / pipe:5.2f}x  c/bound {pipe / bound:5.3f}  "
            f"same tokens {rec['pipelined_equals_load_then_compute']}")
    return records


def run(args, command: str) -> dict:
    """Every measurement the command line asked for (``args``: device, shape, dtype, tokens, suffix,
    recompute, plans, suffix_graphs, no_overlap, breakdown, links, chunk_mb, reps, h2d_mb, threads,
    sync_debug, out), checked before the model is built; ``command`` is recorded with the results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available; run with --device cpu --shape tiny for the CPU smoke test")
    if args.suffix_graphs is None:
        args.suffix_graphs = "on" if device.type == "cuda" else "off"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        tokens = [int(t) for t in args.tokens.split(",")]
        links = [x for x in args.links.split(",") if x != "host"]
        bad_link = any(not float(x) > 0 for x in links)
    except ValueError as e:
        sys.exit(f"--tokens must be integers and --links 'host' or Gbit/s values: {e}")
    for what, ok in (("--tokens values", all(t >= 1 for t in tokens)), ("--suffix", args.suffix >= 1),
                     ("--reps", args.reps >= 1), ("--recompute", args.recompute >= 1),
                     ("--chunk-mb", args.chunk_mb > 0), ("--h2d-mb", args.h2d_mb >= 1),
                     ("--links bandwidths", not bad_link)):
        if not ok:  # checked before the model is built (minutes for the 8B shape)
            sys.exit(f"{what} must be positive")
    n = SHAPES[args.shape]["num_hidden_layers"]
    plans = args.plans.split(",") if args.plans else [f"{n - args.recompute}-{n - 1}"]
    for plan in plans:  # checked before the model is built
        a, _, b = plan.partition("-")
        if not (a.isdigit() and b.isdigit() and 0 < int(a) <= int(b) < n):
            sys.exit(f"--plans: {plan!r} is not a group a-b with 0 < a <= b < {n} (a recompute group that starts from E)")
    t_start = time.perf_counter()
    model = build_model(args.shape, device, dtype, max(tokens) + args.suffix + 8)
    versions = runner.environment(str(device))
    env = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": versions["torch"], "cuda": torch.version.cuda, "shape": args.shape, "dtype": str(dtype),
           "python": versions["python"], "command": command,
           "suffix_graphs": args.suffix_graphs, "overlap_recompute": not args.no_overlap}
    h2d = h2d_bandwidth(device, args.h2d_mb << 20, args.reps)
    env["h2d_gbytes_per_s"] = h2d / 1e9 if h2d else None
    emit({"bench": "gpu_pipeline", "event": "env", **env})
    log(f"# {env['gpu'] or 'CPU'}  {args.shape} {dtype}  recompute layers {', '.join(plans)} of {n}  "
        f"pinned H2D {env['h2d_gbytes_per_s'] or float('nan'):.1f} GB/s")
    records = []
    g = torch.Generator().manual_seed(0)
    for T in tokens:
        ids = torch.randint(10, model.config.vocab_size, (T + args.suffix,), generator=g).tolist()
        for plan in plans:
            records += bench_context(model, ids[:T], ids[T:], plan, args, device, h2d)
    out = {"environment": env, "results": records, "wall_s": time.perf_counter() - t_start}
    if args.out:
        write_json(args.out, out, quiet=True)
        log(f"# wrote {args.out} in {out['wall_s']:.0f} s")
    return out
