"""The committed cells (results/cells) are a read-only seed: new cells go to the user's store, cells
are looked up there first and then in the seed, and seed cells count as from earlier runs (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_study import data, runner


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_pair import build_tiny_pair

    root = tmp_path_factory.mktemp("cells")
    receiver, sender = build_tiny_pair(root)
    return root, receiver, sender


def snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def test_default_roots(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("DS_STUDY_HOME", str(tmp_path / "home"))
    from hydra import compose, initialize_config_dir

    for name in ("profile", "evaluate", "study"):
        with initialize_config_dir(str(runner.CONF_DIR), version_base="1.3"):
            cfg = compose(name)  # the shipped defaults (compose_cfg sets the fixture's)
        assert runner.cells_roots(cfg) == (tmp_path / "home" / "cells", Path("results/cells")), name
    cfg = compose_cfg("profile", f"cells_root={tmp_path}/c", "cells_seed=null")
    assert runner.cells_roots(cfg) == (tmp_path / "c", None)
    cfg = compose_cfg("profile", f"cells_root={tmp_path}/c", f"cells_seed={tmp_path}/c")  # the same store: no seed
    assert runner.cells_roots(cfg) == (tmp_path / "c", None)


def test_seed_is_read_after_the_user_store_and_never_written(tiny, tmp_path, monkeypatch):
    from ds_study.plans import parse_plan
    from ds_study.pair import load_pair

    monkeypatch.setenv("DS_STUDY_CACHE", str(tmp_path / "cache"))
    root, receiver, sender = tiny
    pair = load_pair(str(receiver), str(sender))
    task = data.TASKS["pyqa"]
    examples = runner.prepare(pair, task, data.load_records("pyqa", "profile")[:2], 256)
    plans = [parse_plan(p, pair.n_layers) for p in ("full_prefill", "full_reuse")]

    seeding = runner.Evaluator(pair, task, runner.CellStore(tmp_path / "seed" / "p", pair, task, "profile", 256))
    seeding.fill(plans[:1], examples)  # the seed holds full_prefill cells only
    assert seeding.n_run == 2
    before = snapshot(tmp_path / "seed")

    store = runner.CellStore(tmp_path / "user" / "p", pair, task, "profile", 256, seed=tmp_path / "seed" / "p")
    assert store.path.name == store.seed_path.name  # one naming in both roots
    ev = runner.Evaluator(pair, task, store)
    ev.fill(plans, examples)
    assert ev.n_run == 2  # only the full_reuse cells were computed
    rows = [ev.cell(p, ex) for p in plans for ex in examples]
    assert ev.n_reused == 4 and ev.n_cached == 2  # the seed's cells are from an earlier run, the rest fresh
    assert rows[0]["score"] == seeding.store.get("full_prefill", examples[0].id)["score"]
    assert snapshot(tmp_path / "seed") == before  # the seed is untouched
    written = [json.loads(line) for line in store.path.read_text().splitlines()]
    assert {r["plan"] for r in written} == {plans[1].name} and len(store.cells) == 2

    store.cells[("full_prefill", examples[0].id)] = {"plan": "full_prefill", "id": examples[0].id, "score": -1}
    assert store.get("full_prefill", examples[0].id)["score"] == -1  # the user's store first


def test_profile_reads_the_seed_and_counts_it_as_earlier(tiny, tmp_path, monkeypatch):
    from tiny_pair import compose, pair_overrides

    from ds_study import profile

    monkeypatch.setenv("DS_STUDY_CACHE", str(tmp_path / "cache"))
    root, receiver, sender = tiny
    common = pair_overrides(receiver, sender, tmp_path) + ["limit=2", "threads=1", "workers=1", "deviation=false",
                                                           "search.enabled=false"]
    first = profile.main(compose("profile", common + [f"cells_root={tmp_path}/seed", "cells_seed=null"]))
    assert first["cells_computed"] == 6 and first["cells_from_earlier_runs"] == 0
    before = snapshot(tmp_path / "seed")
    again = profile.main(compose("profile", common + [f"cells_root={tmp_path}/user", f"cells_seed={tmp_path}/seed"]))
    assert again["cells_computed"] == 0 and again["cells_from_earlier_runs"] == 6
    assert snapshot(tmp_path / "seed") == before and not list((tmp_path / "user").rglob("*.jsonl"))
    fresh = profile.main(compose("profile", common + [f"cells_root={tmp_path}/ci", "cells_seed=null"]))
    assert fresh["cells_computed"] == 6 and fresh["cells_from_earlier_runs"] == 0  # CI: no seed, all fresh


def test_the_default_profile_writes_cells_to_the_user_store_only(compose_cfg, tmp_path, monkeypatch):
    """With the shipped defaults (no cells_root given) new cells land in $DS_STUDY_HOME/cells, and the
    committed results/cells is left as it was."""
    from ds_study import profile

    monkeypatch.setenv("DS_STUDY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DS_STUDY_CACHE", str(tmp_path / "cache"))
    seed = runner.REPO_ROOT / "results" / "cells"
    before = snapshot(seed) if seed.is_dir() else {}
    monkeypatch.chdir(runner.REPO_ROOT)  # the seed is results/cells of the working directory
    s = profile.main(compose_cfg("profile", "model_pair=tiny", "limit=1", "threads=1", "workers=1",
                                 "deviation=false", "search.enabled=false", f"results_root={tmp_path}/runs"))
    assert s["cells_computed"] + s["cells_from_earlier_runs"] == 3
    assert Path(s["cells_file"]).parent == tmp_path / "home" / "cells" / "tiny"
    assert (snapshot(seed) if seed.is_dir() else {}) == before
