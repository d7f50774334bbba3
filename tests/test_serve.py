"""The serving loop (issue 16 §2): batched decoding equals one-at-a-time decoding, every strategy
serves what the offline executor computes, faults under load stay contained, and the load
generator's command line, resumption and report. No timing assertions."""

import json

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from ds_study.arch import layout
from ds_study.executor import capture, decode, run_plan, suffix_pass
from ds_study.link import Link
from ds_study.plans import parse_plan
from ds_study.serving.batch import DecodeBatch, Row
from ds_study.serving.report import RequestRecord, summarize, table
from ds_study.serving.server import Fault, Server
from ds_study.serving.store import model_identity
from ds_study.serving.workload import arrival_times, paired_requests
from tiny_pair import fixture_examples

M = 6  # tokens per request


@pytest.fixture(scope="module")
def fixture():
    pair, task, examples = fixture_examples(3)
    return pair, [ex.prompt for ex in examples]


def test_batched_decoding_gives_each_request_its_own_greedy_tokens(fixture):
    pair, prompts = fixture
    m, batch, refs, got = pair.receiver, DecodeBatch(pair.receiver), [], {}
    for i, p in enumerate(prompts):
        cc = capture(m, p.prefix_ids, with_embeds=False)
        refs.append(decode(m, list(zip(cc.keys, cc.values)), p.suffix_ids, M).token_ids)
        cache = DynamicCache(ddp_cache_data=list(zip(cc.keys, cc.values)), config=m.config)
        first = int(layout(m).head(suffix_pass(m, torch.tensor([p.suffix_ids]), cache)[0][-1:])[0].argmax())
        got[i] = [first]
        batch.join(Row(i, first, len(p.prefix_ids) + len(p.suffix_ids), M - 1),
                   [(layer.keys, layer.values) for layer in cache.layers])
        if i == 1:  # a step between joins: rows of different lengths and ages share the batch
            for row, tok, _ in batch.step():
                got[row.key].append(tok)
    while len(batch):
        for row, tok, _ in batch.step():
            got[row.key].append(tok)
    assert [got[i] for i in range(len(prompts))] == refs


def offline(pair, p, plan: str) -> list[int]:
    sc = capture(pair.sender, p.prefix_ids)
    return run_plan(pair.receiver, pair.sender, parse_plan(plan, pair.n_layers), p.prefix_ids, p.suffix_ids, M,
                    sender_cache=sc).token_ids


def serve(pair, prompts, strategy, n=3, replicas=1, gbps=None, faults=(), plan="2-3", loader="auto"):
    reqs = paired_requests(prompts, rate=50, n_contexts=n, delay_s=0.01, max_new_tokens=M, replicas=replicas)
    srv = Server(pair.receiver, pair.sender, model_identity(pair.receiver_id), model_identity(pair.sender_id),
                 strategy, plan, Link(gbps=gbps), loader=loader, replicas=replicas, timeout_s=20)
    return {r.name: r for r in srv.run(reqs, list(faults))}


@pytest.mark.parametrize("strategy,plan", [("full_prefill", "full_prefill"), ("full_reuse", "full_reuse"),
                                           ("droidspeak", "2-3")])
def test_every_request_is_served_what_the_offline_executor_computes(fixture, strategy, plan):
    pair, prompts = fixture
    recs = serve(pair, prompts, strategy)
    assert len(recs) == 6 and all(len(r.token_ids) == M for r in recs.values())
    for i, p in enumerate(prompts):
        assert recs[f"r{i}"].token_ids == offline(pair, p, plan), f"r{i}"
        assert recs[f"r{i}"].fallback is None
        sender_alone = capture(pair.sender, p.prefix_ids, with_embeds=False)
        assert recs[f"s{i}"].token_ids == decode(pair.sender, list(zip(sender_alone.keys, sender_alone.values)),
                                                 p.suffix_ids, M).token_ids


def test_cacheblend_serves_the_offline_cacheblend(fixture):
    pair, prompts = fixture
    recs = serve(pair, prompts, "cacheblend")
    for i, p in enumerate(prompts):
        assert recs[f"r{i}"].token_ids == offline(pair, p, "cacheblend@0.15")
        assert recs[f"r{i}"].bytes_loaded > 0


