"""The engine: store namespaces and checksums, the paced link, strategy rules (Fig. 13), and that every
strategy computes exactly what the non-pipelined partial prefill computes. No timing assertions."""

import threading

import pytest
import torch

from ds_study.caches import CacheChecksumError, tensors_sha256
from ds_study.serving import (Arrivals, Engine, EngineError, EntryKey, Item, KVStore, Link, Request, SimJob,
                              StoreMiss, check_request, context_hash, entry_hasher, entry_key, execute, publish,
                              repair_plan, simulate, sum_ttft, transfer_items)
from ds_study.executor import capture, decode, partial_prefill
from ds_study.plans import PlanError, parse_plan
from test_executor import prompt, tiny_model

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- Fig. 13


def fig13_jobs():
    # A recomputes L4-L10 (0-based 3-9) and reuses L1-L3; B recomputes L1-L3 and reuses L4-L10.
    return [SimJob("A", 10, "3-9", arrival=0), SimJob("B", 10, "0-2", arrival=2)]


@pytest.mark.parametrize("strategy,total,per_request", [
    ("send_all", 47, {"A": 18, "B": 29}),
    ("send_reused", 30, {"A": 11, "B": 19}),
    ("pipelined", 17, {"A": 8, "B": 9}),
])
def test_fig13_unit_cost_timeline(strategy, total, per_request):
    results = simulate(fig13_jobs(), strategy)
    assert sum_ttft(results) == total
    assert {r.request: r.ttft for r in results} == per_request


def test_fig13_spans_follow_the_paper():
    a, b = simulate(fig13_jobs(), "c")
    loads_a = [(s.start, s.end, s.kind, s.layer) for s in a.spans if s.op == "load"]
    assert loads_a[0] == (0, 1, "e", 3)  # E first
    assert [s[:2] for s in loads_a[1:]] == [(1, 2), (2, 3), (3, 4)]
    assert [s.start for s in a.spans if s.op == "recompute"] == list(range(1, 8))
    loads_b = [s for s in b.spans if s.op == "load"]
    assert loads_b[0].start == 4 and loads_b[-1].end == 11  # B's KV streams during A's recompute
    assert all(s.kind == "kv" for s in loads_b)  # B recomputes from layer 0: no E
    assert [s.start for s in b.spans if s.op == "recompute"] == [8, 9, 10]


def test_transfer_items_per_strategy():
    plan = parse_plan("3-9", 10)
    assert transfer_items("a", plan, 10) == [Item(3, "e")] + [Item(i, "kv") for i in range(10)]
    assert transfer_items("b", plan, 10) == [Item(3, "e"), Item(0, "kv"), Item(1, "kv"), Item(2, "kv")]
    assert transfer_items("c", plan, 10) == transfer_items("b", plan, 10)
    assert transfer_items("full_prefill", plan, 10) == []
    assert len(transfer_items("full_reuse", parse_plan("full_reuse", 10), 10)) == 10


def test_bad_strategy_or_plan_is_refused_before_any_work():
    with pytest.raises(EngineError, match="unknown strategy 'd'"):
        check_request("d", "0-1", 4)
    with pytest.raises(PlanError, match="outside layers 0..3"):
        check_request("pipelined", "2-4", 4)
    with pytest.raises(PlanError, match="overlap"):
        check_request("pipelined", [[0, 2], [2, 3]], 4)
    with pytest.raises(PlanError, match="recompute-group"):
        check_request("pipelined", "cacheblend@0.2", 4)
    # A plan object built for a deeper model is re-checked against this one.
    with pytest.raises(PlanError, match="outside"):
        check_request("b", parse_plan("6-7", 8), 4)

    class CountingStore(KVStore):
        gets = 0

        def get(self, key, verify=True):
            CountingStore.gets += 1
            return super().get(key, verify)

    model = tiny_model("llama")
    prefix, suffix = prompt()
    good = Request("ok", model, "r", "s", "0-1", prefix, suffix)
    bad = Request("bad", model, "r", "s", "1-9", prefix, suffix)
    with pytest.raises(PlanError):
        Engine(CountingStore(), Link()).run([good, bad], "pipelined")
    with pytest.raises(EngineError):
        Engine(CountingStore(), Link()).run([good], "fastest")
    assert CountingStore.gets == 0


