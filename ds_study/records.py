"""What a measurement records besides its numbers, and how result files are written.

The benchmark command lines in ``scripts/`` (engine, loaders, batching, profiling cost) all say
where they ran and write JSON, CSV and JSONL files under ``results/``; they do it through here, so
a result file of one looks like that of another:

- ``command_line``: the command as it was typed (``python scripts/...``), as results record it;
- ``bench_environment``: ``runner.environment``'s versions and commit, plus the command, the local
  time, the CPU model and the load average at the start (``loadavg_end`` is added at the end);
- ``write_json`` / ``write_csv`` / ``write_jsonl`` / ``write_text``: parents created, the path said on
  stdout (``quiet`` to not), ``.gz`` written reproducibly.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path


def command_line(argv: list[str] | None = None) -> str:
    """``python`` and the arguments of this process (or ``argv``, script first)."""
    return "python " + " ".join(sys.argv if argv is None else argv)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def bench_environment() -> dict:
    """Where a CPU benchmark ran: the record of results/engine/*.json ``environment``."""
    from ds_study import runner  # torch and the model stack: only where an environment is recorded

    env = runner.environment("cpu")
    return {"command": command_line(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "git_commit": env["git_commit"] or "", "torch": env["torch"], "transformers": env["transformers"],
            "python": env["python"], "cpu": cpu_model(), "cpu_count": env["cpu_count"],
            "torch_threads": env["torch_threads"], "loadavg_start": os.getloadavg()}


def shown(path: Path) -> Path:
    """A path as printed: relative to the checkout where it lies inside it."""
    from ds_study.runner import REPO_ROOT

    path = Path(path).resolve()
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def _written(path: Path, quiet: bool) -> Path:
    if not quiet:
        print(f"wrote {shown(path)}")
    return path


def write_json(path: Path, obj, indent: int = 1, quiet: bool = False) -> Path:
    """``obj`` as indented JSON (one trailing newline), the folder made if need be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent) + "\n")
    return _written(path, quiet)


def write_csv(path: Path, rows: list[dict], quiet: bool = False) -> Path:
    """Rows as CSV, the columns every row's keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    return _written(path, quiet)


def write_text(path: Path, text: str, quiet: bool = False) -> Path:
    """``text`` to ``path``; a ``.gz`` path is gzipped with mtime 0, so a rerun is byte-identical."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(text.encode())
    else:
        path.write_text(text)
    return _written(path, quiet)


def write_jsonl(path: Path, rows: list[dict], quiet: bool = False, ensure_ascii: bool = True) -> Path:
    """One JSON object a line (gzipped for a ``.gz`` path, as ``write_text``)."""
    return write_text(path, "".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in rows), quiet)
