"""The golden-result check (scripts/golden.py over ds_study.golden) accepts its own run, tolerates float-level noise and
rejects a moved deviation, a moved quality beyond tolerance, and a run of other models."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from ds_study import golden as golden_lib

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("golden", ROOT / "scripts" / "golden.py")
golden = importlib.util.module_from_spec(spec)
spec.loader.exec_module(golden)


def fake_run(root: Path, name: str = "2026-01-01_00-00-00_profile_tiny_pycode", k_dev0: float = 0.5,
             full_prefill: float = 30.0, weights: str = "aa") -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "pair": "tiny", "dataset": "pycode", "split": "profile", "n_examples": 50,
        "models": {"receiver": {"weights_sha256": weights}, "sender": {"weights_sha256": "bb"}},
        "quality": [{"plan": "full_prefill", "score": full_prefill}, {"plan": "full_reuse", "score": 29.0}]}))
    (run / "search.json").write_text(json.dumps({
        "sensitivity": {"layer_scores": [29.5, 28.0]},
        "exhaustive": {"2": {"frontier": [{"k": 0, "budget_score": 29.0}, {"k": 2, "budget_score": 31.0}],
                             "selected": [{"delta": 0.05, "plan": "full_reuse"}]}}}))
    with open(run / "deviation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["layer", *golden_lib.DEVIATION_COLUMNS])
        w.writeheader()
        w.writerow({"layer": 0, "k_dev": k_dev0, "v_dev": 0.6, "e_dev": 0.4, "attn_cos": 0.7})
        w.writerow({"layer": 1, "k_dev": 0.55, "v_dev": 0.7, "e_dev": 0.5, "attn_cos": 0.4})
    return run


def check(run: Path, gold: Path) -> int:
    return golden.main(["check", str(run), "--golden", str(gold)])


def test_golden_round_trip_and_tolerances(tmp_path, capsys):
    gold = tmp_path / "golden.json"
    assert golden.main(["write", str(fake_run(tmp_path / "a")), "--golden", str(gold)]) == 0
    assert check(tmp_path / "a", gold) == 0  # a results root: its newest default-pair run
    assert "exactly" in capsys.readouterr().out
    assert check(fake_run(tmp_path / "b", k_dev0=0.5 * (1 + 1e-6)), gold) == 0  # float noise
    assert "within tolerance" in capsys.readouterr().out
    assert check(fake_run(tmp_path / "c", full_prefill=31.5), gold) == 0  # one flipped example
    assert check(fake_run(tmp_path / "d", k_dev0=0.51), gold) == 1  # a cache bug moves deviation
    assert "deviation[layer 0].k_dev" in capsys.readouterr().out
    assert check(fake_run(tmp_path / "e", full_prefill=33.0), gold) == 1
    assert check(fake_run(tmp_path / "f", weights="cc"), gold) == 1  # other models: not comparable
    assert "models" in capsys.readouterr().out


def test_golden_check_without_a_run_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="python -m ds_study.profile"):
        check(tmp_path, tmp_path / "golden.json")


def test_committed_golden_file_describes_the_default_pair():
    """The golden file is that of the default pair (ds_study/conf/profile.yaml), computed from the committed
    models: the smol base (fetched, verified) with the committed adapters merged."""
    from omegaconf import OmegaConf

    from ds_study.pair import local_dir, resolve, weights_sha256

    pair = golden_lib.default_pair()
    want = json.loads(golden_lib.golden_path().read_text())
    mp = OmegaConf.load(ROOT / "ds_study" / "conf" / "model_pair" / f"{pair}.yaml")
    assert want["pair"] == pair and want["dataset"] == mp.task
    assert want["models"] == {"receiver": weights_sha256(local_dir(resolve(mp.receiver))),
                              "sender": weights_sha256(local_dir(resolve(mp.sender)))}


def test_golden_check_takes_the_newest_run_and_never_falls_back_to_an_older_one(tmp_path, capsys):
    gold = tmp_path / "golden.json"
    old = fake_run(tmp_path / "runs", "2026-01-01_00-00-00_profile_tiny_pycode")
    assert golden.main(["write", str(old), "--golden", str(gold)]) == 0
    fake_run(tmp_path / "runs", "2026-01-01_00-00-09_profile_tiny_pycode_1", k_dev0=1.0)  # same second, moved
    fake_run(tmp_path / "runs", "2026-01-01_00-00-09_profile_tiny_pycode")
    assert check(tmp_path / "runs", gold) == 1 and "_pycode_1" in capsys.readouterr().out
    (tmp_path / "runs" / "2026-01-02_00-00-00_profile_tiny_pycode").mkdir()  # newest, unfinished
    with pytest.raises(SystemExit, match="did not finish"):
        check(tmp_path / "runs", gold)


def test_golden_check_says_when_quality_came_from_cached_cells(tmp_path, capsys):
    gold = tmp_path / "golden.json"
    run = fake_run(tmp_path)
    assert golden.main(["write", str(run), "--golden", str(gold)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(dict(summary, cells_from_earlier_runs=12)))
    assert check(run, gold) == 0 and "12 quality cells came from the cell cache" in capsys.readouterr().out
    assert golden.main(["check", str(run), "--golden", str(gold), "--fresh"]) == 1
    (run / "summary.json").write_text(json.dumps(dict(summary, cells_reused=40, cells_from_earlier_runs=0)))
    assert golden.main(["check", str(run), "--golden", str(gold), "--fresh"]) == 0  # reused within the run


def fake_study_run(root: Path, name: str = "2026-01-01_00-00-00_profile_tiny_pycode", greedy_score: float = 33.0,
                   greedy_plan: str = "groups:0-0", sens18: float = 27.0, kl: float = 0.05, greedy_evals: int = 5,
                   cached: int = 0, computed: int = 40) -> Path:
    """A run of the golden study's shape: fake_run plus sensitivity at chosen layers, a greedy walk,
    evaluation counts and every plan's mean NLL and KL."""
    run = fake_run(root, name)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(dict(summary, cells_computed=computed,
                                                      cells_from_earlier_runs=cached)))
    (run / "search.json").write_text(json.dumps({
        "sensitivity": {"layers": [15, 18], "layer_scores": [29.5, sens18]},
        "exhaustive": {"10": {"evaluations": 7,
                              "frontier": [{"k": 0, "budget_score": 29.0}, {"k": 30, "budget_score": 30.0}],
                              "selected": [{"delta": 0.05, "plan": "full_reuse"}]}},
        "greedy": {"evaluations": greedy_evals, "budget": 5,
                   "points": [{"plan": "full_reuse", "score": 29.0}, {"plan": "full_prefill", "score": 30.0},
                              {"plan": greedy_plan, "score": greedy_score}]},
        "plan_means": {"full_prefill": {"nll": 0.3, "kl": 0.0}, "full_reuse": {"nll": 0.45, "kl": kl}},
        "cells_computed": computed}))
    return run