def test_a_sender_dying_mid_stream_sends_only_its_own_requests_to_full_prefill(fixture):
    pair, prompts = fixture
    # a slow link keeps r1's transfer in flight when replica 1 dies 100 ms into it
    recs = serve(pair, prompts, "droidspeak", n=4, replicas=2, gbps=0.02,
                 faults=[Fault("kill_replica", replica=1, at_s=0.1, during="r1")], loader="thread")
    assert len(recs) == 8
    for i in range(4):
        r, p = recs[f"r{i}"], prompts[i % len(prompts)]
        if i % 2:  # replica 1's contexts: r1 fails mid-transfer, r3 finds its cache gone
            assert r.fallback == "full_prefill" and r.served_as == "full_prefill"
            assert r.token_ids == offline(pair, p, "full_prefill")
        else:
            assert r.fallback is None and r.token_ids == offline(pair, p, "2-3")
    assert recs["r1"].reason == "sender replica 1 died"  # failed in flight (before it began: a store miss)
    assert "no cross entry" in recs["r3"].reason


def test_a_corrupt_entry_is_recomputed_under_load_never_served(fixture):
    pair, prompts = fixture
    recs = serve(pair, prompts, "droidspeak", faults=[Fault("corrupt", corrupt_context=1)])
    r = recs["r1"]
    assert r.repaired_plan is not None and r.rejected and r.fallback is None
    assert r.token_ids == offline(pair, prompts[1], r.repaired_plan.split(":", 1)[1])
    assert all(recs[f"r{i}"].repaired_plan is None for i in (0, 2))


def test_arrivals_are_seeded_and_poisson_at_the_rate():
    a = np.diff(arrival_times(2.0, 4000, seed=3))
    assert arrival_times(2.0, 50, seed=3) == arrival_times(2.0, 50, seed=3)
    assert abs(a.mean() - 0.5) < 0.03 and abs(a.std() / a.mean() - 1) < 0.08  # exponential: CV 1
    bursty = np.diff(arrival_times(2.0, 4000, burstiness=0.25, seed=3))
    assert bursty.std() / bursty.mean() > 1.6  # gamma shape 0.25: CV 2
    with pytest.raises(ValueError, match="rate > 0"):
        arrival_times(0, 5)


def test_the_report_follows_its_definitions():
    recs = [RequestRecord("r0", "receiver", 0, 0, "x", "x", "p", arrival=0.0, token_times=[1.0, 1.5, 2.0]),
            RequestRecord("r1", "receiver", 1, 0, "x", "x", "p", arrival=1.0, token_times=[4.0, 4.1, 5.0]),
            RequestRecord("s0", "sender", 0, 0, "x", "x", "p", arrival=0.0, token_times=[0.5])]
    s = summarize(recs, slo_ttft_s=2.0)
    assert s["makespan_s"] == 5.0
    rs = s["receiver"]
    assert rs["ttft_ms"]["mean"] == pytest.approx(2000) and rs["ttft_ms"]["median"] == pytest.approx(2000)
    assert rs["tpot_ms"]["mean"] == pytest.approx((500 + 500) / 2)
    assert rs["itl_ms"]["p99"] == pytest.approx(np.percentile([500, 500, 100, 900], 99))
    assert rs["slo_attainment"] == 0.5 and rs["goodput"] == pytest.approx(1 / 5)
    assert s["all"]["requests"] == 3 and s["sender"]["tpot_ms"]["mean"] is None
    assert "Goodput" in table(s, "x")


def test_serve_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    import subprocess
    import sys

    for bad, said in (("strategies=[fast]", "unknown serving strategies"), ("rate=0 plan=2-3", "positive"),
                      ("plan=full_reuse", "recompute groups"), ("plan=14-21", "outside layers")):
        p = subprocess.run([sys.executable, "-m", "ds_study.serve", "model_pair=tiny", *bad.split(),
                            f"results_root={tmp_path}"], capture_output=True, text=True)
        assert p.returncode == 2 and said in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) <= 2


def test_serve_runs_every_strategy_and_resumes(tmp_path):
    from ds_study import runner, serve

    over = ["model_pair=tiny", "n_contexts=2", "rate=20", "plan=2-3", "max_new_tokens=3", "limit=2", "threads=1",
            "warmup=false", f"results_root={tmp_path}"]
    result = serve.main(runner.compose("serve", over))
    assert [r["strategy"] for r in result["runs"]] == ["full_prefill", "full_reuse", "cacheblend", "droidspeak"]
    (run,) = tmp_path.iterdir()
    log = [json.loads(line) for line in (run / "requests" / "droidspeak@20.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(len(r["token_times"]) == 3 for r in log)
    first = (run / "runs" / "droidspeak@20.json").read_text()
    (run / "runs" / "cacheblend@20.json").unlink()  # as if interrupted before cacheblend finished
    again = serve.main(runner.compose("serve", over + [f"run_dir={run}"]))
    assert (run / "runs" / "droidspeak@20.json").read_text() == first  # kept, not redone
    assert [r["strategy"] for r in again["runs"]] == [r["strategy"] for r in result["runs"]]
