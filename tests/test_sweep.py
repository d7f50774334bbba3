"""Sweeps beyond one machine (issue 18): ``-m`` sweeps run through Hydra's launcher plugins (joblib
here, submitit locally; SLURM is the documented target), parallel jobs never share a run directory
nor corrupt a cell file, and a rerun sweep resumes from the cells."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ds_study import runner

# forked writers start at once (no imports); they only append to files, so forking this process is safe
FORK = multiprocessing.get_context("fork")


def bare_store(path: Path) -> runner.CellStore:
    """A CellStore on ``path`` without a pair: the file protocol only (what ``add`` writes)."""
    store = object.__new__(runner.CellStore)
    store.path, store.seed_path, store.cells, store.seed_cells = Path(path), None, {}, {}
    return store


def append_cells(path: str, tag: str, n: int, payload: int) -> None:
    store = bare_store(Path(path))
    for i in range(n):
        store.add({"plan": tag, "id": str(i), "prediction": tag * payload})


def make_run_dirs(root: str, n: int) -> list[str]:
    return [str(runner.new_run_dir(root, "evaluate", "tiny", "pycode")) for _ in range(n)]


def test_two_processes_append_cells_to_one_file_without_corrupting_it(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text('{"plan": "cut", "id": "0", "predic')  # a cell cut off by a kill
    n, payload = 150, 40_000  # lines of 40 KB: far longer than a pipe buffer or a page
    procs = [FORK.Process(target=append_cells, args=(str(path), tag, n, payload)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lines = path.read_text().split("\n")
    assert lines[0] == '{"plan": "cut", "id": "0", "predic' and lines[-1] == ""  # the cut line ended, not glued
    rows = [json.loads(line) for line in lines[1:-1]]  # every other line is one whole cell
    assert sorted((r["plan"], int(r["id"])) for r in rows) == [(t, i) for t in "ab" for i in range(n)]
    assert all(r["prediction"] == r["plan"] * payload for r in rows)
    store = bare_store(path)
    store.reload()  # what a resuming job reads: every cell, the cut one skipped
    assert len(store.cells) == 2 * n and path.read_text().endswith("\n")


def append_when_set(go, path: str) -> None:
    go.wait(60)
    append_cells(path, "a", 1, 1)


def test_a_cell_is_written_under_the_file_lock(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text("")
    go = FORK.Event()
    p = FORK.Process(target=append_when_set, args=(go, str(path)))
    p.start()  # before the lock is taken: a forked child would share it
    with open(path, "rb+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # another writer holds the file
        go.set()
        time.sleep(1.0)  # time enough for the child to reach the lock
        assert path.read_text() == "" and p.is_alive()  # it waits
    p.join(60)
    assert p.exitcode == 0 and json.loads(path.read_text())["plan"] == "a"


def test_reload_ends_a_cut_line_once(tmp_path):
    path = tmp_path / "cells.jsonl"
    path.write_text('{"plan": "a", "id": "0"}\n{"plan": "b"')
    store = bare_store(path)
    store.reload()
    store.reload()  # a second reader adds no empty line
    assert path.read_text() == '{"plan": "a", "id": "0"}\n{"plan": "b"\n' and list(store.cells) == [("a", "0")]


def test_parallel_jobs_of_one_second_never_share_a_run_dir(tmp_path):
    (tmp_path / "runs").mkdir()
    with FORK.Pool(2) as pool:  # the same job, pair and dataset, started together, many times
        made = [d for ds in pool.starmap(make_run_dirs, [(str(tmp_path / "runs"), 25)] * 2) for d in ds]
    assert len(made) == len(set(made)) == 50 and all(Path(d).is_dir() for d in made)
    # different pairs in the same second differ by name
    a, b = (runner.new_run_dir(tmp_path / "runs2", "evaluate", p, "pyqa") for p in ("tiny", "tiny_qa"))
    assert a != b and a.name.endswith("_tiny_pyqa") and b.name.endswith("_tiny_qa_pyqa")


@pytest.mark.skipif(not runner.in_checkout(), reason="needs the git checkout")
def test_sweep_outputs_stay_out_of_the_tracked_tree():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    for name in ("profile", "evaluate", "study"):
        with initialize_config_dir(str(runner.CONF_DIR), version_base="1.3"):
            hc = compose(name, return_hydra_config=True).hydra
        raw = OmegaConf.to_container(hc.sweep, resolve=False)
        path = f"{raw['dir']}/{raw['subdir']}/.submitit/1/1_0_log.out".replace("${", "x").replace("}", "x")
        assert path.startswith("multirun/"), (name, raw)
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=runner.REPO_ROOT)
        assert ignored.returncode == 0, f"{name}: {raw['dir']} is not git-ignored"
        assert hc.output_subdir is None  # no .hydra/ folders either


def sweep(monkeypatch, cwd: Path, launcher: str, *extra: str) -> None:
    """``python -m ds_study.evaluate -m model_pair=tiny,tiny_qa ... hydra/launcher=<launcher>`` in ``cwd``."""
    from ds_study import evaluate

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [
        "evaluate", "-m", "model_pair=tiny,tiny_qa", "limit=1", "plan=full_prefill", "threads=1",
        f"results_root={cwd / 'runs'}", f"cells_root={cwd / 'cells'}", "cells_seed=null",
        f"hydra/launcher={launcher}", *extra])
    evaluate.cli()


def outcome(cwd: Path) -> tuple[list[str], dict[str, bytes]]:
    runs = sorted(p.parent.name.split("_evaluate_")[1] for p in (cwd / "runs").glob("*/summary.json"))
    cells = {p.relative_to(cwd / "cells").as_posix(): p.read_bytes() for p in (cwd / "cells").rglob("*.jsonl")}
    return runs, cells


def test_two_pair_sweep_through_joblib_resumes(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[sweep]'")
    from joblib.externals.loky import get_reusable_executor

    try:  # one worker process runs both jobs (two would double the imports; concurrency: the tests above)
        sweep(monkeypatch, tmp_path, "joblib", "hydra.launcher.n_jobs=1")
        runs, cells = outcome(tmp_path)
        assert runs == ["tiny_pycode", "tiny_qa_pyqa"]  # both jobs ran, each in its own run directory
        assert sorted(c.split("/")[0] for c in cells) == ["tiny", "tiny_qa"]
        assert all(len(b.splitlines()) == 1 for b in cells.values())  # one cell each (1 example x 1 plan)
        assert [p.name for p in tmp_path.iterdir() if p.name not in ("runs", "cells")] == ["multirun"]

        sweep(monkeypatch, tmp_path, "joblib", "hydra.launcher.n_jobs=1")  # the same sweep again
        runs2, cells2 = outcome(tmp_path)
        assert runs2 == sorted(runs * 2) and cells2 == cells  # two new runs, no new cell: it resumed
        for p in (tmp_path / "runs").glob("*/samples.jsonl"):
            assert len(p.read_text().splitlines()) == 1
    finally:
        get_reusable_executor().shutdown(wait=True)  # the sweep's worker processes


@pytest.mark.slow  # two fresh job processes at once: about a minute on the shared 2-core machines
def test_two_pair_sweep_through_submitit_local(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[sweep]'")
    sweep(monkeypatch, tmp_path, "submitit_local", "hydra.launcher.timeout_min=10")
    runs, cells = outcome(tmp_path)
    assert runs == ["tiny_pycode", "tiny_qa_pyqa"]
    assert all(len(b.splitlines()) == 1 for b in cells.values()) and len(cells) == 2
    logs = list((tmp_path / "multirun").glob("*/.submitit/*/*_0_log.out"))
    assert len(logs) == 2 and all("results:" in p.read_text() for p in logs)
