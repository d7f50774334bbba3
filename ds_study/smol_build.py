"""Build the smol family's fine-tunes: LoRA adapters of SmolLM2-135M on the embedded tasks.

Each variant is trained from the fetched base (``ds_study.smol``) on its task's train split, with
the recipe in ``ds_study/conf/zoo_smol.yaml``, deterministically on CPU. What is committed is the adapter
(safetensors, rounded to ``save_dtype``) and a manifest with its sha256, the exact recipe, the
data hashes, train and validation losses, build time and machine, so that nobody waits for
training and anyone can check a rebuild:

    python -m ds_study.zoo build family=smol                          # rebuild into outputs/smol_rebuild, compare
    python -m ds_study.zoo build family=smol out=ds_study/assets/smol # rebuild the committed adapters
    python -m ds_study.zoo build family=smol verify_only=true         # check the committed adapters

A variant whose folder already holds a finished adapter of the same recipe is kept, so an
interrupted build resumes with the next variant.
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ds_study import smol, training
from ds_study.manifests import MANIFEST, sha256_file
STATS = "build.json"


def recipe_of(cfg: DictConfig, name: str) -> dict:
    """Everything that determines one adapter's weights."""
    c = OmegaConf.to_container(cfg, resolve=True)
    return {"variant": name, **c["variants"][name], "seed": c["seed"], "threads": c["threads"],
            "device": c["device"], "max_length": c["max_length"], "save_dtype": c["save_dtype"],
            "base_gguf_sha256": smol.GGUF_SHA256}


def _recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _data_files(task: str) -> list[Path]:
    from ds_study.data import EMBEDDED_ROOT

    return [EMBEDDED_ROOT / task / "train.jsonl.gz", EMBEDDED_ROOT / task / "profile.jsonl"]


def _round_adapter(model, dtype: torch.dtype) -> None:
    """Round the trainable (LoRA) weights to the committed dtype in place, so the losses reported
    are those of the adapter as committed."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(p.to(dtype).to(p.dtype))


def canonical_adapter_config(cfg_path: Path) -> None:
    """The same adapter gives the same bytes: the base as ``smol:base`` (not this machine's cache
    path) and target modules sorted (peft keeps them as a set, whose order follows the hash seed)."""
    acfg = json.loads(cfg_path.read_text())
    acfg["base_model_name_or_path"] = "smol:base"
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")


def _save_adapter(model, path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    model.save_pretrained(path, safe_serialization=True)
    f = path / "adapter_model.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in sorted(load_file(f).items())}, f)
    canonical_adapter_config(path / "adapter_config.json")
    readme = path / "README.md"  # peft's model card template: not part of the adapter
    if readme.exists():
        readme.unlink()


def build_variant(cfg: DictConfig, name: str, out: Path, base: Path) -> dict:
    """Train one adapter into ``out/name``; its stats (also written to ``out/name/build.json``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    v = cfg.variants[name]
    recipe = recipe_of(cfg, name)
    done = out / name / STATS
    data_hashes = {p.relative_to(p.parents[4]).as_posix(): sha256_file(p) for p in _data_files(v.task)}
    if done.is_file():
        prev = json.loads(done.read_text())
        if prev.get("recipe_key") == _recipe_key(recipe) and prev.get("data") == data_hashes:
            print(f"variant {name}: finished earlier with the same recipe and data, kept")
            return prev
    t0 = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).to(cfg.device)
    lcfg = LoraConfig(r=v.rank, lora_alpha=v.alpha, lora_dropout=0.0, target_modules=list(v.targets),
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    if v.loss_on not in ("answer", "all"):
        raise ValueError(f"variant {name}: loss_on must be 'answer' or 'all', got {v.loss_on!r}")
    train = training.finetune_examples(tok, v.task, "train", cfg.max_length, 1, cfg.seed, v.loss_on)
    val = training.finetune_examples(tok, v.task, "profile", cfg.max_length)[: cfg.val_examples]
    order = random.Random(cfg.seed + 1).sample(range(len(train)), len(train))
    pad = tok.pad_token_id

    def batches(step):
        idx = [order[(step * v.batch_size + k) % len(order)] for k in range(v.batch_size)]
        return training.collate([train[i] for i in idx], pad, cfg.device)

    losses = training.train(model, batches, v.steps, v.lr, max(1, v.steps // 10), 0.0, f"finetune smol {name}")
    dtype = getattr(torch, cfg.save_dtype)
    _round_adapter(model, dtype)
    val_batches = [training.collate(val[k:k + 4], pad, cfg.device) for k in range(0, len(val), 4)]
    val_loss = training.mean_loss(model, val_batches)
    with model.disable_adapter():
        base_val = training.mean_loss(model, val_batches)
    path = out / name
    if path.exists():
        shutil.rmtree(path)
    _save_adapter(model, path, dtype)
    stats = {"recipe_key": _recipe_key(recipe), "recipe": recipe,
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "examples_seen": v.steps * v.batch_size,
             "final_train_loss": round(sum(losses[-10:]) / len(losses[-10:]), 4),
             "val_loss": round(val_loss, 4), "base_val_loss": round(base_val, 4),
             "data": data_hashes,
             "seconds": round(time.time() - t0, 1)}
    done.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def build(cfg: DictConfig, out: Path) -> dict:
    """Build (or resume) every variant into ``out`` and write its manifest."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=str(cfg.device).startswith("cuda"))
    base = smol.ensure_base()
    out.mkdir(parents=True, exist_ok=True)
    names = list(cfg.only) if cfg.get("only") else list(cfg.variants)
    unknown = [n for n in names if n not in cfg.variants]
    if unknown:
        raise ValueError(f"only={unknown}: not variants of the recipe; known: {list(cfg.variants)}")
    prev = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {"variants": {}}
    variants = {k: v for k, v in prev.get("variants", {}).items() if k in cfg.variants}
    for name in names:
        variants[name] = build_variant(cfg, name, out, base)
    files = {}
    for name in sorted(variants):
        for p in sorted((out / name).iterdir()):
            files[f"{name}/{p.name}"] = sha256_file(p)
    manifest = {
        "family": "smol",
        "base": json.loads((base / MANIFEST).read_text())["source"],
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "variants": variants,
        "build": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                  "processor": platform.processor(), "device": cfg.device, "threads": cfg.threads,
                  "seconds": round(sum(v["seconds"] for v in variants.values()), 1)},
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def compare(built: dict, reference: dict) -> list[str]:
    """Adapter files that differ between two manifests (empty: bit-identical)."""
    a, b = built["files"], reference["files"]
    keys = sorted(k for k in set(a) | set(b) if k.endswith(".safetensors") or k.endswith("adapter_config.json"))
    return [f"{k}: {'missing' if k not in a else 'extra' if k not in b else 'differs'}"
            for k in keys if a.get(k) != b.get(k)]
