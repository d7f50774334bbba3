"""Wall time of the whole study plus exhaustive g=1 profiling on one pair, from an empty cell store.

    python scripts/bench_study.py                      # default pair (tiny), 50 profiling examples
    python scripts/bench_study.py --pair tiny --threads 2

Runs, as separate processes exactly as a user would:
  1. python -m ds_study.profile model_pair=PAIR search.granularity=[1,2] search.method=both
     (baselines, deviation, sensitivity, exhaustive g=1 (g=2 is a subset), greedy, selection)
  2. python -m ds_study.study model_pair=PAIR     (quality, sensitivity, propagation, transfer)
with cells/results under a fresh scratch directory (or --root) and no committed seed cells
(cells_seed=null), so nothing is reused from earlier runs; with --root the root's search/ and study/
also get the stable per-pair files (search.publish=true, study.publish=true). Prints the time and
the number of cells evaluated (and reused) per command and writes <root>/study/bench_<pair>.json
(--root results: the committed results/study/bench_<pair>.json; without --root: the scratch dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ds_study import runner
from ds_study.records import write_json

ROOT = runner.REPO_ROOT


def latest_summary(runs: Path, job: str) -> dict:
    dirs = sorted(runs.glob(f"*_{job}_*"), key=lambda p: p.stat().st_mtime)
    return json.loads((dirs[-1] / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="tiny")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--limit", type=int, default=None, help="first N examples only (default: all 50)")
    ap.add_argument("--workers", default=None, help="cell-evaluating processes (default: the configs' default)")
    ap.add_argument("--root", default=None,
                    help="results root for cells/, runs/, search/, study/ (default: a new temp dir; "
                         "'results' fills the committed results in place, timing only what is not there yet)")
    ap.add_argument("--out", default=None, help="directory of bench_<pair>.json (default: <root>/study)")
    a = ap.parse_args()

    scratch = Path(a.root or tempfile.mkdtemp(prefix="ds_bench_"))
    common = [f"model_pair={a.pair}", f"cells_root={scratch / 'cells'}", "cells_seed=null",
              f"results_root={scratch / 'runs'}"]
    common += [f"threads={a.threads}"] if a.threads else []
    common += [f"limit={a.limit}"] if a.limit else []
    common += [f"workers={a.workers}"] if a.workers else []
    # the profile step runs the full search (exhaustive g=1 and g=2, greedy) that the default profile
    # run leaves out (it profiles at g=2, as the paper)
    full_search = ["search.granularity=[1,2]", "search.method=both"]
    publish = []
    if a.root:  # the root's search/ and study/ get the stable per-pair files too (--root results: the committed ones)
        full_search.append("search.publish=true")
        publish.append("study.publish=true")
    steps = [("profile", ["-m", "ds_study.profile", *common, *full_search]),
             ("study", ["-m", "ds_study.study", *common, *publish])]
    env = runner.environment("cpu")
    report = {"pair": a.pair, "threads": a.threads, "workers": a.workers, "limit": a.limit, "cpu_count": env["cpu_count"],
              "machine": env["device_name"], "root": str(scratch),
              "load_average_before": os.getloadavg(), "steps": {}}
    t_all = time.perf_counter()
    for job, args in steps:
        t = time.perf_counter()
        subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        s = latest_summary(scratch / "runs", job)
        report["steps"][job] = {"command": "python " + " ".join(args), "wall_seconds": round(wall, 1),
                                "cells_computed": s["cells_computed"], "cells_reused": s["cells_reused"]}
        print(f"{job:<8} {wall:7.1f} s  {s['cells_computed']:6d} cells computed, {s['cells_reused']:6d} reused")
    report["wall_seconds"] = round(time.perf_counter() - t_all, 1)
    report["load_average_after"] = os.getloadavg()  # other jobs on the machine slow the benchmark down
    report["cells_computed"] = sum(s["cells_computed"] for s in report["steps"].values())
    report["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = write_json(Path(a.out or scratch / "study") / f"bench_{a.pair}.json", report, indent=2, quiet=True)
    print(f"total    {report['wall_seconds']:7.1f} s  {report['cells_computed']:6d} cells computed -> {out}")


if __name__ == "__main__":
    main()
