"""ds_study.search: enumeration, frontier and selection on hand-worked tables, greedy on a synthetic
oracle, bit-identical shared recomputation, and resuming an interrupted profile."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from ds_study import frontier, runner, search
from ds_study.frontier import Point, budget_frontier, candidate_groups, critical_layers, select

# --------------------------------------------------------------------------------------------
# Enumeration


def test_candidate_groups():
    assert len(candidate_groups(8, 1)) == 36
    assert candidate_groups(8, 2) == [(0, 1), (0, 3), (0, 5), (0, 7), (2, 3), (2, 5), (2, 7), (4, 5), (4, 7), (6, 7)]
    assert candidate_groups(5, 2) == [(0, 1), (0, 3), (0, 4), (2, 3), (2, 4), (4, 4)]  # last group clipped
    assert frontier.n_exhaustive(8, 1) == 37 and frontier.n_exhaustive(8, 2) == 11
    assert frontier.n_exhaustive(32, 1) == 529 and frontier.n_exhaustive(32, 2) == 137
    assert frontier.plan_of([], 8).name == "full_reuse"
    assert frontier.plan_of([(0, 7)], 8).name == "full_prefill"
    assert frontier.plan_of([(5, 6), (1, 2)], 8).name == "groups:1-2,5-6"


# --------------------------------------------------------------------------------------------
# Frontier and selection on a hand-worked 4-layer table (full prefill = 40)

TABLE = {(): 10, ((0, 0),): 20, ((1, 1),): 25, ((3, 3),): 25, ((2, 2),): 5,
         ((0, 1),): 30, ((2, 3),): 30, ((1, 2),): 28,
         ((0, 2),): 38, ((1, 3),): 40,
         ((0, 3),): 40}


def points(table=TABLE):
    return [Point(frontier.plan_of(g, 4).name, g, s) for g, s in table.items()]


def test_frontier_best_per_k_with_tie_breaks():
    f = frontier.frontier(points(), 4)
    # k=1: [1,1] and [3,3] tie at 25 with one transition each -> the earlier group
    # k=2: [0,1] and [2,3] tie at 30 -> [0,1] needs no E (no transition)
    assert [p.plan for p in f] == ["full_reuse", "groups:1-1", "groups:0-1", "groups:1-3", "full_prefill"]
    assert [p.score for p in f] == [10, 25, 30, 40, 40]


def test_budget_frontier_is_monotone():
    t = dict(TABLE)
    t[((0, 1),)] = t[((2, 3),)] = t[((1, 2),)] = 22  # k=2 now worse than k=1
    b = budget_frontier(frontier.frontier(points(t), 4))
    assert [p.plan for p in b] == ["full_reuse", "groups:1-1", "groups:1-1", "groups:1-3", "groups:1-3"]


def test_select_relative_and_absolute():
    f = frontier.frontier(points(), 4)
    assert select(f, 40, 0.05).plan == "groups:1-3"  # needs >= 38; k=2 has only 30
    assert select(f, 40, 0.01).plan == "groups:1-3"  # needs >= 39.6
    assert select(f, 40, 0.30).plan == "groups:0-1"  # needs >= 28
    assert select(f, 40, 0.30, "absolute") is not None and select(f, 40, 0.30, "absolute").k == 0  # 40 - 30 = 10
    assert select(f, 40, 0.11, "absolute").plan == "groups:0-1"  # needs >= 40 - 11 = 29: k=1 has 25
    with pytest.raises(ValueError):
        frontier.threshold(40, 0.05, "percent")


def test_select_uses_fewest_layers_not_best_score():
    t = {(): 0, ((0, 0),): 95, ((0, 1),): 99, ((0, 2),): 97, ((0, 3),): 100}
    f = frontier.frontier(points(t), 4)
    assert select(f, 100, 0.05).k == 1 and select(f, 100, 0.01).k == 2


def test_critical_layers_strictly_more_than_threshold():
    assert critical_layers([40, 35.9, 36, 20], 40) == [1, 3]  # 36 is exactly a 10% drop: not critical
    assert critical_layers([40, 35.9, 36, 20], 40, 0.05, "absolute") == [3]  # below 40 - 5 points
    assert critical_layers([40, 34.9, 36, 20], 40, 0.05, "absolute") == [1, 3]
    assert critical_layers([35.9, 40], 40, layers=[7, 2]) == [7]  # scores of chosen layers keep their indices


# --------------------------------------------------------------------------------------------
# Greedy on a synthetic oracle


def additive_oracle(weights, calls):
    """Quality = 100 - sum of the weights of reused layers - 5 per transition."""
    def score_fn(groups_list):
        calls.extend(groups_list)
        out = []
        for gr in groups_list:
            rec = {i for a, b in gr for i in range(a, b + 1)}
            out.append(100 - sum(w for i, w in enumerate(weights) if i not in rec) - 5 * sum(a > 0 for a, _ in gr))
        return out
    return score_fn


def test_greedy_counts_distinct_evaluations_and_beats_budget():
    w = [1, 2, 30, 25, 3, 1, 1, 1]
    calls = []
    res = search.greedy(8, 1, additive_oracle(w, calls), prior=w)
    assert res.evaluations == len(set(calls)) == len(calls) <= frontier.n_exhaustive(8, 1)
    assert res.evaluations == 9  # full reuse, full prefill, one plan for each of k = 1..7
    exhaustive = [Point(frontier.plan_of(g, 8).name, g, additive_oracle(w, [])([g])[0])
                  for g in [()] + [((a, b),) for a, b in candidate_groups(8, 1)]]
    table = frontier.comparison(exhaustive, res.points, 8)
    assert all(r["diff"] <= 0 for r in table)  # greedy can never beat the exhaustive search over its own space
    assert table[0]["greedy_plan"] == "full_reuse" and table[8]["greedy"] == 100
    # with a perfect prior on this oracle the walk [2,2] -> [2,3] -> ... finds the k=2 optimum
    assert table[2]["greedy_plan"] == "groups:2-3" and table[2]["diff"] == 0


def test_greedy_opens_a_second_group_only_where_the_prior_says_it_helps():
    prior = [10, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 9]
    two = search.greedy(8, 1, additive_oracle(prior, []), prior, max_groups=2)
    assert two.points[3].groups == ((0, 0), (7, 7))  # after the seed [0, 0]: 9 > 1.5 x 0.1 is worth a transition
    assert all(len(p.groups) <= 2 for p in two.points) and two.evaluations == 9
    one = search.greedy(8, 1, additive_oracle(prior, []), prior, max_groups=1)
    assert all(len(p.groups) <= 1 for p in one.points)
    flat = [1, 1, 1, 1, 1, 1, 1, 1.2]  # far granule not better by > 50%: grow contiguously
    assert all(len(p.groups) <= 1 for p in search.greedy(8, 1, additive_oracle(flat, []), flat, max_groups=2).points)
    coarse = search.greedy(8, 2, additive_oracle(prior, []), prior, max_groups=1)
    assert coarse.evaluations == 5 and sorted(p.k for p in coarse.points) == [0, 2, 4, 6, 8]


def test_ranking_reliability_separates_signal_from_noise():
    import random

    rng = random.Random(1)
    true_quality = [0.1 * i for i in range(10)]  # 10 plans, well separated
    signal = {f"p{i}": [q + rng.gauss(0, 0.05) for _ in range(50)] for i, q in enumerate(true_quality)}
    noise = {f"p{i}": [rng.gauss(0, 1) for _ in range(50)] for i in range(10)}  # all plans alike
    r_signal, r_noise = frontier.ranking_reliability(signal), frontier.ranking_reliability(noise)
    assert r_signal["spearman_p05"] > 0.9
    assert abs(r_noise["spearman_median"]) < 0.3 and r_noise["spearman_p05"] < 0 < r_noise["spearman_p95"]
    assert frontier.ranking_reliability(noise) == r_noise  # seeded
    flat = frontier.ranking_reliability({f"p{i}": [0.0] * 10 for i in range(4)})
    assert flat["spearman_median"] is None and flat["n_defined"] == 0
    with pytest.raises(ValueError, match="at least 3 plans"):
        frontier.ranking_reliability({"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]})


def test_greedy_oracle_caches_repeated_plans():
    calls = []
    oracle = search.CountingOracle(additive_oracle([1, 1, 1, 1], calls))
    oracle([((0, 1),), ((0, 1),)])
    oracle([((0, 1),), ()])
    assert oracle.evaluations == 2 and len(calls) == 2


# --------------------------------------------------------------------------------------------
# Shared recomputation and resuming, on a tiny checkpoint pair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_pair import build_tiny_pair, write_dataset

    root = tmp_path_factory.mktemp("tiny")
    receiver, sender = build_tiny_pair(root)
    return receiver, sender, write_dataset(root / "data.jsonl", n=3)


def test_group_memo_is_bit_identical(tiny):
    from ds_study.executor import GroupMemo, capture, partial_prefill
    from ds_study.plans import groups_plan
    from ds_study.pair import load_pair

    pair = load_pair(str(tiny[0]), str(tiny[1]))
    ids = pair.tokenizer.encode("def f(x):\n    return x + 1\n" * 6)
    sc = capture(pair.sender, ids)
    memo = GroupMemo(pair.receiver, ids, sc)
    for a in range(4):
        for b in range(a, 4):
            plan = groups_plan([(a, b)], 4)
            got = partial_prefill(pair.receiver, plan, ids, sc, memo)
            want = partial_prefill(pair.receiver, plan, ids, sc)
            assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(got, want))


def test_profile_resumes_after_interrupt(tiny, tmp_path, monkeypatch):
    from tiny_pair import compose, pair_overrides

    from ds_study import profile

    cfg = compose("profile", pair_overrides(tiny[0], tiny[1], tmp_path) + [
        f"dataset_path={tiny[2]}", f"search.out_root={tmp_path / 'search'}", "search.publish=true", "threads=1",
        "search.granularity=[1,2]", "search.method=both", "workers=1"])
    real, calls, batches = runner.batched.evaluate_plans, [], []

    def counted(receiver, sender, items, plans, *args, **kwargs):
        batches.append(len(items))
        if crash and len(batches) == 3:
            raise KeyboardInterrupt("injected after 2 finished batches")
        out = real(receiver, sender, items, plans, *args, **kwargs)
        calls.extend((p.name, it.prefix[-1], len(it.prefix)) for p in plans for it in items)
        return out

    monkeypatch.setattr(runner.batched, "evaluate_plans", counted)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        profile.main(cfg)
    first = list(calls)
    cells_file = next((tmp_path / "cells" / "tinytest").glob("*.jsonl"))
    assert len(cells_file.read_text().splitlines()) == len(first) > 0  # every finished batch is on disk
    with open(cells_file, "a") as f:
        f.write('{"plan": "full_reuse", "id": "cut-off by a ki')  # a line half-written when killed

    calls.clear()
    crash = False
    summary = profile.main(cfg)
    # 3 baselines + 4 single-layer + 9 groups (10 at g=1 less [0, 3] = full prefill) = 16 plans x 3 examples
    total = 3 * (3 + 4 + 9)
    assert len(calls) == total - len(first)
    assert not set(calls) & set(first)  # finished cells were not recomputed
    res = summary["search"]
    assert res["comparison"]["exhaustive_evaluations"] == 11
    assert [s["delta"] for s in res["exhaustive"][1]["selected"]] == [0.05, 0.01]
    assert len(res["sensitivity"]["layer_scores"]) == 4
    assert (tmp_path / "search" / "greedy_vs_exhaustive.md").exists()

    calls.clear()
    profile.main(cfg)  # everything done: a rerun computes nothing
    assert calls == []
    lines = cells_file.read_text().splitlines()
    rows = [json.loads(line) for line in lines if not line.startswith('{"plan": "full_reuse", "id": "cut-off')]
    assert len(rows) == len(lines) - 1 == total  # every cell once, and the cut-off line stayed alone


def test_greedy_budget():
    assert search.greedy_budget(8, 1, 0.25) == 9  # floor(0.25 * 37): exactly one plan per recompute count
    assert search.greedy_budget(8, 2, 0.25) == 5  # 0.25 * 11 < 5: the walk's minimum
    assert search.greedy_budget(32, 2, 0.25) == 34
    w, prior = [5, 1, 1, 30, 2, 20, 1, 1], [0, 0, 0, 1, 2, 1, 0, 0]
    for budget in (9, 11, 14):
        calls = []
        res = search.greedy(8, 1, additive_oracle(w, calls), prior, width=2, budget=budget)
        assert res.evaluations == len(calls) <= budget and len({p.k for p in res.points}) == 9
    calls = []
    search.greedy(8, 1, additive_oracle(w, calls), prior, width=2, budget=9)
    assert len(calls) == 9 and calls[2:5] == [((4, 4),), ((3, 4),), ((3, 5),)]  # no slack: the prior decides


def test_greedy_lookahead_lets_scores_override_the_prior():
    w = [5, 1, 1, 30, 2, 20, 1, 1]
    prior = [0, 0, 0, 1, 2, 1, 0, 0]  # ranks layer 4 first, but layer 3 matters most
    exhaustive = [Point(frontier.plan_of(g, 8).name, g, additive_oracle(w, [])([g])[0])
                  for g in [()] + [((a, b),) for a, b in candidate_groups(8, 1)]]
    calls = []
    wide = search.greedy(8, 1, additive_oracle(w, calls), prior, width=2)
    assert wide.evaluations == len(set(calls)) <= search.greedy_evaluations(8, 2)
    assert frontier.comparison(exhaustive, wide.points, 8)[1]["greedy_plan"] == "groups:3-3"  # scoring overrode the prior
    narrow = search.greedy(8, 1, additive_oracle(w, []), prior, width=1)
    assert frontier.comparison(exhaustive, narrow.points, 8)[1]["greedy_plan"] == "full_reuse"  # [4, 4] scores 36 < 39 (full reuse)


def test_parallel_workers_give_the_same_cells(tiny, tmp_path):
    from tiny_pair import compose, pair_overrides

    results = {}
    for workers in (1, 2):
        cfg = compose("profile", pair_overrides(tiny[0], tiny[1], tmp_path / f"w{workers}") + [
            f"dataset_path={tiny[2]}", f"workers={workers}", "threads=1"])
        task = runner.validate(cfg)
        pair = runner.load_pair_from(cfg)
        examples = runner.prepare(pair, task, runner.records_of(cfg, task), cfg.max_length)
        store = runner.CellStore(tmp_path / f"w{workers}" / "cells", pair, task, cfg.split, cfg.max_length)
        ev = runner.Evaluator(pair, task, store, workers=workers, worker_cfg=cfg)
        ev.fill([frontier.plan_of([(1, 2)], 4), frontier.plan_of([], 4)], examples, min_cells=1)
        assert ev.n_run == len(store.cells) == 6  # computed by fill, in one process or two
        points = search.exhaustive(ev, examples, 4, [2])[2]
        results[workers] = ({p.plan: p.score for p in points},
                            {k: (r["prediction"], r["score"]) for k, r in store.cells.items()})
    assert results[1][0] == results[2][0]
    cells1, cells2 = results[1][1], results[2][1]
    assert {("groups:1-2", f"pyqa-profile-0000{i}") for i in range(3)} <= set(cells1) == set(cells2)
    assert all(cells1[k] == cells2[k] for k in cells1)


def test_holdout_check_scores_the_compared_plans_again(tiny, tmp_path):
    from tiny_pair import compose, pair_overrides

    from ds_study import profile

    # a local dataset file serves every split, so the "held-out" examples are the profiling ones:
    # the held-out columns must then reproduce the profiled ones exactly, from separately stored cells
    cfg = compose("profile", pair_overrides(tiny[0], tiny[1], tmp_path) + [
        f"dataset_path={tiny[2]}", f"search.out_root={tmp_path / 'search'}", "search.publish=true", "threads=1",
        "search.holdout_split=test", "search.granularity=[1,2]", "search.method=both"])
    comp = profile.main(cfg)["search"]["comparison"]
    assert comp["holdout"]["split"] == "test" and comp["holdout"]["n_examples"] == 3
    for r in comp["table"]:
        assert r["exhaustive_holdout"] == r["exhaustive"] and r["greedy_holdout"] == r["greedy"]
        assert r["diff_holdout"] == r["diff"]
    assert comp["max_shortfall_holdout"] == comp["max_shortfall"]
    assert len(list((tmp_path / "cells" / "tinytest").glob("*_test_*.jsonl"))) == 1
    assert "held-out diff" in (tmp_path / "search" / "greedy_vs_exhaustive.md").read_text()


def test_cells_are_kept_apart_by_numerics_and_recomputed_when_their_input_changes(tiny, tmp_path):
    from ds_study import data
    from ds_study.plans import parse_plan
    from ds_study.pair import load_pair

    pair = load_pair(str(tiny[0]), str(tiny[1]))
    task = data.TASKS["pyqa"]
    store = runner.CellStore(tmp_path, pair, task, "profile", 256)
    assert store.path.name.endswith("_float32_cpu.jsonl")  # a bfloat16 or CUDA run gets its own file
    ev = runner.Evaluator(pair, task, store)
    plan = parse_plan("full_reuse", pair.n_layers)
    (ex,) = runner.prepare(pair, task, data.load_records("pyqa", "test", path=str(tiny[2]))[:1], 256)
    ev.cell(plan, ex)
    ev.cell(plan, ex)
    assert (ev.n_run, ev.n_reused) == (1, 1)
    edited = runner.Example(dict(ex.record, answers=["another reference"]), ex.prompt)  # same id, new data
    assert ev.cell(plan, edited)["answers"] == ["another reference"] and ev.n_run == 2


def test_a_cut_off_last_line_never_swallows_the_next_cell(tiny, tmp_path):
    from ds_study import data
    from ds_study.pair import load_pair

    pair = load_pair(str(tiny[0]), str(tiny[1]))
    store = runner.CellStore(tmp_path, pair, data.TASKS["pyqa"], "profile", 256)
    store.add({"plan": "p", "id": "a", "score": 1.0})
    with open(store.path, "a") as f:
        f.write('{"plan": "p", "id": "b", "sco')  # another process killed mid-line, after this store was opened
    store.add({"plan": "p", "id": "c", "score": 1.0})
    again = runner.CellStore(tmp_path, pair, data.TASKS["pyqa"], "profile", 256)
    assert sorted(i for _, i in again.cells) == ["a", "c"]


def test_profile_tables_follow_the_latest_search_and_each_dataset_keeps_its_comparison(tiny, tmp_path):
    from tiny_pair import compose, pair_overrides

    from ds_study import figures, profile

    base = pair_overrides(tiny[0], tiny[1], tmp_path) + [f"dataset_path={tiny[2]}", "threads=1", "workers=1",
                                                         f"search.out_root={tmp_path / 'search'}", "search.publish=true",
                                                         "search.granularity=[1,2]", "search.deltas=0.05"]
    profile.main(compose("profile", base + ["search.method=both"]))
    out = tmp_path / "search" / "tinytest" / "pyqa"
    assert (out / "greedy.csv").exists() and (tmp_path / "search" / "greedy_vs_exhaustive_tinytest_pyqa.csv").exists()
    profile.main(compose("profile", base + ["search.method=exhaustive", "search.granularity=2"]))
    assert sorted(f.name for f in out.glob("*.csv")) == ["frontier_g2.csv", "points_g2.csv"]  # no stale greedy
    figures.make_all(tmp_path, tmp_path / "figs")  # the stale greedy table used to abort every figure
    assert (tmp_path / "figs" / "FIGURE_SOURCES.md").exists()


def results_state() -> dict:
    """Every file under the repository's results/ with its size and modification time: what a run
    must leave exactly as it was (written, deleted or added files all show)."""
    root = runner.REPO_ROOT / "results"
    return {str(f.relative_to(root)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in root.rglob("*") if f.is_file()}


def test_the_default_profile_writes_only_into_its_own_run_directory(compose_cfg, tmp_path, capsys):
    """Issue 17: the profile used to rewrite the committed results/search/<pair>/<dataset>/ files
    (keyed by the pair's name only). Every output now goes into the run directory; only
    search.publish=true writes the stable files, and then only where it is told."""
    from ds_study import profile

    before = results_state()
    overrides = ["model_pair=tiny", "limit=1", "threads=1", "workers=1", "search.granularity=[2]",
                 "search.sensitivity=false", f"results_root={tmp_path}/runs", f"cells_root={tmp_path}/cells"]
    summary = profile.main(compose_cfg("profile", *overrides))  # zoo:code <- zoo:qa
    assert results_state() == before
    out = capsys.readouterr()
    # the roles are labelled, and every computing phase showed a live bar with its cells done and total
    assert "(receiver zoo:code <- sender zoo:qa)" in out.out
    import re
    for phase in ("baselines", "exhaustive g=2"):
        done = re.findall(rf"{phase}: 100%\|[^|]*\| (\d+)/(\d+) \[", out.err)
        assert done and all(a == b and int(a) > 0 for a, b in done), (phase, out.err[-2000:])
    assert "Token indices sequence length" not in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells", "runs"]  # no search/ beside runs/ either
    (run,) = (tmp_path / "runs").iterdir()
    for f in ("search.json", "points_g2.csv", "frontier_g2.csv", "summary.json"):
        assert (run / f).exists(), f
    assert json.loads((run / "search.json").read_text())["pair"] == "tiny" and "exhaustive" in summary["search"]

    pub = tmp_path / "published"
    profile.main(compose_cfg("profile", *overrides, "search.publish=true", f"search.out_root={pub}"))
    assert results_state() == before
    saved = json.loads((pub / "tiny" / "pycode" / "search.json").read_text())
    assert sorted(p.name for p in (pub / "tiny" / "pycode").iterdir()) == ["frontier_g2.csv", "points_g2.csv",
                                                                            "search.json"]
    # committed files carry no checkout path: the embedded models are named relative to the repository
    assert saved["models"]["receiver"]["path"] == "ds_study/assets/zoo/code"


def test_continuous_targets_score_plans_by_nll_and_kl(tiny, tmp_path):
    """search.target=nll|kl ranks plans by exp(-NLL) / exp(-KL) read from the same cells as the task
    metric; under kl full prefill is 100 by definition, and a bad target is refused before any work."""
    import math

    import pytest
    from tiny_pair import compose, pair_overrides

    from ds_study import metrics, profile

    common = pair_overrides(tiny[0], tiny[1], tmp_path) + ["limit=3", "threads=1", "workers=1", "deviation=false",
                                                           "search.granularity=[4]", "search.sensitivity=false"]
    by_kl = profile.main(compose("profile", common + ["search.target=kl"]))["search"]
    assert by_kl["target"] == "kl" and by_kl["base"] == 100.0
    front = [r for r in by_kl["exhaustive"][4]["frontier"] if r["score"] is not None]
    assert all(r["score"] <= 100.0 for r in front) and front[-1]["score"] == 100.0 > front[0]["score"]
    by_nll = profile.main(compose("profile", common + ["search.target=nll"]))["search"]
    assert by_nll["cells_computed"] == 0  # the same cells, read again
    row = {"score": 0.5, "nll": 0.7, "kl": 0.1}
    assert metrics.example_value(row, "nll") == pytest.approx(math.exp(-0.7))
    assert metrics.example_value(row, "task") == 0.5
    with pytest.raises(ValueError, match="search.target must be task | nll | kl"):
        profile.main(compose("profile", common + ["search.target=f1"]))


def test_sensitivity_at_chosen_layers_only(tiny, tmp_path):
    """search.sensitivity_layers scores single-layer reuse at those layers only, keeping their indices
    (``layers`` beside ``layer_scores``); the default (null) scores every layer, from the same cells.
    search.json also holds every scored plan's mean NLL and KL, read from the cells."""
    from tiny_pair import compose, pair_overrides

    from ds_study import profile

    common = pair_overrides(tiny[0], tiny[1], tmp_path) + ["limit=2", "threads=1", "workers=1", "deviation=false",
                                                           "search.granularity=[4]"]
    some = profile.main(compose("profile", common + ["search.sensitivity_layers=[3,1]"]))["search"]
    sens = some["sensitivity"]
    assert sens["layers"] == [3, 1] and len(sens["layer_scores"]) == 2
    assert set(sens["critical_layers"]) <= {1, 3}
    assert {"reuse_only:3", "reuse_only:1", "full_prefill", "full_reuse", "sender"} <= set(some["plan_means"])
    assert "reuse_only:0" not in some["plan_means"]
    assert all(set(m) == {"nll", "kl"} and m["nll"] > 0 for m in some["plan_means"].values())
    assert some["plan_means"]["full_prefill"]["kl"] == 0.0

    every = profile.main(compose("profile", common))["search"]  # the default: every layer
    assert every["sensitivity"]["layers"] == [0, 1, 2, 3]
    assert every["cells_computed"] == 2 * 2  # only layers 0 and 2 were new
    assert [every["sensitivity"]["layer_scores"][i] for i in (3, 1)] == sens["layer_scores"]
    assert every["plan_means"]["reuse_only:3"] == some["plan_means"]["reuse_only:3"]


@pytest.mark.parametrize("value", ["[8]", "[-1]", "[1,1]", "[]", "[1.5]", "abc"])
def test_bad_sensitivity_layers_refused_before_any_model_loads(refused_before_weights, value):
    from ds_study import profile

    refused_before_weights(profile.main, "profile", f"search.sensitivity_layers={value}",
                           r"search.sensitivity_layers must be null \(every layer\) or a non-empty list of "
                           r"distinct layer indices in \[0, 7\]")
