"""ds_study.records: the benchmarks' environment record keeps the schema of the committed engine
results, and result files are written reproducibly."""

from __future__ import annotations

import json

from ds_study import records, runner


def test_bench_environment_has_the_keys_of_the_committed_engine_results():
    committed = json.loads((runner.REPO_ROOT / "results" / "engine" / "ttft_quality.json").read_text())["environment"]
    env = records.bench_environment()
    assert set(env) == set(committed) - {"loadavg_end"}  # added when the measurement ends
    assert env["command"].startswith("python ") and len(env["loadavg_start"]) == 3


def test_written_files_are_reproducible_and_readable(tmp_path):
    rows = [{"a": 1, "b": "é"}, {"a": 2, "c": None}]
    first = records.write_jsonl(tmp_path / "x" / "rows.jsonl.gz", rows, quiet=True).read_bytes()
    assert records.write_jsonl(tmp_path / "x" / "rows.jsonl.gz", rows, quiet=True).read_bytes() == first
    records.write_csv(tmp_path / "y" / "rows.csv", rows, quiet=True)
    assert (tmp_path / "y" / "rows.csv").read_text().splitlines()[0] == "a,b,c"
    path = records.write_json(tmp_path / "z" / "obj.json", {"rows": rows}, indent=2, quiet=True)
    assert json.loads(path.read_text()) == {"rows": rows} and path.read_text().endswith("}\n")
