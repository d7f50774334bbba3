"""Plans and the registry of plan kinds: one place to add a baseline.

A *plan* says how the receiver gets the K/V of a shared context: which layers it recomputes (from
the sender's E), which it reuses from the sender, or another recipe such as CacheBlend's token
selection. Each recipe is a ``PlanKind``: it claims the plan strings it understands, says what a
plan of its kind reads and recomputes, and assembles the per-layer K/V. Everything else -- the
batch-1 executor, the batched evaluator, cells, search, figures -- goes through this interface, so
a new baseline is one ``PlanKind`` subclass and one ``register_plan_kind`` line
(tests/test_plan_kinds.py registers one).

The registry maps a kind's name to ``"module:Class"`` and imports it on first use, in the manner of
vLLM's ``KVConnectorFactory``: this module stays free of torch and of the executor, which the
built-in kinds (``ds_study.plan_kinds``) use.
"""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar


class PlanError(ValueError):
    """A plan that cannot run on this model (bad syntax, layer out of range, overlap)."""


class PlanKind(ABC):
    """One way of assembling the receiver's context K/V. Implement ``parse`` and ``prefill``; the
    rest has defaults that fit a plan which reads the sender's cache and recomputes nothing."""

    name: ClassVar[str]  # the kind's name, stored in Plan.kind
    syntax: ClassVar[tuple[str, ...]]  # the plan strings it accepts, for error messages
    decoder: ClassVar[str] = "receiver"  # which model runs the prompt and decodes: receiver | sender
    batched: ClassVar[bool] = True  # prefill takes a right-padded [B, P] batch of contexts (ds_study.batched);
    #                                 False: the batched evaluator calls it one context at a time

    @abstractmethod
    def parse(self, spec: str, n_layers: int, cacheblend_ratio: float) -> Plan | None:
        """The plan ``spec`` names, if it is of this kind; None otherwise (another kind may claim it)."""

    @abstractmethod
    def prefill(self, model, plan: Plan, token_ids, sender, memo=None) -> list[tuple]:
        """Per-layer (K, V) of the context under ``plan``. ``model``: the receiver; ``sender``: the
        sender's ContextCache (with E where ``needs_embeds``); ``memo``: a GroupMemo of the same
        receiver, context and sender that a kind may use to share recomputed layers across plans."""

    def label(self, plan: Plan) -> str:
        """The plan's name in cells, tables and figures (unique across plans of every kind)."""
        return self.name

    def recomputed_layers(self, plan: Plan) -> list[int]:
        """Layers whose K/V the receiver computes over the whole context itself."""
        return []

    def needs_sender(self, plan: Plan) -> bool:
        """Whether running the plan reads the sender's cache."""
        return True

    def needs_embeds(self, plan: Plan) -> bool:
        """Whether it reads the sender's E (the hidden states entering a layer), captured at extra cost."""
        return False

    def recompute_count(self, plan: Plan) -> int | None:
        """Where the plan sits on the recompute-count axis of a frontier; None: not a point of it."""
        return None


# name -> "module:Class" (imported on first use) or a PlanKind instance; order is parse order
_REGISTRY: dict[str, str | PlanKind] = {
    "groups": "ds_study.plan_kinds:Groups",
    "reuse_only": "ds_study.plan_kinds:ReuseOnly",
    "cacheblend": "ds_study.plan_kinds:CacheBlend",
    "sender": "ds_study.plan_kinds:Sender",
}


def register_plan_kind(name: str, kind: str | PlanKind | type) -> None:
    """Add (or replace) a plan kind: a ``"module:Class"`` path, a PlanKind subclass or an instance."""
    _REGISTRY[name] = kind() if isinstance(kind, type) else kind


def unregister_plan_kind(name: str) -> None:
    _REGISTRY.pop(name, None)


def plan_kind(name: str) -> PlanKind:
    """The registered kind ``name``, imported and instantiated on first use."""
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise PlanError(f"unknown plan kind {name!r}; registered: {', '.join(_REGISTRY)}") from None
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = _REGISTRY[name] = getattr(importlib.import_module(module), cls)()
    return entry


def plan_kinds() -> list[PlanKind]:
    return [plan_kind(n) for n in list(_REGISTRY)]


