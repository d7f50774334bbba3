"""Manifests of built checkpoints and adapters: the sha256 of every file, checked before a load.

Both model families (the tiny fixture in ``ds_study.zoo``, the smol base and adapters in
``ds_study.smol``) commit or cache files with a ``manifest.json`` beside them, and refuse to load
a file whose hash differs. The hashing, the check and the canonical form of the one file
transformers writes differently from run to run live here, below both families, so that neither
imports the other. Nothing heavy is imported: ``ds_study.smol`` promises nothing happens at import.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "manifest.json"
LOAD_TIME_TOKENIZER_KEYS = ("is_local", "local_files_only")  # how a tokenizer was loaded, not what it is


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """Relative posix path -> sha256 of every file under ``root`` (subfolders too), the manifest aside."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def first_bad_file(root: Path, files: dict[str, str], manifest: Path) -> tuple[Path, str] | None:
    """(path, "is missing" | "is corrupt (sha256 differs from <manifest>)") of the first file of a
    manifest's ``files`` map that is absent or whose sha256 differs; None when every file matches.
    Shared by every manifest check."""
    for rel, want in files.items():
        p = Path(root) / rel
        if not p.is_file():
            return p, "is missing"
        if sha256_file(p) != want:
            return p, f"is corrupt (sha256 differs from {manifest})"
    return None


def check_committed(root: Path, manifest: dict, what: str, error: type[Exception], hint: str = "") -> dict:
    """``manifest`` when every file it lists under ``root`` (files committed to git) matches; else
    ``error`` naming the first bad ``what`` file and how to restore it (``hint`` adds another way)."""
    bad = first_bad_file(Path(root), manifest["files"], Path(root) / MANIFEST)
    if bad:
        raise error(f"{what} file {bad[0]} {bad[1]}; restore it with `git checkout -- {bad[0]}`{hint}")
    return manifest


def canonical_tokenizer_config(path: Path) -> None:
    """Drop the keys transformers records about how the tokenizer was loaded (from a local folder,
    with HF_HUB_OFFLINE set or not): they made identical builds hash differently. Written the way
    transformers writes the file."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    kept = {k: v for k, v in cfg.items() if k not in LOAD_TIME_TOKENIZER_KEYS}
    if kept != cfg:
        path.write_text(json.dumps(kept, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
