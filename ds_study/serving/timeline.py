"""What a request asks for and what its run records: when each load, computation and wait began and ended.

The simulator and the real engine produce the same records, so the paper's Fig. 13 timeline and
the measured one are drawn and compared alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Request:
    """One receiver request: reuse ``sender``'s cached context under ``plan``."""

    name: str
    model: torch.nn.Module  # the receiver
    receiver: str  # receiver identity (model_identity)
    sender: str  # identity of the model whose cached context is reused
    plan: object  # anything parse_plan accepts; ignored by full_prefill / full_reuse
    prefix_ids: list[int]
    suffix_ids: list[int]
    max_new_tokens: int = 1
    eos_token_id: int | list | None = None
    arrival: float = 0.0  # seconds after the run starts


@dataclass
class Span:
    """One interval of one request: a load on the link, or a layer's computation, or a wait."""

    request: str
    op: str  # "load" | "recompute" | "final" | "wait" | "fallback"
    start: float  # seconds (or units) since the run started
    end: float
    layer: int | None = None
    kind: str | None = None  # loads: "e" | "kv"

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class RequestResult:
    request: str
    strategy: str
    plan: str
    arrival: float
    ttft: float
    token_ids: list[int] = field(default_factory=list)
    bytes_loaded: int = 0
    fallback: str | None = None  # "full_prefill" when the transfer failed
    reason: str | None = None
    repaired_plan: str | None = None  # the plan actually run after rejected entries
    rejected: list[str] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    first_logits: torch.Tensor | None = None
    loader: str = ""  # what moved the items: "process" (link worker), "thread", or "" (none / given)
    cache: object | None = None  # the cache decoding ran on, when the engine was asked to keep it

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("spans", "first_logits", "cache")}
        out["spans"] = [s.to_json() for s in self.spans]
        return out


def sum_ttft(results: list[RequestResult]) -> float:
    return sum(r.ttft for r in results)
