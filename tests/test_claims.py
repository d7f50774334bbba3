"""The claims table is built from result files only, says what is not measured, and judges with intervals."""

import json

from ds_study import claims


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_claims_from_result_files_only(tmp_path):
    row = {"pair": "smol_sum", "receiver_score": [0.8, 0.75, 0.85], "reuse_minus_receiver": [-0.5, -0.6, -0.4]}
    write(tmp_path / "pairs_smol.json", {"pairs": [row]})
    stable = {"spearman_median": 0.9, "spearman_p05": 0.8, "spearman_p95": 0.95}
    write(tmp_path / "study" / "smol_sum" / "pysum" / "sensitivity.json", {
        "n_layers": 30, "n_examples": 20, "critical_layers": [3, 7, 20],
        "by_target": {"task": {"critical_layers": [3, 7, 20]}, "kl": {"critical_layers": [3, 9, 12]}},
        "stability": {"task": {"spearman_median": 0.1, "spearman_p05": -0.1, "spearman_p95": 0.4}, "kl": stable}})
    text = claims.build(tmp_path)
    lines = [line for line in text.splitlines() if line.startswith("| ") and "paper finding" not in line]
    assert len(lines) == len(claims.CLAIMS)
    reuse, critical, stable = lines[:3]
    assert "-50.0 [-60.0, -40.0] of 80.0 (62% of the points)" in reuse and "agree (1 of 1 pairs" in reuse
    assert "task: 3/30 [3, 7, 20]; kl: 3/30 [3, 9, 12] (n=20)" in critical
    # the task metric cannot rank the layers here, so only KL's critical share counts
    assert "agree (task: no pair where this signal ranks layers reliably; kl: 10% critical on 1 pair(s)" in critical
    assert "agree under KL" in stable and "the task metric cannot rank layers" in stable
    assert reuse.count("not measured yet") == 4  # the four pairs with no row
    assert "| not measured yet |" in lines[-1]  # no search published: no selection


def test_claims_command_writes_the_table(tmp_path, capsys):
    write(tmp_path / "pairs_smol.json", {"pairs": []})
    claims.main(["--results", str(tmp_path)])
    assert (tmp_path / "claims.md").read_text().count("not measured yet") >= len(claims.CLAIMS)
