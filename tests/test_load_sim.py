"""The serving simulator (issue 16 §3): the server's scheduling rules in virtual time, calibration
from iteration logs, the H200 cost table, and the adaptation policies. Deterministic, no timing."""

import numpy as np
import pytest

from ds_study.serving.adapt import BandwidthAwarePolicy, FixedPolicy, LoadPolicy, Point
from ds_study.serving.load_sim import Costs, Unit, calibrate, simulate_serving
from ds_study.serving.workload import ServeRequest


def req(name, role, at, tokens=100, new=1, ctx=0):
    return ServeRequest(name, role, ctx, list(range(tokens)), [], at, new)


def flat(prefill_s=1.0, decode=(0.1, 0.0, 0.0)):
    pts = ([0, 10_000], [prefill_s, prefill_s])
    return Costs({k: pts for k in ("sender", "full_prefill", "full_reuse", "droidspeak")}, decode, 4,
                 layer=([0, 10_000], [0.2, 0.2]), suffix=([0, 10_000], [0.1, 0.1]), kv_bytes_per_token_layer=1000)


def by_name(recs):
    return {r.name: r for r in recs}


def test_one_unit_serves_prefills_first_come_first_served():
    recs = by_name(simulate_serving([req("a", "receiver", 0), req("b", "receiver", 0), req("c", "receiver", 0.5)],
                                    "full_prefill", flat()))
    assert [recs[n].ttft for n in "abc"] == [1.0, 2.0, 2.5]


def test_decoding_interleaves_with_prefills_one_step_per_iteration():
    recs = by_name(simulate_serving([req("a", "receiver", 0, new=3), req("b", "sender", 0, new=2)], "full_prefill",
                                    flat()))
    # iteration 1: a's prefill (0-1), a's decode step (1-1.1); iteration 2: b's prefill (1.1-2.1), then one
    # step of every batch, the sender's first (2.1-2.2), as Server.run orders them
    assert recs["a"].token_times == pytest.approx([1.0, 1.1, 2.3])
    assert recs["b"].token_times == pytest.approx([2.1, 2.2])


def test_separate_units_serve_their_role_round_robin():
    reqs = [req(f"r{i}", "receiver", 0, ctx=i) for i in range(4)] + [req("s0", "sender", 0)]
    recs = by_name(simulate_serving(reqs, "full_prefill", flat(), units=2, sender_units=1))
    assert sorted(recs[f"r{i}"].ttft for i in range(4)) == [1.0, 1.0, 2.0, 2.0]
    assert recs["s0"].ttft == 1.0  # its own unit


def test_calibration_recovers_the_costs_it_was_given():
    its = []
    for t in (200, 400, 800):
        its.append({"op": "prefill", "role": "receiver", "served_as": "full_prefill", "tokens": t, "start": 0,
                    "end": 0.01 + 0.002 * t})
        its.append({"op": "prefill", "role": "receiver", "served_as": "full_reuse", "tokens": t, "start": 0,
                    "end": 0.005 + 0.0002 * t})
    for b, w in ((1, 300), (2, 500), (4, 900), (8, 400)):
        its.append({"op": "decode", "role": "receiver", "batch": b, "width": w, "start": 1.0,
                    "end": 1.0 + 0.02 + 0.003 * b + 1e-6 * b * w})
    c = calibrate(its, n_layers=10, kv_bytes_per_token_layer=100.0)
    assert c.prefill_s("full_prefill", 600) == pytest.approx(0.01 + 0.002 * 600)
    assert c.decode == pytest.approx((0.02, 0.003, 1e-6))
    # a recomputed layer: (full prefill - full reuse) / layers; k = all layers is a full prefill again
    assert c.droidspeak_s(10, 600, None) == pytest.approx(c.prefill_s("full_prefill", 600))
    assert c.droidspeak_s(0, 600, None) == pytest.approx(c.prefill_s("full_reuse", 600))
    assert c.droidspeak_s(0, 600, 1e-6) == pytest.approx(600 * 10 * 100 * 8 / 1e3)  # load-bound on a slow link


def test_h200_costs_come_from_the_committed_engine_runs():
    from ds_study.sim_study import capacity, gpu_costs, receiver_workload

    c, meta = gpu_costs()
    assert c.prefill_s("full_prefill", 8192) == pytest.approx(0.27619, abs=1e-4)  # full_prefill_engine_ms
    assert c.prefill_s("droidspeak", 8192) == pytest.approx(np.mean([0.0834, 0.0816]), abs=5e-4)
    slo = 2 * c.prefill_s("full_prefill", 8192)
    full, ds = (capacity(s, c, slo, lambda rate: receiver_workload(rate, 300, 8192), units=1)
                for s in ("full_prefill", "droidspeak"))
    assert full < 1 / 0.276 < ds  # one unit cannot sustain more than 1 / service time


def test_load_policy_follows_the_paper_and_bandwidth_awareness_fixes_slow_links():
    c = flat()
    frontier = [Point(0, -0.06), Point(2, -0.05), Point(4, 0.0)]
    unit = Unit("u", ("receiver",))
    r = req("r", "receiver", 0.0, tokens=1000)
    load = LoadPolicy(frontier, c, target=-0.055, slo_s=10.0, gbps=None)
    assert load(unit, r, 0.0) == 4  # idle: the most recomputation that meets the SLO
    unit.waiting.append(r)
    assert load(unit, r, 0.0) == 2  # queue: the fewest layers within the target
    # at 0.01 Gbit/s loading two layers' KV takes 1.6 s, recomputing all four 0.9 s: fastest within target is k=4
    assert BandwidthAwarePolicy(frontier, c, -0.055, 10.0, gbps=0.01)(unit, r, 0.0) == 4
    assert LoadPolicy(frontier, c, -0.055, 10.0, gbps=None)(unit, r, 0.0) == 2
    assert FixedPolicy(frontier[1])(unit, r, 0.0) == 2
