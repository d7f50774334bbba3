"""The golden-result check of the default profile run: does this checkout still compute what was committed?

``scripts/golden.py`` is its command line (what is compared and with which tolerances is said
there); ``check_or_write`` does the work, on the numbers ``golden_numbers`` reads from one profile
run directory (summary.json, search.json, deviation.csv) and the golden file
``results/golden/profile_<pair>.json``.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from ds_study.records import write_json
from ds_study.runner import CONF_DIR, REPO_ROOT

GOLDEN_DIR = REPO_ROOT / "results" / "golden"


def default_pair() -> str:
    """The pair ds_study/conf/profile.yaml profiles by default (``- model_pair: NAME``)."""
    text = (CONF_DIR / "profile.yaml").read_text()
    return re.search(r"^\s*-\s*model_pair:\s*(\S+)", text, re.M).group(1)


def golden_path(pair: str | None = None) -> Path:
    return GOLDEN_DIR / f"profile_{pair or default_pair()}.json"


DEVIATION_COLUMNS = ("k_dev", "v_dev", "e_dev", "attn_cos")


def golden_numbers(run: Path) -> dict:
    """The compared numbers of one profile run directory."""
    summary = json.loads((run / "summary.json").read_text())
    search = json.loads((run / "search.json").read_text())
    with open(run / "deviation.csv", newline="") as f:
        dev = {int(r["layer"]): {c: float(r[c]) for c in DEVIATION_COLUMNS} for r in csv.DictReader(f)}
    quality = {q["plan"]: q["score"] for q in summary["quality"]}
    out = {"pair": summary["pair"], "dataset": summary["dataset"], "split": summary["split"],
           "n_examples": summary["n_examples"], "models": {k: v["weights_sha256"] for k, v in summary["models"].items()},
           "quality": quality, "deviation": {str(k): dev[k] for k in sorted(dev)}}
    if "sensitivity" in search:
        out["sensitivity"] = search["sensitivity"]["layer_scores"]
    for g, front in sorted(search.get("exhaustive", {}).items()):
        out[f"frontier_g{g}"] = {str(r["k"]): r["budget_score"] for r in front["frontier"]}
        out[f"selected_g{g}"] = {str(s["delta"]): s["plan"] for s in front["selected"]}
    return out


def newest_default_run(root: Path, pair: str, dataset: str) -> Path:
    """The newest profile run of ``pair`` on ``dataset`` under a results root (``..._<dataset>`` or, when
    two runs started in the same second, ``..._<dataset>_N``). It must have finished: an unfinished
    newest run is an error, never a reason to check an older one."""
    tail = f"_profile_{pair}_{dataset}"

    def order(p: Path) -> tuple:
        stem, _, n = p.name.rpartition(f"_{dataset}")
        return stem, int(n[1:]) if n.startswith("_") and n[1:].isdigit() else 0

    runs = sorted((p for p in root.glob(f"*{tail}*") if p.is_dir()
                   and re.fullmatch(rf".*{re.escape(tail)}(_\d+)?", p.name)), key=order)
    if not runs:
        raise SystemExit(f"no profile run of the default pair (*{tail}) under {root}; "
                         "run `python -m ds_study.profile` first")
    if not (runs[-1] / "summary.json").exists():
        raise SystemExit(f"the newest default-pair run {runs[-1]} did not finish (no summary.json); "
                         "rerun `python -m ds_study.profile`")
    return runs[-1]


def compare(got: dict, want: dict, tol: float, rtol: float) -> tuple[list[str], bool]:
    """(problems, exact): each problem a line saying what moved, by how much, against which tolerance."""
    problems, exact = [], True
    for key in ("pair", "dataset", "split", "n_examples", "models"):
        if got.get(key) != want.get(key):
            problems.append(f"{key}: {got.get(key)!r} != golden {want.get(key)!r} (not the run the golden file describes)")
    if problems:
        return problems, False

    def close(name: str, a, b, kind: str) -> None:
        nonlocal exact
        if a is None or b is None:
            if a != b:
                problems.append(f"{name}: {a} != golden {b}")
            return
        if a != b:
            exact = False
        ok = abs(a - b) <= tol if kind == "abs" else math.isclose(a, b, rel_tol=rtol, abs_tol=1e-9)
        if not ok:
            limit = f"{tol} points" if kind == "abs" else f"rtol {rtol:g}"
            problems.append(f"{name}: {a} vs golden {b} (diff {a - b:+.6g}, tolerance {limit})")

    for plan, score in want["quality"].items():
        close(f"quality[{plan}]", got["quality"].get(plan), score, "abs")
    for layer, cols in want["deviation"].items():
        for c, v in cols.items():
            close(f"deviation[layer {layer}].{c}", got["deviation"].get(layer, {}).get(c), v, "rel")
    for i, v in enumerate(want.get("sensitivity", [])):
        close(f"sensitivity[layer {i}]", (got.get("sensitivity") or [None] * (i + 1))[i], v, "abs")
    for key in sorted(k for k in want if k.startswith("frontier_g")):
        for k, v in want[key].items():
            close(f"{key}[k={k}]", got.get(key, {}).get(k), v, "abs")
    if any(got.get(k) != want.get(k) for k in want if k.startswith("selected_g")):
        exact = False  # a tie within noise may pick another plan; the scores above carry the check
    return problems, exact


def check_or_write(action: str, path: Path, golden: Path | None = None, tol: float | None = None,
                   rtol: float = 1e-3, fresh: bool = False) -> int:
    """``action`` "check": compare a run (``path``, or the newest default-pair run under a results
    root) with the golden file and print what moved; "write": make the golden file from the run.
    Returns the exit status (0 passed/written, 1 failed)."""
    path = Path(path)
    if path.is_dir() and (path / "summary.json").exists():
        run = path
    else:
        gold = json.loads((golden or golden_path()).read_text()) if (golden or golden_path()).exists() else {}
        run = newest_default_run(path, gold.get("pair", default_pair()), gold.get("dataset", "pycode"))
    got = golden_numbers(run)
    golden = golden or golden_path(got["pair"] if action == "write" else None)
    if action == "write":
        env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
        got["produced_by"] = {"command": "python -m ds_study.profile", "env": env}
        write_json(golden, got, quiet=True)
        print(f"wrote {golden} from {run}")
        return 0
    want = json.loads(golden.read_text())
    if tol is None:
        tol = round(100.0 / max(1, want.get("n_examples") or 50), 2)
    problems, exact = compare(got, want, tol, rtol)
    if problems:
        print(f"GOLDEN CHECK FAILED: {run} against {golden}")
        print("\n".join("  " + p for p in problems))
        return 1
    summary = json.loads((run / "summary.json").read_text())
    reused = summary.get("cells_from_earlier_runs", summary.get("cells_reused", 0))  # older runs: every reuse
    if reused and fresh:
        print(f"GOLDEN CHECK FAILED: {run} read {reused} quality cells from its cell cache instead of computing "
              f"them; rerun with an empty cells_root and no seed (python -m ds_study.profile cells_root=DIR cells_seed=null)")
        return 1
    print(f"golden check passed: {run} matches {golden} "
          + ("exactly" if exact else f"within tolerance (quality {tol} points, deviation rtol {rtol:g})"))
    if reused:
        print(f"  note: {reused} quality cells came from the cell cache (cells_root), so only the deviation "
              f"numbers were computed by this checkout; for a check of decoding and partial prefill too, run "
              f"`python -m ds_study.profile cells_root=/tmp/fresh-cells cells_seed=null` and check with --fresh (as CI does)")
    return 0