def test_repair_plan():
    assert repair_plan(parse_plan("4-5", 8), 8, bad_kv=[6]).groups == ((4, 6),)
    assert repair_plan(parse_plan("4-5", 8), 8, bad_kv=[2]).groups == ((0, 2), (4, 5))
    assert repair_plan(parse_plan("4-5", 8), 8, bad_e=[4]).groups == ((0, 5),)
    assert repair_plan(parse_plan("1-2,5-6", 8), 8, bad_e=[5]).groups == ((1, 6),)
    assert repair_plan(parse_plan("full_reuse", 8), 8, bad_kv=[0]).groups == ((0, 0),)


# ---------------------------------------------------------------------------- store and link


def test_store_namespaces_never_mix(tmp_path):
    store = KVStore(tmp_path)
    t = torch.arange(12.0).view(1, 1, 3, 4)
    store.put(EntryKey("sender@1", "ctx", 0, "k", receiver="recv@2"), t)
    # The cross-model entry is not an exact hit for either model...
    with pytest.raises(StoreMiss):
        store.lookup_exact("sender@1", "ctx", 0, "k")
    with pytest.raises(StoreMiss):
        store.lookup_exact("recv@2", "ctx", 0, "k")
    # ...only for the pair it was made for.
    assert torch.equal(store.lookup_cross("sender@1", "recv@2", "ctx", 0, "k"), t)
    with pytest.raises(StoreMiss):
        store.lookup_cross("sender@1", "other@3", "ctx", 0, "k")
    with pytest.raises(ValueError, match="two different models"):
        EntryKey("m", "ctx", 0, "k", receiver="m")
    assert entry_key("m", "m", "ctx", 0, "k").namespace == "exact"
    assert entry_key("s", "r", "ctx", 0, "k").namespace == "cross"
    # Persisted: a fresh store over the same directory finds it, verified.
    assert torch.equal(KVStore(tmp_path).lookup_cross("sender@1", "recv@2", "ctx", 0, "k"), t)


def test_store_rejects_corrupt_entries(tmp_path):
    store = KVStore(tmp_path)
    key = EntryKey("m", "ctx", 1, "v")
    store.put(key, torch.randn(1, 2, 5, 4))
    store.get(key, verify=False).add_(1.0)  # corrupted in memory
    with pytest.raises(CacheChecksumError, match="corrupt"):
        store.get(key)
    path = tmp_path / key.relpath()
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # corrupted on disk
    path.write_bytes(bytes(raw))
    with pytest.raises(CacheChecksumError):
        KVStore(tmp_path).get(key)


def test_link_copies_in_paced_chunks():
    link = Link(gbps=8e-3, chunk_bytes=100)  # 1 MB/s: 100 B per 0.1 ms
    assert link.seconds(1000) == pytest.approx(1e-3)
    assert list(Link(chunk_bytes=100).chunks(250)) == [(0, 100), (100, 200), (200, 250)]
    srcs = [torch.randn(37), torch.randn(3, 11)]  # chunks straddle the tensor boundary
    dsts = [torch.empty_like(s) for s in srcs]
    assert link.copy(srcs, dsts)
    assert all(torch.equal(s, d) for s, d in zip(srcs, dsts))
    with pytest.raises(ValueError):
        Link(gbps=0)
    # The checksum taken chunk by chunk while copying equals the store's checksum of the entry.
    t = torch.randn(2, 3, 50)
    h = entry_hasher(t)
    Link(chunk_bytes=64).copy([t], [torch.empty_like(t)], on_segment=lambda j, seg: h.update(seg.numpy()))
    assert h.hexdigest() == tensors_sha256({"t": t})


# ---------------------------------------------------------------------------- real execution


def setup(arch="llama", seed=1, n_prefix=40):
    receiver, sender = tiny_model(arch, 0), tiny_model(arch, 1)
    prefix, suffix = prompt(n_prefix=n_prefix, seed=seed)
    sc = capture(sender, prefix)
    store = KVStore()
    publish(store, sc, "s", "r")
    return receiver, sender, sc, store, prefix, suffix


