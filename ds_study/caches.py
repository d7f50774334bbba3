"""Per-layer K, V and E of one context, as one model computed them.

K and V are stored exactly as the model's attention consumes them (post-RoPE keys, shape
``[batch, kv_heads, tokens, head_dim]``). E is the residual-stream hidden state *entering* each
decoder layer (before its input norm), ``[batch, tokens, hidden]``: it is what a receiver needs to
restart computation at a transition layer (paper §4.1), and for Llama-3-like GQA it is 2x one
layer's KV. Caches save to safetensors with the producer's identity and a checksum that is
verified on load: a corrupt cache is an error, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("k", "v", "e")


class CacheChecksumError(ValueError):
    """A stored cache does not match its checksum."""


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class ContextCache:
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    embeds: list[torch.Tensor] | None = None  # E per layer; None when not captured
    model_id: dict = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def n_tokens(self) -> int:
        return self.keys[0].shape[-2]

    def tensor(self, kind: str, layer: int) -> torch.Tensor:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if kind == "e" and self.embeds is None:
            raise ValueError("this cache was captured without E (hidden states)")
        return {"k": self.keys, "v": self.values, "e": self.embeds}[kind][layer]

    def nbytes(self, kind: str, layer: int) -> int:
        t = self.tensor(kind, layer)
        return t.numel() * t.element_size()

    def bytes_per_token(self, kind: str, layer: int = 0) -> float:
        return self.nbytes(kind, layer) / self.n_tokens

    def context_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.token_ids).encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, torch.Tensor]:
        out = {f"k.{i}": k for i, k in enumerate(self.keys)} | {f"v.{i}": v for i, v in enumerate(self.values)}
        if self.embeds is not None:
            out |= {f"e.{i}": e for i, e in enumerate(self.embeds)}
        return out

    def checksum(self) -> str:
        return tensors_sha256(self.as_dict())

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.as_dict().items()}
        meta = {"model_id": json.dumps(self.model_id), "token_ids": json.dumps(self.token_ids),
                "n_layers": str(self.n_layers), "format": CACHE_FORMAT}
        meta["checksum"] = _file_checksum(tensors, meta)
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> "ContextCache":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") not in ("ds_study.cache/1", CACHE_FORMAT):
            raise CacheChecksumError(f"{path} is not a ds_study cache file")
        want = tensors_sha256(tensors) if meta["format"] == "ds_study.cache/1" else _file_checksum(tensors, meta)
        if want != meta.get("checksum"):
            raise CacheChecksumError(f"{path}: checksum mismatch, the cache is corrupt; delete it and recapture")
        n = int(meta["n_layers"])
        get = lambda kind: [tensors[f"{kind}.{i}"].to(device) for i in range(n)]  # noqa: E731
        return cls(get("k"), get("v"), get("e") if "e.0" in tensors else None,
                   json.loads(meta["model_id"]), json.loads(meta["token_ids"]))


CACHE_FORMAT = "ds_study.cache/2"  # /2: the checksum also covers the header (model, context, layers); /1 loads too


def _file_checksum(tensors: dict, meta: dict) -> str:
    """sha256 over the tensors' checksum and the header fields a cache is looked up by."""
    head = json.dumps({k: meta[k] for k in ("model_id", "token_ids", "n_layers", "format")}, sort_keys=True)
    return hashlib.sha256(f"{tensors_sha256(tensors)}\n{head}".encode()).hexdigest()


def analytic_bytes_per_token(config, dtype_bytes: int) -> dict[str, int]:
    """Bytes of K, V and E per token per layer from a model config (what the paper's §4.1 compares)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads * head_dim * dtype_bytes
    return {"k": kv, "v": kv, "e": text.hidden_size * dtype_bytes}
