"""ds_study.study and the figure command: propagation groups by hand, the whole study on a tiny
checkpoint pair, and figures regenerated from result files alone."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pandas as pd
import pytest

from ds_study import figures, runner, study
from ds_study.plans import layer_runs
from ds_study.study import critical_groups_layers, merge_chain


def test_runs_and_merge_chain():
    assert layer_runs([5, 1, 2, 7, 8, 9]) == [(1, 2), (5, 5), (7, 9)]
    # the paper's example: critical 16-18, 20, 25-27 -> 3 transitions, then 2, then one group
    assert merge_chain([(16, 18), (20, 20), (25, 27)]) == [
        ((16, 18), (20, 20), (25, 27)), ((16, 20), (25, 27)), ((16, 27),)]
    assert merge_chain([(3, 3)]) == [((3, 3),)]


def test_critical_groups_layers_needs_two_groups():
    scores = [50, 10, 12, 45, 30, 48]
    assert critical_groups_layers(scores, [1, 2, 4], 3) == [1, 2, 4]  # already two groups
    # one contiguous critical run: add the most sensitive layer not adjacent to it (4, not 0 or 3)
    assert critical_groups_layers(scores, [1, 2], 3) == [1, 2, 4]
    assert critical_groups_layers(scores, [], 3) == [1, 2, 4]  # 1, then 4 (2 is adjacent), then 2


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The whole study and a profile with search on a tiny random pair (2 examples per dataset)."""
    from tiny_pair import build_tiny_pair, compose, pair_overrides

    from ds_study import profile

    root = tmp_path_factory.mktemp("study")
    receiver, sender = build_tiny_pair(root)
    common = pair_overrides(receiver, sender, root) + ["limit=2", "threads=1", "workers=1"]
    summary = study.main(compose("study", common + [f"study_root={root / 'results' / 'study'}", "study.publish=true"]))
    profile.main(compose("profile", common + [f"search.out_root={root / 'results' / 'search'}", "search.publish=true",
                                              "search.method=exhaustive", "deviation=false"]))
    return root, summary


def test_study_writes_every_result_file(results):
    root, summary = results
    base = root / "results" / "study" / "tinytest"
    for d in ("pyqa", "pysum", "pycode"):
        q = json.loads((base / d / "quality.json").read_text())
        assert set(q["scores"]) == {"full_prefill", "full_reuse", "sender"} and q["n_examples"] == 2
    sens = pd.read_csv(base / "pyqa" / "sensitivity.csv")
    assert list(sens.layer) == [0, 1, 2, 3] and {"change_p25", "change_p75", "critical"} <= set(sens.columns)
    assert len(pd.read_csv(base / "pyqa" / "sensitivity_per_example.csv")) == 4 * 2
    sj = json.loads((base / "pyqa" / "sensitivity.json").read_text())
    assert set(sj["by_target"]) == {"task", "nll", "kl"} and sj["by_target"]["kl"]["full_prefill"] == 100.0
    assert all(len(sj["by_target"][t]["layer_scores"]) == 4 for t in sj["by_target"])
    assert set(sj["prediction"]) == {"v_dev", "attn", "kv", "k_dev", "e_dev"}  # Spearman per prior and target
    assert all(v is None or -1 <= v <= 1 for r in sj["prediction"].values() for v in r.values())
    assert len(pd.read_csv(base / "pyqa" / "deviation.csv")) == 4
    prop = pd.read_csv(base / "pyqa" / "propagation.csv")
    assert prop.plan.iloc[0] == "full_reuse" and prop.n_groups.iloc[-1] == 1 and prop.n_groups.iloc[1] >= 2
    assert (prop.out_err_mean >= 0).all()
    multi = prop[prop.n_groups >= 2]  # each beside one contiguous group of as many layers (Fig. 10 at equal k)
    k_of = dict(zip(prop.plan, prop.k))
    assert multi.contiguous_twin.notna().all() and all(k_of[t] == k for t, k in zip(multi.contiguous_twin, multi.k))
    pj = json.loads((base / "pyqa" / "propagation.json").read_text())
    assert pj["target"] == "kl" and all(len(p["out_err_minus_twin"]) == 3 for p in pj["plans"] if p["contiguous_twin"])
    tr = pd.read_csv(base / "transfer.csv")
    assert set(tr.source) == set(tr.target) == {"pyqa", "pysum", "pycode"}
    assert (tr[tr.source == tr.target].gap == 0).all()  # a dataset's own frontier has no gap to itself
    assert summary["cells_computed"] > 0 and set(summary["job_seconds"]) == set(study.JOBS)