def reference_tokens(receiver, plan, prefix, suffix, sc, n=6):
    out = decode(receiver, partial_prefill(receiver, plan, prefix, sc), suffix, n)
    return out.token_ids, out.first_logits


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
@pytest.mark.parametrize("plan", ["2-3", "1-2", "0-1", "0-0,2-2"])
def test_every_strategy_equals_partial_prefill(arch, plan):
    receiver, _, sc, store, prefix, suffix = setup(arch)
    ref_tokens, ref_logits = reference_tokens(receiver, parse_plan(plan, 4), prefix, suffix, sc)
    for strategy in ("send_all", "send_reused", "pipelined"):
        req = Request("r0", receiver, "r", "s", plan, prefix, suffix, max_new_tokens=6)
        (res,) = Engine(store, Link(gbps=0.05, chunk_bytes=1024)).run([req], strategy)
        assert res.token_ids == ref_tokens, strategy
        assert torch.allclose(res.first_logits, ref_logits, atol=1e-5, rtol=0), strategy
        assert res.fallback is None and res.rejected == []
        sent = transfer_items(strategy, parse_plan(plan, 4), 4)
        assert res.bytes_loaded == sum(sum(store.nbytes(entry_key("s", "r", context_hash(prefix), it.layer, k))
                                           for k in it.entry_kinds()) for it in sent)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_suffix_graph_steps_compute_what_the_eager_pass_computes(arch):
    """The graphed final pass (its steps run eagerly on CPU, on the same static buffers a CUDA capture
    uses) gives bitwise the tokens and logits of the engine's eager pass, for every strategy, twice
    over (the second run reuses the buffers of the first), with the final layers in the timeline."""
    receiver, _, sc, store, prefix, suffix = setup(arch)
    for strategy, plan in (("pipelined", "2-3"), ("send_reused", "1-2"), ("full_prefill", None), ("full_reuse", None)):
        req = Request("g", receiver, "r", "s", plan, prefix, suffix, max_new_tokens=6)
        (eager,) = Engine(store, Link(gbps=0.05, chunk_bytes=1024), suffix_graphs=False).run([req], strategy)
        for _ in range(2):
            (graphed,) = Engine(store, Link(gbps=0.05, chunk_bytes=1024), suffix_graphs=True).run([req], strategy)
            assert graphed.token_ids == eager.token_ids, strategy
            assert torch.equal(graphed.first_logits, eager.first_logits), strategy
            assert sorted(s.layer for s in graphed.spans if s.op == "final") == [0, 1, 2, 3]
    assert (len(prefix), len(suffix)) in engine_graphs(receiver)


def test_suffix_graph_steps_attend_with_grouped_kv_heads(monkeypatch):
    """No K/V repeat per query head in the graphed pass: SDPA gets the KV heads as they are."""
    from torch.nn.attention.bias import CausalBias

    from ds_study.serving import SuffixGraphs

    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    seen, dispatch = [], CausalBias._dispatch

    def spy(q, k, v, *a, **kw):
        seen.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
        return dispatch(q, k, v, *a, **kw)

    monkeypatch.setattr(CausalBias, "_dispatch", staticmethod(spy))
    g = SuffixGraphs(model, 40, 6, capture=False)
    kv = [(torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)) for _ in range(4)]
    g.run(torch.tensor([[5, 6, 7, 8, 9, 10]]), kv.__getitem__)
    assert seen == [(4, 2, True)] * 4


def engine_graphs(model):
    from ds_study.serving.graphs import _GRAPHS

    return _GRAPHS.get(model, {})


def test_suffix_graphs_need_an_exact_lower_right_pass():
    from ds_study.serving import SuffixGraphs

    model = tiny_model("llama")
    with pytest.raises(EngineError, match="graphed final pass"):
        SuffixGraphs(model, 40, 1, capture=False)  # one new token: transformers takes another kernel path
    with pytest.raises(EngineError, match="graphed final pass"):
        SuffixGraphs(model, 0, 4, capture=False)


def test_full_prefill_and_full_reuse_strategies():
    receiver, sender, sc, store, prefix, suffix = setup()
    own = capture(receiver, prefix)
    for strategy, plan, cache in (("full_prefill", "full_prefill", None), ("full_reuse", "full_reuse", sc)):
        ref, _ = reference_tokens(receiver, parse_plan(plan, 4), prefix, suffix, cache)
        req = Request("q", receiver, "r", "s", None, prefix, suffix, max_new_tokens=6)
        (res,) = Engine(store, Link(gbps=0.1)).run([req], strategy)
        assert res.token_ids == ref and res.plan == plan
    assert res.bytes_loaded == sum(own.nbytes(k, i) for i in range(4) for k in "kv")