@dataclass(frozen=True)
class Plan:
    kind: str  # a registered PlanKind's name
    # "groups": recompute groups [a, b]; "reuse_only": groups of layers whose sender KV the receiver
    # reads while computing every other layer itself (single-layer sensitivity, paper Fig. 7)
    groups: tuple[tuple[int, int], ...] = ()
    ratio: float = 0.15  # cacheblend: fraction of context tokens recomputed
    check_layer: int = 1  # cacheblend: layer whose K deviation ranks tokens
    label: str | None = None
    params: tuple[tuple[str, float], ...] = ()  # a registered kind's own parameters, as (name, value) pairs
    _n_layers: int = field(default=0, compare=False, repr=False)

    @property
    def impl(self) -> PlanKind:
        return plan_kind(self.kind)

    @property
    def name(self) -> str:
        return self.label or self.impl.label(self)

    def param(self, key: str, default: float | None = None) -> float | None:
        return dict(self.params).get(key, default)

    def recomputed_layers(self) -> list[int]:
        return self.impl.recomputed_layers(self)

    def n_recomputed(self) -> int:
        return len(self.recomputed_layers())

    @property
    def recompute_count(self) -> int | None:
        return self.impl.recompute_count(self)

    def transition_layers(self) -> list[int]:
        """Group starts after layer 0: where execution switches from reuse to recompute, i.e. where E is needed."""
        return [a for a, _ in self.groups if a > 0]

    def reused_layers(self, n_layers: int) -> list[int]:
        rec = set(self.recomputed_layers())
        return [i for i in range(n_layers) if i not in rec]

    @property
    def needs_sender(self) -> bool:
        """Whether running the plan reads the sender's cache."""
        return self.impl.needs_sender(self)

    @property
    def needs_embeds(self) -> bool:
        return self.impl.needs_embeds(self)


def layer_runs(layers) -> list[tuple[int, int]]:
    """Maximal runs of consecutive layer (or unit) indices: [5, 1, 2, 7, 8] -> [(1, 2), (5, 5), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for i in sorted(set(layers)):
        if out and i == out[-1][1] + 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def checked_groups(groups, n_layers: int) -> tuple[tuple[int, int], ...]:
    """Sorted layer groups [a, b], each inside 0..n_layers-1, none overlapping."""
    groups = tuple(sorted((int(a), int(b)) for a, b in groups))
    for a, b in groups:
        if a > b:
            raise PlanError(f"recompute group [{a}, {b}] starts after it ends; write first-last, e.g. {b}-{a}")
        if not (0 <= a and b < n_layers):
            raise PlanError(f"recompute group [{a}, {b}] is outside layers 0..{n_layers - 1}")
    for (a1, b1), (a2, b2) in zip(groups, groups[1:]):
        if a2 <= b1:
            raise PlanError(f"recompute groups [{a1}, {b1}] and [{a2}, {b2}] overlap")
    return groups


def groups_plan(groups, n_layers: int, label: str | None = None) -> Plan:
    return Plan("groups", checked_groups(groups, n_layers), label=label, _n_layers=n_layers)


GROUPS_SPEC = re.compile(r"\s*\d+\s*-\s*\d+\s*(,\s*\d+\s*-\s*\d+\s*)*")


def parse_plan(spec, n_layers: int, cacheblend_ratio: float = 0.15) -> Plan:
    """A Plan from a plan string claimed by a registered kind (``full_prefill``, ``cacheblend@0.3``,
    ``"2-5,9-9"``, ``reuse_only:4``, ...), or from a list like ``[[2, 5], [9, 9]]`` (recompute groups)."""
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, str):
        s = spec.strip()
        kinds = plan_kinds()
        for kind in kinds:
            plan = kind.parse(s, n_layers, cacheblend_ratio)
            if plan is not None:
                return plan
        raise PlanError(f"cannot parse plan {spec!r}; use one of "
                        f"{', '.join(x for k in kinds for x in k.syntax)} or a list of [a, b] groups")
    try:
        return groups_plan([(g[0], g[1]) for g in spec], n_layers)
    except (TypeError, IndexError, KeyError) as e:
        raise PlanError(f"cannot parse plan {spec!r}: expected a list of [a, b] groups") from e
