"""A damaged checkpoint directory is refused with a message naming it, never evaluated into garbage
(issue 17): a manifest mismatch, non-finite weights, a garbled or truncated safetensors header."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ds_study import pair as pair_mod
from ds_study.pair import CorruptCheckpoint, load_pair

ZOO = Path(pair_mod.__file__).resolve().parent / "assets" / "zoo"


@pytest.fixture(autouse=True)
def own_hash_memo(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_STUDY_CACHE", str(tmp_path / "cache"))  # keep the user's weight-hash memo clean


def copy_code(tmp_path: Path) -> Path:
    d = tmp_path / "code"
    shutil.copytree(ZOO / "code", d)
    return d


def header_len(f: Path) -> int:
    return int.from_bytes(f.read_bytes()[:8], "little")


def overwrite(f: Path, offset: int, data: bytes) -> None:
    with open(f, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def nan_bytes(d: Path) -> None:
    """64 bytes of 0xFF (16 float32 NaNs) into the tensor data, just after the header."""
    f = d / "model.safetensors"
    overwrite(f, 8 + header_len(f) + 1024, b"\xff" * 64)


def write_manifest(d: Path) -> None:
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}
    (d / "manifest.json").write_text(json.dumps({"files": files}))


def test_intact_copy_loads(tmp_path):
    d = copy_code(tmp_path)
    write_manifest(d)
    p = load_pair(str(d), str(ZOO / "qa"))
    assert p.receiver_id["path"] == str(d)


def test_nan_weights_without_manifest_are_refused(tmp_path):
    d = copy_code(tmp_path)
    nan_bytes(d)
    with pytest.raises(CorruptCheckpoint, match=r"receiver=.*code: weight .* NaN or inf") as e:
        load_pair(str(d), str(ZOO / "qa"))
    assert str(d) in str(e.value) and "\n" not in str(e.value)


def test_degenerate_logits_are_refused(tmp_path):
    """Finite weights but a zeroed head: every token gets the same logit."""
    import torch
    from safetensors.torch import load_file, save_file

    d = copy_code(tmp_path)
    sd = load_file(d / "model.safetensors")
    head = "lm_head.weight" if "lm_head.weight" in sd else "model.embed_tokens.weight"
    sd[head] = torch.zeros_like(sd[head])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptCheckpoint, match=r"logits on a short probe are degenerate") as e:
        load_pair(str(ZOO / "qa"), str(d))
    assert f"sender={d}" in str(e.value)


def test_manifest_mismatch_names_the_file(tmp_path):
    d = copy_code(tmp_path)
    write_manifest(d)
    nan_bytes(d)
    with pytest.raises(CorruptCheckpoint, match=r"model\.safetensors is corrupt \(sha256 differs") as e:
        load_pair(str(d), str(ZOO / "qa"))
    assert str(d / "model.safetensors") in str(e.value) and "restore or re-create" in str(e.value)


@pytest.mark.parametrize("damage, says", [
    (lambda f: overwrite(f, 8, b"{garbage!"), "not a readable safetensors file"),
    (lambda f: f.write_bytes(f.read_bytes()[:4000]), "not a readable safetensors file"),   # cut inside the header
    (lambda f: f.write_bytes(f.read_bytes()[:-4096]), r"truncated: its tensors need"),     # cut inside the data
])
def test_garbled_or_truncated_safetensors_names_the_file(tmp_path, damage, says):
    d = copy_code(tmp_path)
    damage(d / "model.safetensors")
    with pytest.raises(CorruptCheckpoint, match=says) as e:
        load_pair(str(d), str(ZOO / "qa"))
    assert f"receiver={d}: model.safetensors" in str(e.value)


def test_cli_reports_a_corrupt_receiver_in_one_or_two_lines(tmp_path):
    d = copy_code(tmp_path)
    nan_bytes(d)
    r = subprocess.run([sys.executable, "-m", "ds_study.evaluate", "model_pair=tiny", f"model_pair.receiver={d}",
                        "limit=1", f"results_root={tmp_path}/runs", f"cells_root={tmp_path}/cells"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "DS_STUDY_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr[r.stderr.index("error: "):]  # transformers' loading bar comes before it
    lines = err.strip().splitlines()
    assert len(lines) == 2 and str(d) in lines[0] and "NaN or inf" in lines[0] and "Traceback" not in r.stderr
