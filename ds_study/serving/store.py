"""The shared KV/E store: per-layer entries keyed by (sender, context, layer, kind), with checksums.

A sender publishes its captured context here; receivers look entries up exactly (their own
cache) or cross-model (another model's tensors prepared for them), and a corrupt entry is
rejected rather than served.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ds_study.caches import KINDS, CacheChecksumError, ContextCache, tensors_sha256
from ds_study.link import primed_sha256


class StoreMiss(KeyError):
    """No entry under this key."""


def model_identity(model_id: dict | str) -> str:
    """``name@sha12`` from a pair identity (name, weights_sha256): different weights, different entries."""
    if isinstance(model_id, str):
        return model_id
    sha = model_id.get("weights_sha256") or ""
    name = model_id.get("name") or "model"
    return f"{name}@{sha[:12]}" if sha else name


def context_hash(token_ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()[:16]


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@=-]", "_", s)


@dataclass(frozen=True)
class EntryKey:
    """One stored tensor. ``receiver`` set means a cross-model entry: the sender's tensor prepared for
    that receiver. Such entries live in their own (lossy) namespace: their key never equals the key
    of an exact, same-model lookup, so they can never be served as an exact hit."""

    owner: str  # identity of the model that computed the tensor
    context: str  # context_hash of the token ids
    layer: int
    kind: str  # "k" | "v" | "e"
    receiver: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"entry kind must be one of {KINDS}, got {self.kind!r}")
        if self.receiver is not None and self.receiver == self.owner:
            raise ValueError(f"a cross-model entry needs two different models, got {self.owner!r} twice")

    @property
    def namespace(self) -> str:
        return "exact" if self.receiver is None else "cross"

    def relpath(self) -> Path:
        ns = _safe(self.owner) if self.receiver is None else f"{_safe(self.owner)}--to--{_safe(self.receiver)}"
        return Path(self.namespace, ns, self.context, f"{self.layer:03d}.{self.kind}.safetensors")


def entry_key(sender: str, receiver: str, context: str, layer: int, kind: str) -> EntryKey:
    """The key a receiver looks up: exact when it reads its own cache, cross-model otherwise."""
    return EntryKey(sender, context, layer, kind, None if sender == receiver else receiver)


@dataclass
class Entry:
    tensor: torch.Tensor
    sha256: str


class KVStore:
    """Per-layer K, V and E entries in memory, optionally persisted one safetensors file per entry.

    Every entry carries the sha256 of its bytes, taken when it was put; ``get`` verifies it (a
    corrupt entry raises CacheChecksumError and is dropped from memory), so corruption is rejected
    rather than served. ``pin_memory`` keeps CPU entries in page-locked memory for async GPU copies.
    """

    def __init__(self, root: str | Path | None = None, pin_memory: bool = False):
        self.root = Path(root) if root is not None else None
        self.pin_memory = pin_memory
        self._mem: dict[EntryKey, Entry] = {}

    def put(self, key: EntryKey, tensor: torch.Tensor) -> str:
        t = tensor.detach().clone(memory_format=torch.contiguous_format)  # the store owns its bytes
        if self.pin_memory and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        sha = tensors_sha256({"t": t})
        self._mem[key] = Entry(t, sha)
        if self.root is not None:
            from safetensors.torch import save_file

            path = self.root / key.relpath()
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"t": t.cpu()}, str(path), metadata={"sha256": sha, "key": json.dumps(asdict(key))})
        return sha

    def _from_disk(self, key: EntryKey) -> Entry | None:
        if self.root is None or not (self.root / key.relpath()).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(self.root / key.relpath()), framework="pt") as f:
            meta, t = f.metadata() or {}, f.get_tensor("t")
        if "sha256" not in meta:
            raise CacheChecksumError(f"{self.root / key.relpath()}: no checksum in the entry")
        return Entry(t.pin_memory() if self.pin_memory else t, meta["sha256"])

    def get(self, key: EntryKey, verify: bool = True) -> torch.Tensor:
        entry = self._mem.get(key) or self._from_disk(key)
        if entry is None:
            raise StoreMiss(f"no {key.namespace} entry for {key}")
        if verify and tensors_sha256({"t": entry.tensor}) != entry.sha256:
            self._mem.pop(key, None)
            raise CacheChecksumError(f"entry {key} is corrupt (checksum mismatch); rejected")
        self._mem[key] = entry
        return entry.tensor

    def reread(self, key: EntryKey) -> bool:
        """Drop the in-memory copy of a persisted entry (found corrupt in flight), so the next use reads
        the file again. An entry held only in memory is kept: later requests reject it and repair,
        which beats failing them over to full prefill."""
        if self.root is None or not (self.root / key.relpath()).is_file():
            return False
        self._mem.pop(key, None)
        return True

    def drop_owner(self, owner: str) -> int:
        """Forget every in-memory entry a model computed (a sender replica that died); how many."""
        gone = [k for k in list(self._mem) if k.owner == owner]
        for k in gone:
            self._mem.pop(k, None)
        return len(gone)

    def drop_context(self, context: str) -> int:
        """Forget every in-memory entry of one context (``context_hash``) once nobody will read it."""
        gone = [k for k in list(self._mem) if k.context == context]
        for k in gone:
            self._mem.pop(k, None)
        return len(gone)

    def checksum(self, key: EntryKey) -> str:
        entry = self._mem.get(key) or self._from_disk(key)
        if entry is None:
            raise StoreMiss(f"no {key.namespace} entry for {key}")
        return entry.sha256

    def __contains__(self, key: EntryKey) -> bool:
        return key in self._mem or (self.root is not None and (self.root / key.relpath()).is_file())

    def nbytes(self, key: EntryKey) -> int:
        t = self.get(key, verify=False)
        return t.numel() * t.element_size()

    def lookup_exact(self, model: str, context: str, layer: int, kind: str) -> torch.Tensor:
        """A model's own cached tensor; never answered from a cross-model entry."""
        return self.get(EntryKey(model, context, layer, kind))

    def lookup_cross(self, sender: str, receiver: str, context: str, layer: int, kind: str) -> torch.Tensor:
        return self.get(EntryKey(sender, context, layer, kind, receiver))

    def put_cache(self, cache: ContextCache, owner: str, receiver: str | None = None,
                  layers: list[int] | None = None, kinds: tuple[str, ...] = KINDS) -> list[EntryKey]:
        """Store a captured context layer by layer (exact namespace, or cross-model for ``receiver``)."""
        ctx = context_hash(cache.token_ids)
        keys = []
        for i in layers if layers is not None else range(cache.n_layers):
            for kind in kinds:
                if kind == "e" and cache.embeds is None:
                    continue
                key = EntryKey(owner, ctx, i, kind, receiver)
                self.put(key, cache.tensor(kind, i))
                keys.append(key)
        return keys


def entry_hasher(t: torch.Tensor):
    """A sha256 primed like ``tensors_sha256({"t": t})``: feed it t's bytes in order to get the same digest."""
    return primed_sha256(str(t.dtype), tuple(t.shape))


def publish(store: KVStore, cache: ContextCache, sender: str, receiver: str) -> list[EntryKey]:
    """Put a sender's captured context where ``receiver`` looks it up (cross-model unless the same model)."""
    return store.put_cache(cache, sender, None if sender == receiver else receiver)
