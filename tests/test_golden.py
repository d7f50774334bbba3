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
