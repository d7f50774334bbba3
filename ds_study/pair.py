"""A sender and a receiver model: loading, identity and the compatibility contract.

Cross-model KV reuse is only defined between models of one architecture (same layers, heads, head
dim) that tokenize text identically; anything else must be refused *before* any weights are
loaded. Each model's identity (name or path plus a hash of its weight files) goes into every
result, so a result always says exactly which two checkpoints it compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_study.arch import check_model_type

SHAPE_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class IncompatiblePair(ValueError):
    """Sender and receiver cannot share KV caches (shape or tokenizer mismatch)."""


class CorruptCheckpoint(ValueError):
    """A checkpoint's files are damaged: a manifest mismatch, an unreadable safetensors header, or
    weights or logits that are not finite (or degenerate). Its results would be silent garbage."""


CORRUPT_HINT = "restore or re-create the directory (a smol cache directory: delete it, smol:NAME rebuilds it)"


def resolve(ref: str) -> str:
    """``smol:NAME`` -> the SmolLM2-135M base or a committed fine-tune of it (fetched/merged into the
    cache on first use); ``zoo:NAME`` -> the 2M-parameter test fixture; a directory -> itself; else a
    Hub id."""
    if ref.startswith("smol:"):
        from ds_study.smol import variant_dir

        return str(variant_dir(ref[5:]))
    if ref.startswith("zoo:"):
        from ds_study.zoo import variant_path

        return str(variant_path(ref[4:]))
    return ref


def check_ref(ref: str, role: str = "model") -> None:
    """Refuse a model reference that names a local path that is not there, before transformers
    would (it reports such a path as a malformed Hub id, deep in a traceback). A reference is a path
    where it starts with '.', '/' or '~', or has more than one '/' (a Hub id is ``org/name``); an
    ``org/name`` that is no directory must be a Hub id already in the local cache when offline."""
    ref = str(ref)
    if ref.startswith(("zoo:", "smol:")):
        return
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"{role}={ref}: the directory has no config.json; pass a checkpoint directory "
                                    f"(saved with save_pretrained), zoo:NAME or smol:NAME")
        return
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or p.exists():
        what = "is a file, not a checkpoint directory" if p.exists() else "does not exist"
        raise FileNotFoundError(f"{role}={ref}: {what}; pass a checkpoint directory, zoo:NAME, smol:NAME "
                                f"or a Hub id (org/name)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(ref, "config.json")
        if not isinstance(config, str):
            raise FileNotFoundError(f"{role}={ref}: no such directory, and no Hub model {ref!r} in the local cache "
                                    f"(HF_HUB_OFFLINE=1); pass a checkpoint directory or download the model first")
        missing = missing_files(Path(config).parent)
        if missing:
            raise FileNotFoundError(f"{role}={ref}: the local cache holds its config but not {missing} "
                                    f"(HF_HUB_OFFLINE=1); finish the download: hf download {ref}")


def missing_files(path: Path) -> str | None:
    """What a checkpoint directory (a snapshot of the local Hub cache) lacks to be loaded, or None: a
    tokenizer, and weights: every shard its index lists, or at least one weight file (an interrupted
    download leaves some, or links to blobs that never arrived)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return "its tokenizer"
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text()).get("weight_map", {}).values()))
            gone = [f for f in shards if not (path / f).is_file()]
            return f"{len(gone)} of its {len(shards)} weight shards ({', '.join(gone[:2])}" \
                   f"{', ...' if len(gone) > 2 else ''})" if gone else None
    if not any(f.is_file() and f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
        return "its weights"
    return None


def config_ref(ref: str) -> str:
    """Where ``ref``'s config and tokenizer can be read cheaply: a smol variant's are the base's."""
    if ref.startswith("smol:"):
        from ds_study.smol import config_dir

        return str(config_dir(ref[5:]))
    return resolve(ref)


def local_dir(ref: str) -> Path:
    """Directory holding the files of a local checkpoint or of a Hub id already in the local cache."""
    p = Path(ref)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as e:  # noqa: BLE001 - re-raised with advice
        raise FileNotFoundError(f"model {ref!r} is neither a local directory nor a loadable Hub id ({e}); "
                                f"pass a local checkpoint directory or download it first") from e


def check_manifest(path: Path, role: str = "model") -> bool:
    """A checkpoint directory with a ``manifest.json`` holding a ``files`` map of sha256 (the smol
    cache's base and merged directories) is checked file by file; a mismatch is CorruptCheckpoint
    naming the file. Returns whether there was a manifest to check."""
    from ds_study import smol

    mpath = Path(path) / smol.MANIFEST
    if not mpath.is_file():
        return False
    try:
        if not isinstance(json.loads(mpath.read_text()).get("files"), dict):
            return False  # some other tool's manifest.json: not ours to judge
    except (OSError, ValueError, AttributeError):
        return False
    try:
        smol.verify_dir(Path(path))
    except smol.SmolError as e:
        raise CorruptCheckpoint(f"{role}={path}: {e}; {CORRUPT_HINT}") from None
    return True


def check_safetensors_headers(path: Path, role: str = "model") -> None:
    """Every ``*.safetensors`` file of ``path`` has a readable header whose tensors fit in the file
    (costs one small read per file). safetensors itself reports a garbled header as ``invalid JSON in
    header`` without naming the file, and a truncated one only when a tensor is read."""
    for f in sorted(Path(path).glob("*.safetensors")):
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little") if size >= 8 else -1
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError(f"truncated: its tensors need {8 + n + end} bytes, the file has {size}")
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
            raise CorruptCheckpoint(f"{role}={path}: {f.name} is not a readable safetensors file "
                                    f"({str(e).splitlines()[0][:160]}); {CORRUPT_HINT}") from None


@torch.no_grad()
def check_sane(model: torch.nn.Module, tokenizer, role: str, path) -> None:
    """Cheap sanity checks of loaded weights, for checkpoints without a manifest: every parameter
    finite, and the logits of one short forward finite and not degenerate (all equal)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CorruptCheckpoint(f"{role}={path}: weight {name} holds NaN or inf values; the checkpoint is "
                                    f"corrupt: {CORRUPT_HINT}")
    ids = tokenizer("def f(x):\n    return x  # The quick brown fox.")["input_ids"][:16] or [0]
    logits = model(torch.tensor([ids], device=next(model.parameters()).device)).logits.float()
    what = None
    if not torch.isfinite(logits).all():
        what = "non-finite (NaN or inf)"
    elif bool((logits.amax(-1) == logits.amin(-1)).all()):
        what = "degenerate (every token scored alike)"
    if what:
        raise CorruptCheckpoint(f"{role}={path}: the model's logits on a short probe are {what}; the checkpoint "
                                f"is corrupt or untrained: {CORRUPT_HINT}")


def weights_sha256(path: Path) -> str:
    """sha256 over (name, sha256) of every weight file, memoized by path, size and mtime."""
    memo_path = Path(os.environ.get("DS_STUDY_CACHE", Path.home() / ".cache" / "ds_study")) / "weight_hashes.json"
    try:
        memo = json.loads(memo_path.read_text()) if memo_path.exists() else {}
    except (OSError, ValueError):  # torn or foreign: it is only a cache, rebuild it
        memo = {}
    known = len(memo)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {path}")
    outer = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in memo:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            memo[key] = h.hexdigest()
        outer.update(f"{f.name}:{memo[key]}\n".encode())
    if len(memo) != known:  # atomically: worker processes read it while another may be writing
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_name(f"{memo_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps(memo))
            os.replace(tmp, memo_path)
        except OSError:
            pass
    return outer.hexdigest()


def shape_of(config) -> dict:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    out = {f: getattr(text, f, None) for f in SHAPE_FIELDS}
    if out["head_dim"] is None:
        out["head_dim"] = text.hidden_size // text.num_attention_heads
    return out


def check_compatible(receiver_config, sender_config, receiver_tok, sender_tok,
                     receiver_ref: str = "receiver", sender_ref: str = "sender") -> None:
    """Raise IncompatiblePair naming the first mismatch; checks configs and tokenizers only."""
    for name, cfg in ((receiver_ref, receiver_config), (sender_ref, sender_config)):
        check_model_type(cfg.model_type, name)
    rs, ss = shape_of(receiver_config), shape_of(sender_config)
    for f in SHAPE_FIELDS:
        if rs[f] != ss[f]:
            raise IncompatiblePair(f"cannot share KV between {sender_ref} and {receiver_ref}: {f} differs "
                                   f"(sender {ss[f]}, receiver {rs[f]}); DroidSpeak needs one architecture")
    if receiver_tok.get_vocab() != sender_tok.get_vocab():
        diff = len(set(receiver_tok.get_vocab().items()) ^ set(sender_tok.get_vocab().items()))
        raise IncompatiblePair(f"tokenizers of {sender_ref} and {receiver_ref} differ ({diff} vocabulary entries); "
                               f"the same context would become different tokens")
    # BOS starts every shared prefix, so it must agree. EOS only ends an answer and may differ: an
    # instruct model ends its turn with another token than its base (Llama-3: <|eot_id|>, <|end_of_text|>);
    # decoding then stops at either (ModelPair.eos_ids).
    if receiver_tok.bos_token_id != sender_tok.bos_token_id:
        raise IncompatiblePair(f"tokenizers of {sender_ref} and {receiver_ref} differ in bos_token_id")
    probe = "def f(x):\n    return x  # The quick brown fox, 2024-11-27."
    if receiver_tok(probe)["input_ids"] != sender_tok(probe)["input_ids"]:
        raise IncompatiblePair(f"tokenizers of {sender_ref} and {receiver_ref} tokenize text differently")


@dataclass
class ModelPair:
    receiver: torch.nn.Module
    sender: torch.nn.Module
    tokenizer: object
    receiver_id: dict
    sender_id: dict
    shape: dict = field(default_factory=dict)
    eos_ids: tuple[int, ...] = ()  # tokens that end an answer: each model's EOS (empty: the tokenizer's)

    @property
    def stop_ids(self) -> set[int]:
        """Decoding stops at any of these: the receiver's and the sender's EOS."""
        return set(self.eos_ids) or {self.tokenizer.eos_token_id}

    @property
    def pad_id(self) -> int:
        """What padded batches are filled with (masked out): the tokenizer's pad token, else its EOS
        (Llama-3, Mistral and Mixtral tokenizers have no pad token)."""
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    @property
    def n_layers(self) -> int:
        return self.shape["num_hidden_layers"]

    @property
    def device(self) -> torch.device:
        return next(self.receiver.parameters()).device

    def identities(self) -> dict:
        return {"receiver": self.receiver_id, "sender": self.sender_id}


def load_pair(receiver: str, sender: str, dtype: str = "float32", device: str = "cpu",
              attn_implementation: str = "sdpa") -> ModelPair:
    """Resolve, check compatibility on configs and tokenizers, then load both models (eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    check_ref(receiver, "receiver")
    check_ref(sender, "sender")
    cheap = {"receiver": config_ref(receiver), "sender": config_ref(sender)}  # no adapter merge before the check
    configs = {k: AutoConfig.from_pretrained(v) for k, v in cheap.items()}
    toks = {k: AutoTokenizer.from_pretrained(v) for k, v in cheap.items()}
    check_compatible(configs["receiver"], configs["sender"], toks["receiver"], toks["sender"], receiver, sender)
    refs = {"receiver": resolve(receiver), "sender": resolve(sender)}
    models, ids = {}, {}
    for k, ref in refs.items():
        name = receiver if k == "receiver" else sender
        where = local_dir(ref)
        if not str(name).startswith(("smol:", "zoo:")):  # those are verified by resolve() already
            check_manifest(where, k)
        check_safetensors_headers(where, k)
        ids[k] = {"name": name, "path": str(ref), "weights_sha256": weights_sha256(where)}
        try:
            models[k] = AutoModelForCausalLM.from_pretrained(ref, dtype=DTYPES[dtype],
                                                             attn_implementation=attn_implementation).to(device).eval()
        except Exception as e:  # noqa: BLE001 - safetensors' own errors do not name the file
            if type(e).__name__ != "SafetensorError":
                raise
            raise CorruptCheckpoint(f"{k}={where}: a weight file is not a readable safetensors file "
                                    f"({str(e).splitlines()[0][:160]}); {CORRUPT_HINT}") from None
        check_sane(models[k], toks[k], k, where)
    return ModelPair(models["receiver"], models["sender"], toks["receiver"], ids["receiver"], ids["sender"],
                     shape_of(configs["receiver"]),
                     tuple(sorted({t.eos_token_id for t in toks.values() if t.eos_token_id is not None})))