def test_spans_record_every_layer_and_respect_causality():
    receiver, _, sc, store, prefix, suffix = setup(n_prefix=64)
    req = Request("A", receiver, "r", "s", "2-3", prefix, suffix, max_new_tokens=3)
    (res,) = Engine(store, Link(gbps=0.02, chunk_bytes=2048)).run([req], "pipelined")
    loads = {(s.layer, s.kind): s for s in res.spans if s.op == "load"}
    assert set(loads) == {(2, "e"), (0, "kv"), (1, "kv")}
    # E goes first: it starts on the wire first and arrives first (a load span runs from the item's
    # start on the wire to its arrival at the receiver).
    assert loads[(2, "e")].start < loads[(0, "kv")].start and loads[(2, "e")].end <= loads[(0, "kv")].end
    rec = [s for s in res.spans if s.op == "recompute"]
    final = {s.layer: s for s in res.spans if s.op == "final"}
    assert [s.layer for s in rec] == [2, 3] and sorted(final) == [0, 1, 2, 3]
    assert rec[0].start >= loads[(2, "e")].end  # the group starts from the arrived E
    for i in (0, 1):  # the final pass reads a reused layer only after it arrived
        assert final[i].end >= loads[(i, "kv")].end
    assert res.ttft >= max(s.end for s in res.spans if s.op == "final") - req.arrival
    js = res.to_json()
    assert js["spans"] and "first_logits" not in js


def test_recompute_starts_while_e_still_streams():
    """With e_chunk_tokens, an E-started group recomputes token chunks as E's rows land: it starts
    before E has fully arrived, and the result is the same as from the whole E."""
    receiver, _, sc, store, prefix, suffix = setup(n_prefix=96)
    ref, ref_logits = reference_tokens(receiver, parse_plan("2-3", 4), prefix, suffix, sc)
    req = Request("A", receiver, "r", "s", "2-3", prefix, suffix, max_new_tokens=6)
    (res,) = Engine(store, Link(gbps=0.002, chunk_bytes=1024), e_chunk_tokens=16).run([req], "pipelined")
    e_load = next(s for s in res.spans if s.op == "load" and s.kind == "e")
    rec = [s for s in res.spans if s.op == "recompute"]
    assert min(s.start for s in rec) < e_load.end  # recomputation overlapped E's own transfer
    assert len(rec) > 2  # layers 2 and 3, once per chunk
    assert res.token_ids == ref and torch.allclose(res.first_logits, ref_logits, atol=1e-5, rtol=0)
    (whole,) = Engine(store, Link(gbps=0.002, chunk_bytes=1024), e_chunk_tokens=0).run([req], "pipelined")
    rec0 = [s for s in whole.spans if s.op == "recompute"]
    assert [s.layer for s in rec0] == [2, 3] and rec0[0].start >= e_load.end - 1e-3 and whole.token_ids == ref


def test_corrupt_streamed_e_is_rejected_after_use_and_repaired():
    receiver, _, sc, store, prefix, suffix = setup(n_prefix=96)
    ref, _ = reference_tokens(receiver, parse_plan("0-3", 4), prefix, suffix, sc)
    store.get(entry_key("s", "r", context_hash(prefix), 2, "e"), verify=False).mul_(2)
    req = Request("x", receiver, "r", "s", "2-3", prefix, suffix, max_new_tokens=6)
    (res,) = Engine(store, Link(gbps=0.002, chunk_bytes=1024), e_chunk_tokens=16).run([req], "pipelined")
    assert res.rejected == ["E2"] and res.repaired_plan == "repair:0-3" and res.fallback is None
    assert res.token_ids == ref  # nothing computed from the corrupt E was kept


def test_two_requests_share_the_link_in_fifo_order():
    receiver, sender, sc, store, prefix, suffix = setup(n_prefix=64)
    other = tiny_model("llama", 2)
    publish(store, sc, "s", "r2")
    reqs = [Request("A", receiver, "r", "s", "1-3", prefix, suffix),
            Request("B", other, "r2", "s", "0-0", prefix, suffix, arrival=0.005)]
    for strategy in ("a", "b", "c"):
        res = Engine(store, Link(gbps=0.05, chunk_bytes=4096)).run(reqs, strategy)
        assert [r.request for r in res] == ["A", "B"]
        a_loads = [s for s in res[0].spans if s.op == "load"]
        b_loads = [s for s in res[1].spans if s.op == "load"]
        assert max(s.start for s in a_loads) < min(s.start for s in b_loads)  # one serial link, FIFO
        if strategy != "c":  # (a), (b): B's loads wait for A's prefill
            a_first = res[0].ttft + res[0].arrival
            assert min(s.start for s in b_loads) >= a_first - 1e-3


