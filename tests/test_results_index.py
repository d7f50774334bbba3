"""results/README.md indexes results/ (issue 18, "Results"): every tracked top-level entry has a row
saying what it is, what made it and what reads it; every row names a tracked entry; and no committed
run folder is left that nothing refers to."""

from __future__ import annotations

import re
import subprocess

import pytest

from ds_study import runner

ROOT = runner.REPO_ROOT
INDEX = ROOT / "results" / "README.md"
# the folder name runner.new_run_dir gives every run: <stamp>_<job>_<pair>_<dataset>[_k]
RUN_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}_\w+")
# where a run folder may be referred to by name
REFERRING = (".py", ".md", ".json", ".jsonl", ".yaml", ".yml", ".csv", ".txt", ".toml")

pytestmark = pytest.mark.skipif(not runner.in_checkout(), reason="needs the git checkout (git ls-files)")


def tracked(*paths: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return [p for p in out.split("\0") if p]


def top_level(files: list[str]) -> set[str]:
    """results/<entry>[/...] -> "entry/" for a folder, "entry" for a file."""
    entries = set()
    for f in files:
        parts = f.split("/")
        if parts[0] == "results" and len(parts) >= 2:
            entries.add(parts[1] + "/" if len(parts) > 2 else parts[1])
    return entries - {"README.md"}


def indexed(text: str) -> dict[str, list[str]]:
    """The index table's rows: the backticked names of the first cell -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| `") or len(cells) < 4:
            continue
        for name in re.findall(r"`([^`]+)`", cells[0]):
            rows[name] = cells[1:]
    return rows


def unreferenced_run_folders(files: list[str], read) -> list[str]:
    """Committed run folders (a path component named like runner.new_run_dir's folders) whose name
    appears in no tracked text file outside the folder itself; ``read(path)`` gives a file's text."""
    folders = {}
    for f in files:
        parts = f.split("/")
        for i, part in enumerate(parts[:-1]):
            if RUN_FOLDER.fullmatch(part):
                folders.setdefault("/".join(parts[: i + 1]), part)
                break
    if not folders:
        return []
    texts = {f: read(f) for f in files if f.endswith(REFERRING)}
    return sorted(folder for folder, name in folders.items()
                  if not any(name in text for f, text in texts.items() if not f.startswith(folder + "/")))


def test_every_tracked_entry_of_results_is_indexed_and_every_row_is_tracked():
    entries = top_level(tracked("results"))
    rows = indexed(INDEX.read_text())
    assert entries, "git ls-files results found nothing"
    assert not entries - set(rows), f"add a row to results/README.md for: {sorted(entries - set(rows))}"
    assert not set(rows) - entries, f"results/README.md lists untracked entries: {sorted(set(rows) - entries)}"
    for name, (what, made_by, read_by, *_) in rows.items():
        assert what and made_by and read_by, f"results/README.md: {name} needs what it is, what made it, what reads it"


def test_no_committed_run_folder_is_unreferenced():
    files = tracked()
    dangling = unreferenced_run_folders(files, lambda f: (ROOT / f).read_text(errors="replace")
                                        if (ROOT / f).is_file() else "")
    assert not dangling, (f"committed run folders that nothing refers to: {dangling}; `git rm -r` them, or "
                          "name them in the document or result file that relies on them")


def test_the_run_folder_check_catches_an_unreferenced_run():
    run = "results/runs/2026-11-27_19-50-52_profile_tiny_pycode"
    files = [f"{run}/summary.json", f"{run}/config.yaml", "README.md", "results/search/tiny/pycode/search.json"]
    texts = {f"{run}/summary.json": "2026-11-27_19-50-52_profile_tiny_pycode", "README.md": "no runs here",
             "results/search/tiny/pycode/search.json": "{}", f"{run}/config.yaml": ""}
    assert unreferenced_run_folders(files, texts.__getitem__) == [run]  # its own files do not count
    texts["README.md"] = f"the frontier of `{run}`"
    assert unreferenced_run_folders(files, texts.__getitem__) == []
    assert unreferenced_run_folders(["results/study/tiny/pycode/quality.json"], texts.get) == []


def test_the_index_parser_reads_rows_with_several_names():
    text = "| entry | what | made by | read by |\n|---|---|---|---|\n| `a.json`, `a.md` | x | `cmd` | y |\n"
    assert indexed(text) == {"a.json": ["x", "`cmd`", "y"], "a.md": ["x", "`cmd`", "y"]}
    assert top_level(["results/a.json", "results/cells/p/x.jsonl", "results/README.md", "ds_study/x.py"]) \
        == {"a.json", "cells/"}