def test_golden_study_check_fails_on_each_moved_number_and_names_it(tmp_path, capsys):
    """The golden study's numbers: sensitivity at chosen layers, greedy steps, evaluation counts, mean
    NLL/KL. A perturbed one fails the check with a line naming it; float noise does not."""
    gold = tmp_path / "study.json"
    assert golden.main(["write", str(fake_study_run(tmp_path / "a")), "--golden", str(gold), "--study"]) == 0
    want = json.loads(gold.read_text())
    assert want["sensitivity"] == {"15": 29.5, "18": 27.0} and want["evaluations"] == {
        "sensitivity": 2, "exhaustive_g10": 7, "greedy": 5, "greedy_budget": 5}
    assert want["greedy"][2] == {"plan": "groups:0-0", "score": 33.0} and want["cells_computed"] == 40
    assert check(tmp_path / "a", gold) == 0
    out = capsys.readouterr().out
    assert "exactly" in out and "tolerances: quality 2 points" in out and "rtol 0.001" in out
    assert check(fake_study_run(tmp_path / "b", kl=0.05 * (1 + 1e-5)), gold) == 0  # float noise
    assert check(fake_study_run(tmp_path / "c", greedy_score=34.5), gold) == 0  # one flipped example
    capsys.readouterr()
    for case, kwargs, line in [
            ("d", {"greedy_score": 36.0}, "greedy[step 2] groups:0-0: 36.0 vs golden 33.0"),
            ("e", {"sens18": 23.0}, "sensitivity[layer 18]: 23.0 vs golden 27.0"),
            ("f", {"kl": 0.051}, "plan_means[full_reuse].kl: 0.051 vs golden 0.05"),
            ("g", {"greedy_plan": "groups:1-1"}, "greedy[step 2].plan: 'groups:1-1' != golden 'groups:0-0'"),
            ("h", {"greedy_evals": 6}, "evaluations[greedy]: 6 != golden 5"),
            ("i", {"computed": 39}, "cells_computed: 39 != golden 40")]:
        assert check(fake_study_run(tmp_path / case, **kwargs), gold) == 1, case
        out = capsys.readouterr().out
        assert "GOLDEN CHECK FAILED" in out and line in out and "tolerances:" in out, (case, out)


