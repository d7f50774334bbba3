"""What the study cost, read from the cells themselves: ``python -m ds_study.cost``.

Every cell records the wall-clock seconds its plan took on its batch, divided by the batch's
examples (the first plan of a batch also carries the batch's captures and reference pass), so the
sum over a pair's cells is the compute time that pair's results took, whatever session, machine
state or interruption they were made in. This is the measured cost the README states, broken
down by what the cells were for. Cells computed while other jobs shared the cores count their
slower time: the figures are upper bounds for an idle machine.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from ds_study.runner import REPO_ROOT

CELL_FILE = re.compile(r"(?P<dataset>[a-z0-9_]+)_(?P<split>profile|test)_(?P<key>[0-9a-f]+)_(?P<dtype>\w+?)_(?P<device>cpu|cuda\w*)\.jsonl")


def part_of(plan: str) -> str:
    """What a plan's cells are for, by its name (the plan kinds' labels, ds_study.plan_kinds)."""
    if plan in ("full_prefill", "full_reuse", "sender"):
        return "baselines (Fig. 6)"
    if plan.startswith("reuse_only:"):
        return "single-layer sensitivity (Fig. 7, 8)"
    if plan.startswith("cacheblend"):
        return "CacheBlend"
    if plan.startswith("groups:"):
        return "recompute groups, one (Fig. 11)" if plan.count(",") == 0 else "recompute groups, several (greedy, Fig. 10)"
    return "other"


def cell_costs(path: Path) -> list[dict]:
    """(plan, seconds, batch) of every cell in one cell file that recorded its time."""
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by a kill (CellStore ends it and recomputes the cell)
        if isinstance(row, dict) and row.get("seconds") is not None:
            out.append({"plan": row["plan"], "seconds": float(row["seconds"]), "batch": row.get("batch", 1)})
    return out


def summarize(cells_root: Path) -> list[dict]:
    """One row per (pair, dataset, split, part): cells, CPU hours, median seconds per cell."""
    rows = []
    for path in sorted(cells_root.glob("*/*.jsonl")):
        m = CELL_FILE.fullmatch(path.name)
        if m is None:
            continue
        parts: dict[str, list[float]] = {}
        for c in cell_costs(path):
            parts.setdefault(part_of(c["plan"]), []).append(c["seconds"])
        for part, secs in sorted(parts.items()):
            rows.append({"pair": path.parent.name, "dataset": m["dataset"], "split": m["split"], "device": m["device"],
                         "part": part, "cells": len(secs), "hours": round(sum(secs) / 3600, 3),
                         "median_s_per_cell": round(statistics.median(secs), 3)})
    return rows


def markdown(rows: list[dict], cells_root: Path) -> str:
    lines = ["# What the committed results cost", "",
             f"Sums of the wall-clock seconds each cell recorded (`seconds`: its plan's time on its batch per "
             f"example), from `{cells_root.relative_to(REPO_ROOT) if cells_root.is_relative_to(REPO_ROOT) else cells_root}`. "
             "Made by `python -m ds_study.cost`. Cells computed while other jobs shared the 2 cores carry their "
             "slower times, so these are upper bounds for an idle machine.", "",
             "| pair | dataset | split | device | what | cells | hours | median s/cell |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pair']} | {r['dataset']} | {r['split']} | {r['device']} | {r['part']} | {r['cells']} | "
                     f"{r['hours']:.2f} | {r['median_s_per_cell']:.2f} |")
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["pair"]] = totals.get(r["pair"], 0.0) + r["hours"]
    lines += ["", "Per pair, every split: " + "; ".join(f"{p} {h:.2f} h" for p, h in sorted(totals.items())), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default=str(REPO_ROOT / "results" / "cells"), help="a cells root (default: the committed one)")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    args = ap.parse_args(argv)
    root = Path(args.cells).resolve()
    if not root.is_dir():
        raise SystemExit(f"no cells directory at {root}; pass --cells DIR")
    text = markdown(summarize(root), root)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