def test_corrupt_entry_is_rejected_and_recomputed():
    receiver, _, sc, store, prefix, suffix = setup()
    ctx = context_hash(prefix)
    ref, _ = reference_tokens(receiver, parse_plan("0-1,3-3", 4), prefix, suffix, sc)
    for strategy in ("send_reused", "pipelined"):
        publish(store, sc, "s", "r")  # a clean copy, then corrupt reused layer 1's K in the store
        store.get(entry_key("s", "r", ctx, 1, "k"), verify=False).mul_(2)
        req = Request("x", receiver, "r", "s", "3-3", prefix, suffix, max_new_tokens=6)
        (res,) = Engine(store, Link()).run([req], strategy)
        assert res.rejected == ["KV1"] and res.repaired_plan == "repair:0-1,3-3"
        assert res.token_ids == ref and res.fallback is None


def test_missing_entries_fall_back_to_full_prefill():
    receiver, _, sc, store, prefix, suffix = setup()
    ref, _ = reference_tokens(receiver, parse_plan("full_prefill", 4), prefix, suffix, None)
    req = Request("x", receiver, "r", "someone-else", "2-3", prefix, suffix, max_new_tokens=6)
    (res,) = Engine(store, Link()).run([req], "pipelined")
    assert res.fallback == "full_prefill" and "StoreMiss" in res.reason
    assert res.token_ids == ref


def test_stalled_transfer_times_out_and_falls_back():
    receiver, _, sc, store, prefix, suffix = setup()
    ref, _ = reference_tokens(receiver, parse_plan("full_prefill", 4), prefix, suffix, None)
    strategy, plan = check_request("pipelined", "2-3", 4)
    arr = Arrivals(transfer_items(strategy, plan, 4), __import__("time").perf_counter())
    # Deliver E only; the KV never comes (a sender that hangs).
    arr.deliver(Item(2, "e"), (sc.embeds[2],), 0.0, 0.0)
    req = Request("x", receiver, "r", "s", plan, prefix, suffix, max_new_tokens=6)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("r", execute(req, strategy, plan, arr, timeout_s=0.2)))
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    res = done["r"]
    assert res.fallback == "full_prefill" and "timed out" in res.reason and res.token_ids == ref
    assert any(s.op == "fallback" for s in res.spans)


# ---------------------------------------------------------------------------- GPU benchmark, CPU smoke test