def test_golden_study_fresh_fails_when_cells_came_from_the_cache(tmp_path, capsys):
    gold = tmp_path / "study.json"
    assert golden.main(["write", str(fake_study_run(tmp_path / "a")), "--golden", str(gold), "--study"]) == 0
    run = fake_study_run(tmp_path / "b", cached=12, computed=28)  # 12 of its 40 cells read from cells_root
    assert check(run, gold) == 0  # the same numbers; the count of computed cells is not comparable, so not compared
    assert "12 quality cells came from the cell cache" in capsys.readouterr().out
    assert golden.main(["check", str(run), "--golden", str(gold), "--study", "--fresh"]) == 1
    out = capsys.readouterr().out
    assert "read 12 quality cells from its cell cache" in out and "--config-name golden_study" in out


def test_golden_reads_old_sensitivity_lists_as_every_layer(tmp_path):
    """Golden files and runs made before search.sensitivity_layers hold every layer's score as a list."""
    run = fake_run(tmp_path)
    got = golden_lib.golden_numbers(run)
    assert got["sensitivity"] == {"0": 29.5, "1": 28.0}
    want = dict(got, sensitivity=[29.5, 28.0])
    assert golden_lib.compare(got, want, 2.0, 1e-3) == ([], True)
    assert golden_lib.compare(dict(got, sensitivity={"0": 29.5, "1": 25.0}), want, 2.0, 1e-3)[0] == [
        "sensitivity[layer 1]: 25.0 vs golden 28.0 (diff -3, tolerance 2.0 points)"]


def test_committed_golden_study_is_the_golden_study_config_on_the_default_pair():
    """results/golden/study_<pair>.json was made by ds_study/conf/golden_study.yaml on the default pair,
    from cells it computed; that config runs one sensitivity point or two, a few exhaustive plans and a
    greedy walk with at least one scored step (width 2: two candidates compared)."""
    from omegaconf import OmegaConf

    from ds_study import frontier, search

    cfg = OmegaConf.load(ROOT / "ds_study" / "conf" / "golden_study.yaml")
    want = json.loads(golden_lib.golden_path(kind="study").read_text())
    assert want["pair"] == golden_lib.default_pair() and want["n_examples"] == cfg.limit
    assert want["models"] == json.loads(golden_lib.golden_path().read_text())["models"]
    assert "--config-name golden_study" in want["produced_by"]["command"] and "cells_seed=null" in want["produced_by"]["command"]
    sc, L = OmegaConf.merge(OmegaConf.load(ROOT / "ds_study" / "conf" / "search.yaml"), cfg.search), 30
    search.check_config(sc, L, "profile")
    g = int(sc.greedy_granularity)
    assert [int(x) for x in sc.granularity] == [g] and sc.method == "both"
    budget = search.greedy_budget(L, g, float(sc.max_fraction))
    assert want["evaluations"] == {"sensitivity": len(sc.sensitivity_layers), f"exhaustive_g{g}": frontier.n_exhaustive(L, g),
                                   "greedy": len(want["greedy"]), "greedy_budget": budget}
    assert 1 <= len(sc.sensitivity_layers) <= 2 and frontier.n_exhaustive(L, g) <= 10
    calls = []
    search.greedy(L, g, lambda gs: calls.append(list(gs)) or [0.0] * len(gs), list(range(L)), width=2, budget=budget)
    assert any(len(c) == 2 for c in calls[1:]), calls  # a step scored two candidates
    assert set(want["plan_means"]) >= {"full_prefill", "full_reuse", "sender"} | {
        f"reuse_only:{i}" for i in sc.sensitivity_layers}


def test_a_perturbed_copy_of_the_committed_golden_study_fails_naming_the_number():
    """The committed golden study against itself passes exactly; a copy with one greedy score, one
    sensitivity point or one plan's mean KL moved beyond its tolerance fails with a line naming it."""
    import copy

    want = json.loads(golden_lib.golden_path(kind="study").read_text())
    got = {k: v for k, v in want.items() if k != "produced_by"}
    tol = round(100.0 / want["n_examples"], 2)
    assert golden_lib.compare(got, want, tol, 1e-3) == ([], True)
    step, plan = 2, want["greedy"][2]["plan"]
    layer = next(iter(want["sensitivity"]))
    moved = [(("greedy", step, "score"), tol + 1, f"greedy[step {step}] {plan}: "),
             (("sensitivity", layer), -(tol + 1), f"sensitivity[layer {layer}]: "),
             (("plan_means", "full_reuse", "kl"), 0.002 * want["plan_means"]["full_reuse"]["kl"],
              "plan_means[full_reuse].kl: ")]
    for path, delta, line in moved:
        bad = copy.deepcopy(want)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] += delta
        problems, _ = golden_lib.compare(got, bad, tol, 1e-3)
        assert len(problems) == 1 and problems[0].startswith(line), (path, problems)
