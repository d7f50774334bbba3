"""The study's cost is summed from the seconds every cell records, by what the cells were for."""

import json

from ds_study import cost


def test_cost_sums_cell_seconds_by_part(tmp_path):
    d = tmp_path / "pairx"
    d.mkdir()
    rows = [{"plan": "full_prefill", "seconds": 2.0}, {"plan": "reuse_only:3", "seconds": 1.0},
            {"plan": "reuse_only:4", "seconds": 3.0}, {"plan": "groups:2-5", "seconds": 0.5},
            {"plan": "groups:2-5,8-9", "seconds": 7.0}, {"plan": "sender"}]  # no time recorded: not counted
    (d / "pysum_profile_0123abcd_float32_cpu.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows) + '\n{"plan": "cut off by a kill')
    got = {r["part"]: r for r in cost.summarize(tmp_path)}
    assert got["single-layer sensitivity (Fig. 7, 8)"]["cells"] == 2
    assert got["single-layer sensitivity (Fig. 7, 8)"]["median_s_per_cell"] == 2.0
    assert got["baselines (Fig. 6)"]["cells"] == 1
    assert got["recompute groups, several (greedy, Fig. 10)"]["hours"] == round(7 / 3600, 3)
    assert sum(r["cells"] for r in got.values()) == 5
    assert "pairx" in cost.markdown(list(got.values()), tmp_path)