def test_study_rerun_computes_nothing(results, monkeypatch):
    from tiny_pair import compose, pair_overrides

    root, _ = results
    calls = []
    real = runner.batched.evaluate_plans
    monkeypatch.setattr(runner.batched, "evaluate_plans",
                        lambda receiver, sender, items, plans, *a, **k: calls.append(plans) or real(receiver, sender, items, plans, *a, **k))
    cfg = compose("study", pair_overrides(root / "receiver", root / "sender", root)
                  + ["limit=2", "workers=1", f"study_root={root / 'results' / 'study'}", "study.publish=true"])
    again = study.main(cfg)
    assert calls == [] and again["cells_computed"] == 0


def test_study_writes_only_its_run_directory_unless_published(results, tmp_path):
    """Without study.publish=true nothing outside the run directory changes (issue 17); with it, the
    stable files are copied to <results_root>/../study/<pair>/ (the committed results/study)."""
    from tiny_pair import compose, pair_overrides

    root, _ = results
    common = pair_overrides(root / "receiver", root / "sender", root) + [
        "limit=2", "workers=1", "study=quality", "study.quality.datasets=[pyqa]", f"results_root={tmp_path}/runs"]
    s = study.main(compose("study", common))
    assert s["cells_computed"] == 0 and s["cells_from_earlier_runs"] > 0 and "published" not in s
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no tmp_path/study: nothing published
    q = json.loads((run / "study" / "tinytest" / "pyqa" / "quality.json").read_text())
    assert q["n_examples"] == 2
    made = figures.make_all(run, tmp_path / "figs")  # the run directory is a results root of its own
    assert any(p.name == "fig6_quality.png" for p in made)

    s = study.main(compose("study", common + ["study.publish=true"]))
    pub = tmp_path / "study" / "tinytest" / "pyqa" / "quality.json"
    assert s["published"] == str(tmp_path / "study" / "tinytest")
    assert json.loads(pub.read_text())["scores"] == q["scores"]


def test_figures_from_result_files_only(results, tmp_path, monkeypatch):
    root, _ = results

    def no_models(*a, **k):
        raise AssertionError("the figure command must not load models")

    monkeypatch.setattr(runner, "load_pair_from", no_models)
    made = figures.make_all(root / "results", tmp_path / "figs")
    names = {p.name for p in made}
    for fig in ("fig6_quality", "fig7_sensitivity", "fig8_spread", "fig10_propagation", "fig11_profile",
                "fig17_transfer"):
        assert {f"{fig}.png", f"{fig}.pdf"} <= names
    src = (tmp_path / "figs" / "FIGURE_SOURCES.md").read_text()
    assert "study/tinytest/pyqa/sensitivity.json" in src and "python -m ds_study.study" in src
    assert "search/tinytest/pyqa/search.json" in src and "python -m ds_study.profile" in src


def test_figures_report_missing_sources(tmp_path):
    made = figures.make_all(tmp_path / "empty", tmp_path / "figs")
    assert made == []
    assert "fig6_quality (Fig. 6 analogue): not made" in (tmp_path / "figs" / "FIGURE_SOURCES.md").read_text()


def test_engine_figures_come_from_the_committed_engine_results(tmp_path):
    """The engine's figures live in ds_study.figures too: drawn from results/engine alone, with the
    benchmark command each result file records named in FIGURE_SOURCES.md."""
    (tmp_path / "engine").mkdir()
    for name in ("fig13_timeline", "ttft_quality", "ttft_bandwidth"):
        src = runner.REPO_ROOT / "results" / "engine" / f"{name}.json"
        (tmp_path / "engine" / src.name).write_text(src.read_text())
    made = figures.make_all(tmp_path, tmp_path / "figs", formats=("png",))
    assert sorted(p.name for p in made) == ["fig13_timeline.png", "fig14_ttft_quality.png", "fig20_bandwidth.png"]
    src = (tmp_path / "figs" / "FIGURE_SOURCES.md").read_text()
    assert "python scripts/bench_ttft.py quality" in src and "python scripts/bench_ttft.py timeline" in src


@pytest.mark.parametrize("override, message", [
    ("study.transfer.datasets=[pyqa,nope]", "study.transfer.datasets must be"),
    ("study.sensitivity.critical_mode=percent", "study.sensitivity.critical_mode must be"),
    ("study.sensitivity.percentiles=[5,150]", "study.sensitivity.percentiles must be"),
    ("study.transfer.granularity=0", "study.transfer.granularity must be"),
    ("study.quality.plans=[full_prefill,'6-9']", "outside"),
    ("study.publish=1", "study.publish must be true or false"),
    ("study_root=/tmp/elsewhere", "Add study.publish=true or drop study_root"),
])
def test_bad_study_settings_refused_before_any_model_loads(refused_before_weights, override, message):
    refused_before_weights(study.main, "study", override, message)
