"""The golden-result checks of the default pair: does this checkout still compute what was committed?

Two golden files, each made from one run of ``python -m ds_study.profile`` on the default pair:

- ``results/golden/profile_<pair>.json``: the default (reduced) profile: baselines, per-layer
  deviation, the exhaustive frontier;
- ``results/golden/study_<pair>.json`` (``--study``): the golden *study*, ``--config-name
  golden_study`` (ds_study/conf/golden_study.yaml): 4 examples, the baselines, single-layer
  sensitivity at two layers, an exhaustive 7-plan grid, a greedy walk on it with one scored step,
  and every plan's mean NLL and KL.

``scripts/golden.py`` is the command line; ``check_or_write`` does the work, on the numbers
``golden_numbers`` reads from one run directory (summary.json, search.json, deviation.csv).
Every number the golden file holds is compared, with the tolerance its nature allows on another
CPU, where float summation order (and so an occasional greedy token) can differ:

- task quality (the baselines, each sensitivity point, the exhaustive frontier, each greedy step's
  score): absolute, ``tol`` points, by default 100 / n_examples (one flipped example: 2 points with
  50 examples, 10 with the default profile's 10, 25 with the golden study's 4);
- continuous numbers (per-layer K/V/E deviation and attention cosine; each plan's mean gold-answer
  NLL and mean KL from full prefill, in nats): relative ``rtol`` (default 1e-3), with an absolute
  floor of 1e-6 (cells hold NLL and KL to 6 decimals; the KL of full prefill is 0);
- exact: the plan of each greedy step (another plan means the walk took another path), the
  evaluation counts (plans scored by exhaustive, greedy and sensitivity, the greedy's budget), and,
  on a run that computed every cell itself, the number of cells computed.

``fresh``: the check also fails when the run read any quality cell from its cell cache
(``cells_from_earlier_runs`` in summary.json) instead of computing it, so that CI checks numbers
this checkout computed rather than numbers committed with the cells.
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


KINDS = ("profile", "study")  # the default profile, the golden study (ds_study/conf/golden_study.yaml)


def golden_path(pair: str | None = None, kind: str = "profile") -> Path:
    return GOLDEN_DIR / f"{kind}_{pair or default_pair()}.json"


DEVIATION_COLUMNS = ("k_dev", "v_dev", "e_dev", "attn_cos")
CONTINUOUS_ABS = 1e-6  # nats: the absolute floor of the NLL/KL (and deviation) comparison


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
    counts = {}
    if "sensitivity" in search:
        sens = search["sensitivity"]
        layers = sens.get("layers") or range(len(sens["layer_scores"]))  # runs before sensitivity_layers: all
        out["sensitivity"] = {str(i): s for i, s in zip(layers, sens["layer_scores"])}
        counts["sensitivity"] = len(sens["layer_scores"])
    for g, front in sorted(search.get("exhaustive", {}).items()):
        out[f"frontier_g{g}"] = {str(r["k"]): r["budget_score"] for r in front["frontier"]}
        out[f"selected_g{g}"] = {str(s["delta"]): s["plan"] for s in front["selected"]}
        if "evaluations" in front:
            counts[f"exhaustive_g{g}"] = front["evaluations"]
    if "greedy" in search:
        out["greedy"] = [{"plan": p["plan"], "score": p["score"]} for p in search["greedy"]["points"]]
        counts["greedy"] = search["greedy"]["evaluations"]
        if search["greedy"].get("budget") is not None:
            counts["greedy_budget"] = search["greedy"]["budget"]
    if counts:
        out["evaluations"] = counts
    if search.get("plan_means"):
        out["plan_means"] = search["plan_means"]
    if "cells_computed" in summary:
        out["cells_computed"] = summary["cells_computed"]
    return out


def cells_from_cache(run: Path) -> int:
    """Quality cells the run read from its cell cache (earlier runs or the committed seed)."""
    summary = json.loads((run / "summary.json").read_text())
    return summary.get("cells_from_earlier_runs", summary.get("cells_reused", 0))  # older runs: every reuse


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


def compare(got: dict, want: dict, tol: float, rtol: float, computed_all: bool = True) -> tuple[list[str], bool]:
    """(problems, exact): each problem a line saying what moved, by how much, against which tolerance.
    ``computed_all``: the run computed every cell itself, so its count of computed cells is compared."""
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
        ok = (abs(a - b) <= tol if kind == "abs"
              else math.isclose(a, b, rel_tol=rtol, abs_tol=CONTINUOUS_ABS))
        if not ok:
            limit = f"{tol} points" if kind == "abs" else f"rtol {rtol:g}, abs {CONTINUOUS_ABS:g}"
            problems.append(f"{name}: {a} vs golden {b} (diff {a - b:+.6g}, tolerance {limit})")

    def same(name: str, a, b, why: str = "") -> None:
        if a != b:
            problems.append(f"{name}: {a!r} != golden {b!r}" + (f" ({why})" if why else ""))

    for plan, score in want["quality"].items():
        close(f"quality[{plan}]", got["quality"].get(plan), score, "abs")
    for layer, cols in want["deviation"].items():
        for c, v in cols.items():
            close(f"deviation[layer {layer}].{c}", got["deviation"].get(layer, {}).get(c), v, "rel")
    sens = want.get("sensitivity") or {}
    for layer, v in (enumerate(sens) if isinstance(sens, list) else sens.items()):  # a list: every layer, in order
        close(f"sensitivity[layer {layer}]", (got.get("sensitivity") or {}).get(str(layer)), v, "abs")
    for key in sorted(k for k in want if k.startswith("frontier_g")):
        for k, v in want[key].items():
            close(f"{key}[k={k}]", got.get(key, {}).get(k), v, "abs")
    if any(got.get(k) != want.get(k) for k in want if k.startswith("selected_g")):
        exact = False  # a tie within noise may pick another plan; the scores above carry the check
    if "greedy" in want:
        steps = got.get("greedy") or []
        same("greedy steps", len(steps), len(want["greedy"]))
        for i, (g, w) in enumerate(zip(steps, want["greedy"])):
            same(f"greedy[step {i}].plan", g["plan"], w["plan"], "the walk took another path")
            close(f"greedy[step {i}] {w['plan']}", g["score"], w["score"], "abs")
    for key, n in (want.get("evaluations") or {}).items():
        same(f"evaluations[{key}]", (got.get("evaluations") or {}).get(key), n)
    for plan, means in (want.get("plan_means") or {}).items():
        for t, v in means.items():
            close(f"plan_means[{plan}].{t}", (got.get("plan_means") or {}).get(plan, {}).get(t), v, "rel")
    if "cells_computed" in want and computed_all:
        same("cells_computed", got.get("cells_computed"), want["cells_computed"])
    return problems, exact


COMMANDS = {"profile": "python -m ds_study.profile",
            "study": "python -m ds_study.profile --config-name golden_study"}


def check_or_write(action: str, path: Path, golden: Path | None = None, tol: float | None = None,
                   rtol: float = 1e-3, fresh: bool = False, kind: str = "profile") -> int:
    """``action`` "check": compare a run (``path``, or the newest default-pair run under a results
    root) with the golden file and print what moved; "write": make the golden file from the run.
    ``kind``: which golden file by default, ``profile`` or ``study`` (``golden_path``).
    Returns the exit status (0 passed/written, 1 failed)."""
    path = Path(path)
    if path.is_dir() and (path / "summary.json").exists():
        run = path
    else:
        default = golden or golden_path(kind=kind)
        gold = json.loads(default.read_text()) if default.exists() else {}
        run = newest_default_run(path, gold.get("pair", default_pair()), gold.get("dataset", "pycode"))
    got = golden_numbers(run)
    golden = golden or golden_path(got["pair"] if action == "write" else None, kind)
    reused = cells_from_cache(run)
    if action == "write":
        if reused:  # the count a fresh run computes is unknown: not in the golden file, so never compared
            got.pop("cells_computed", None)
            print(f"note: {run} read {reused} quality cells from its cell cache, so the golden file holds no count of "
                  f"cells computed; make it from `{COMMANDS[kind]} cells_root=DIR cells_seed=null` for one")
        env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
        search = json.loads((run / "search.json").read_text()) if (run / "search.json").exists() else {}
        got["produced_by"] = {"command": search.get("command") if kind == "study" else COMMANDS[kind], "env": env}
        write_json(golden, got, quiet=True)
        print(f"wrote {golden} from {run}")
        return 0
    want = json.loads(golden.read_text())
    if tol is None:
        tol = round(100.0 / max(1, want.get("n_examples") or 50), 2)
    tolerances = (f"tolerances: quality {tol:g} points (absolute); deviation, NLL and KL rtol {rtol:g} "
                  f"(abs {CONTINUOUS_ABS:g}); greedy plans, evaluation counts and cells computed exact")
    problems, exact = compare(got, want, tol, rtol, computed_all=not reused)
    if problems:
        print(f"GOLDEN CHECK FAILED: {run} against {golden}")
        print("\n".join("  " + p for p in problems))
        print("  " + tolerances)
        return 1
    if reused and fresh:
        print(f"GOLDEN CHECK FAILED: {run} read {reused} quality cells from its cell cache instead of computing "
              f"them; rerun with an empty cells_root and no seed ({COMMANDS[kind]} cells_root=DIR cells_seed=null)")
        return 1
    print(f"golden check passed: {run} matches {golden} " + ("exactly" if exact else "within tolerance"))
    print("  " + tolerances)
    if reused:
        print(f"  note: {reused} quality cells came from the cell cache (cells_root), so only the deviation "
              f"numbers were computed by this checkout; for a check of decoding and partial prefill too, run "
              f"`{COMMANDS[kind]} cells_root=/tmp/fresh-cells cells_seed=null` and check with --fresh (as CI does)")
    return 0