def test_gpu_benchmark_script_runs_on_cpu_with_a_tiny_shape(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "scripts/bench_gpu_pipeline.py", "--device", "cpu", "--shape", "tiny", "--tokens", "64",
           "--links", "host,0.05", "--reps", "1", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["event"] == "env" and [r["link"] for r in lines[1:]] == ["host", "0.05"]
    for r in lines[1:]:
        assert r["plan"] == "4-7" and r["pipelined_equals_load_then_compute"]
        assert r["bound_ms"] == max(r["compute_only_ms"], r["load_ms"]) and r["pipelined_ms"] > 0
    assert json.loads(out.read_text())["results"] == lines[1:]


def test_gpu_benchmark_breakdown_and_graph_steps_run_on_cpu(tmp_path):
    """--plans, --breakdown and the graphed final pass (its eager steps on CPU) through the script."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "gpu.json"
    cmd = [sys.executable, "scripts/bench_gpu_pipeline.py", "--device", "cpu", "--shape", "tiny", "--tokens", "64",
           "--links", "host", "--reps", "1", "--threads", "1", "--plans", "6-7,2-3", "--breakdown",
           "--suffix-graphs", "on", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["suffix_graphs"] == "on"
    assert [(r["event"], r["plan"]) for r in lines[1:]] == [("breakdown", "6-7"), ("result", "6-7"),
                                                           ("breakdown", "2-3"), ("result", "2-3")]
    for r in lines[1:]:
        if r["event"] == "breakdown":
            assert min(r["recompute_ms"], r["suffix_hf_ms"], r["suffix_lower_right_ms"], r["suffix_graphs_ms"]) > 0
        else:
            assert r["pipelined_equals_load_then_compute"] and r["first_token_equals_one_pass"]
    bad = subprocess.run([sys.executable, "scripts/bench_gpu_pipeline.py", "--device", "cpu", "--shape", "tiny",
                          "--plans", "0-3"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "not a group a-b with 0 < a" in bad.stderr



@pytest.mark.parametrize("args, message", [
    (["quality", "--reps", "0"], "--reps must be >= 1"),
    (["bandwidth", "--sweep", "0,1"], "--sweep must be comma-separated bandwidths > 0"),
    (["quality", "--plans", "2-3;6-9"], "plan '6-9': recompute group [6, 9] is outside layers 0..7"),
    (["spans", "--plan", "3-2"], "starts after it ends"),
])
def test_cpu_benchmark_refuses_bad_arguments_before_loading(args, message):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/bench_ttft.py", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Loading weights" not in proc.stderr


# ---------------------------------------------------------------------------- failures inside the engine


def test_sliding_window_model_with_a_context_longer_than_its_window():
    """The final pass's cache holds a sliding layer's last window - 1 context tokens at the context's
    positions (as transformers' own layer would), so every strategy computes what partial prefill and
    transformers' forward compute. Streaming E rows does not support sliding windows: the default engine
    (e_chunk_tokens=64) waits for the whole E instead of failing mid-run."""
    import transformers as tf

    from ds_study.executor import streams_e_rows

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = tf.MistralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
                               sliding_window=16, attn_implementation="sdpa")  # shorter than the context
        models.append(tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval())
    receiver, sender = models
    assert not streams_e_rows(receiver)
    prefix, suffix = prompt(n_prefix=40)
    sc = capture(sender, prefix)
    store = KVStore()
    publish(store, sc, "s", "r")
    with torch.no_grad():
        hf_next = int(receiver(torch.tensor([prefix + suffix])).logits[0, -1].argmax())
    for plan, strategies in (("full_prefill", ["full_prefill"]), ("full_reuse", ["full_reuse"]),
                             ("2-3", ["send_all", "send_reused", "pipelined"])):
        ref, _ = reference_tokens(receiver, parse_plan(plan, 4), prefix, suffix, sc, n=3)
        if plan == "full_prefill":
            assert ref[0] == hf_next
        for strategy in strategies:
            req = Request("A", receiver, "r", "s", plan, prefix, suffix, max_new_tokens=3)
            (res,) = Engine(store, Link(gbps=0.05, chunk_bytes=1024), e_chunk_tokens=64).run([req], strategy)
            assert res.fallback is None and res.token_ids == ref, (plan, strategy)
    assert [s.layer for s in res.spans if s.op == "recompute"] == [2, 3]  # one step, not chunks


def test_a_loader_error_fails_every_request_at_once_with_its_cause(monkeypatch):
    receiver, _, _, store, prefix, suffix = setup()

    def broken(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Link, "copy", broken)  # the loader thread's copy (the worker process has its own)
    reqs = [Request(n, receiver, "r", "s", "2-3", prefix, suffix, arrival=0.01 * i) for i, n in enumerate("AB")]
    for strategy in ("pipelined", "send_reused"):
        results = Engine(store, Link(), timeout_s=30, loader="thread").run(reqs, strategy)
        assert [r.fallback for r in results] == ["full_prefill"] * 2
        assert all("CUDA out of memory (simulated)" in r.reason for r in results)
        assert all(r.ttft < 10 for r in results)  # not the 30 s timeout


@pytest.mark.parametrize("loader", ["thread", "process"])
def test_a_request_that_raises_leaves_no_loader_behind(loader):
    from ds_study.serving.loaders import process as process_loader

    receiver, _, sc, store, prefix, suffix = setup()
    reqs = [Request("A", receiver, "r", "s", "2-3", prefix, [5, 10 ** 6]),  # token outside the vocabulary
            Request("B", receiver, "r", "s", "2-3", prefix, suffix)]
    with pytest.raises(IndexError):
        Engine(store, Link(), timeout_s=30, loader=loader).run(reqs, "send_reused")  # B waits for A's prefill
    assert not [t for t in threading.enumerate() if t.name == "ds-store-loader" and t.is_alive()]
    assert all(w in process_loader._IDLE and w.alive() for w in process_loader._ALL)  # none stuck in a run
    ref, _ = reference_tokens(receiver, parse_plan("2-3", 4), prefix, suffix, sc, n=1)
    (res,) = Engine(store, Link(), timeout_s=30, loader=loader).run(reqs[1:], "send_reused")
    assert res.fallback is None and res.token_ids == ref and res.loader == loader


def _workers_in_use():
    from ds_study.serving.loaders import process as process_loader

    return [w for w in process_loader._ALL if w not in process_loader._IDLE and w.alive()]


@pytest.mark.parametrize("strategy,plan", [("send_all", "2-3"), ("send_reused", "2-3"), ("pipelined", "2-3"),
                                           ("pipelined", "0-1"), ("full_reuse", "full_reuse")])
def test_thread_and_process_loaders_move_the_same_items(strategy, plan):
    """The link worker process and the loader thread are two ways to move the same bytes: same
    tokens, same items loaded in the same order, same bytes, and E streamed in both."""
    receiver, _, sc, store, prefix, suffix = setup(n_prefix=96)
    ref, _ = reference_tokens(receiver, parse_plan(plan, 4), prefix, suffix, sc)
    req = Request("A", receiver, "r", "s", plan, prefix, suffix, max_new_tokens=6)
    out = {}
    for loader in ("thread", "process"):
        # slow enough for E to stream in steps even when a busy machine slows the compute side
        gbps = 0.0005 if strategy == "pipelined" and plan == "2-3" else 0.05
        (res,) = Engine(store, Link(gbps=gbps, chunk_bytes=1024), e_chunk_tokens=16, loader=loader).run([req], strategy)
        assert res.fallback is None and res.token_ids == ref and res.loader == loader
        loads = sorted((s for s in res.spans if s.op == "load"), key=lambda s: s.start)
        out[loader] = ([(s.layer, s.kind) for s in loads], res.bytes_loaded,
                       len([s for s in res.spans if s.op == "recompute"]))
    assert out["thread"][:2] == out["process"][:2]
    if strategy == "pipelined" and plan == "2-3":  # both recompute the E-started group in token chunks
        assert out["thread"][2] > 2 and out["process"][2] > 2


def test_unknown_loader_is_refused():
    receiver, _, _, store, prefix, suffix = setup()
    with pytest.raises(EngineError, match="unknown loader 'gpu'; use one of auto, process, thread"):
        Engine(store, Link(), loader="gpu")


def test_a_stalled_link_worker_times_out_and_is_replaced():
    """A worker that stops (SIGSTOP) mid-transfer: the request times out and falls back, the run ends
    within about its timeout, and the stuck worker is killed rather than reused."""
    import os
    import signal
    import time

    from ds_study.serving.loaders import process as process_loader

    receiver, _, sc, store, prefix, suffix = setup(n_prefix=96)
    req = Request("A", receiver, "r", "s", "2-3", prefix, suffix, max_new_tokens=3)
    stopped = []

    def stop_worker():
        time.sleep(0.2)
        for w in _workers_in_use():
            os.kill(w.proc.pid, signal.SIGSTOP)
            stopped.append(w)

    stopper = threading.Thread(target=stop_worker)
    stopper.start()
    t = time.perf_counter()
    (res,) = Engine(store, Link(gbps=0.0005, chunk_bytes=1024), timeout_s=1.0, loader="process").run([req],
                                                                                                    "pipelined")
    stopper.join()
    assert stopped and res.fallback == "full_prefill" and "timed out" in res.reason
    assert time.perf_counter() - t < 10
    assert all(w.proc.poll() is not None for w in stopped) and not set(stopped) & set(process_loader._ALL)
    ref, _ = reference_tokens(receiver, parse_plan("2-3", 4), prefix, suffix, sc, n=3)
    (again,) = Engine(store, Link(gbps=1.0), timeout_s=60, loader="process").run([req], "pipelined")
    assert again.fallback is None and again.token_ids == ref


def test_a_dead_link_worker_fails_the_run_at_once_and_is_replaced():
    """The worker process killed mid-transfer: the request falls back to full prefill with the reason,
    well before its timeout, and the next run gets a new worker."""
    import os
    import signal
    import time

    receiver, _, sc, store, prefix, suffix = setup(n_prefix=96)
    req = Request("A", receiver, "r", "s", "2-3", prefix, suffix, max_new_tokens=3)
    slow = Link(gbps=0.0005, chunk_bytes=1024)  # about 4 s for what plan 2-3 sends

    def kill_workers():
        time.sleep(0.3)
        for w in _workers_in_use():
            os.kill(w.proc.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_workers)
    killer.start()
    (res,) = Engine(store, slow, timeout_s=60, loader="process").run([req], "pipelined")
    killer.join()
    assert res.fallback == "full_prefill" and "link worker process died" in res.reason
    assert res.ttft < 30  # not the 60 s timeout
    ref, _ = reference_tokens(receiver, parse_plan("full_prefill", 4), prefix, suffix, None, n=3)
    assert res.token_ids == ref
    ref, _ = reference_tokens(receiver, parse_plan("2-3", 4), prefix, suffix, sc, n=3)
    (again,) = Engine(store, Link(gbps=1.0), timeout_s=60, loader="process").run([req], "pipelined")
    assert again.fallback is None and again.token_ids == ref and again.loader == "process"


def test_a_cancelled_transfer_frees_the_link():
    import time

    link = Link(gbps=0.001, chunk_bytes=1000)  # 8 ms per chunk, 80 ms for the whole transfer
    src, dst = torch.zeros(2500), torch.empty(2500)
    calls = []
    cancelled = lambda: len(calls) > 0 or calls.append(1) is not None  # noqa: E731 - cancel before chunk 2
    assert link.copy([src], [dst], cancelled=cancelled) is None
    assert link.busy_until <= time.perf_counter()  # the unsent 70 ms are not booked for the next transfer


def test_the_whole_wait_for_a_streamed_e_is_on_the_timeline():
    """An E-started group whose E arrives in one go (rows asked for > rows there are) waits for all of it:
    that wait appears as one span as long as E's transfer."""
    receiver, _, _, store, prefix, suffix = setup(n_prefix=64)
    req = Request("A", receiver, "r", "s", "2-3", prefix, suffix)
    (res,) = Engine(store, Link(gbps=0.002, chunk_bytes=1024), e_chunk_tokens=1000).run([req], "pipelined")
    e_load = next(s for s in res.spans if s.op == "load" and s.kind == "e")
    # (a thread preempted by the OS inside a later, instant wait for the same E leaves a sub-ms span)
    e_wait = [s for s in res.spans if s.op == "wait" and s.kind == "e" and s.end - s.start > 1e-3]
    assert len(e_wait) == 1 and e_wait[0].end >= e_load.end - 1e-3
    assert e_wait[0].end - e_wait[0].start > 0.5 * (e_load.end - e_load.start)


def test_a_corrupt_memory_copy_is_reread_from_disk_and_its_bytes_counted(tmp_path):
    receiver, sender, sc, _, prefix, suffix = setup()
    store = KVStore(tmp_path)
    publish(store, sc, "s", "r")
    store.get(entry_key("s", "r", context_hash(prefix), 1, "k"), verify=False).mul_(2)  # RAM only; disk is clean
    req = Request("x", receiver, "r", "s", "3-3", prefix, suffix)
    (first,) = Engine(store, Link()).run([req], "pipelined")
    (second,) = Engine(store, Link()).run([req], "pipelined")
    assert first.rejected == ["KV1"] and second.rejected == [] and second.repaired_plan is None
    assert first.bytes_loaded == second.bytes_loaded  # the rejected KV1 crossed the link too


def test_failure_reasons_survive_exceptions_without_a_message():
    from ds_study.serving import error_line

    assert error_line(ConnectionResetError()) == "ConnectionResetError"
    assert error_line(ValueError("first\nsecond")) == "ValueError: first"


def test_a_link_worker_sees_what_arrived_with_its_run_command():
    """The "prefilled" of a non-streaming run's first request, read in the same pipe read as the "run"
    itself, releases the second request's transfer (it once sat unread until the run's timeout)."""
    import os
    import time

    from ds_study.serving.loaders import process as process_loader
    from ds_study.link_worker import FRAME

    def frame(*msg):
        import pickle

        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        return FRAME.pack(len(data)) + data

    w = process_loader.acquire()
    try:
        w.ensure_arena(4096, timeout_s=10)
        w.arena[:1024].copy_(torch.arange(1024) % 251)

        def job(k):
            entry = {"src": 512 * k, "dst": 2048 + 512 * k, "nbytes": 512, "sha256": "", "dtype": "torch.uint8",
                     "shape": (512,)}
            return {"arrival": 0.0, "streaming": False,
                    "items": [{"name": f"kv{k}", "error": None, "stream_rows": False, "entries": [entry]}]}

        t0 = time.perf_counter()
        spec = {"gbps": 100.0, "latency_s": 0.0, "chunk_bytes": 256, "verify": False, "jobs": [job(0), job(1)],
                "t0": t0, "busy_until": 0.0}
        os.write(w.cmd_fd, frame("run", spec) + frame("prefilled", 0, t0))  # one write: one read
        got = []
        while not any(m[0] == "done" for m in got) and time.perf_counter() - t0 < 5:
            got += w.reports.wait(5 - (time.perf_counter() - t0))
        assert [m[0] for m in got] == ["deliver", "deliver", "done"], got
        assert torch.equal(w.arena[2048:3072], w.arena[:1024])
    finally:
        process_loader.release(w)
