"""The built-in plan kinds (see ``ds_study.plans`` for the interface and the registry).

- ``groups``: DroidSpeak's plans -- recompute groups [a, b] from the sender's E_a, reuse the rest;
  ``full_prefill`` (every layer one group) and ``full_reuse`` (no group) are its two ends;
- ``reuse_only``: the receiver computes every layer itself except that the named layers read the
  sender's K/V (single-layer sensitivity, paper Fig. 7);
- ``cacheblend``: CacheBlend across models, recomputing the tokens whose K deviates most;
- ``sender``: the sender answers on its own cache (the quality floor of paper Fig. 6).
"""

from __future__ import annotations

import re

from ds_study import executor
from ds_study.plans import GROUPS_SPEC, Plan, PlanError, PlanKind, checked_groups, groups_plan


class Groups(PlanKind):
    name = "groups"
    syntax = ("full_prefill", "full_reuse", "'a-b[,c-d...]'")

    def parse(self, spec, n_layers, cacheblend_ratio):
        if spec == "full_prefill":
            return groups_plan([(0, n_layers - 1)], n_layers, label="full_prefill")
        if spec == "full_reuse":
            return groups_plan([], n_layers, label="full_reuse")
        if GROUPS_SPEC.fullmatch(spec):
            return groups_plan([tuple(map(int, g.split("-"))) for g in spec.split(",")], n_layers)
        return None

    def label(self, plan):
        return "groups:" + (",".join(f"{a}-{b}" for a, b in plan.groups) or "none")

    def recomputed_layers(self, plan):
        return [i for a, b in plan.groups for i in range(a, b + 1)]

    def needs_sender(self, plan):
        return len(self.recomputed_layers(plan)) < plan._n_layers or bool(plan.transition_layers())

    def needs_embeds(self, plan):
        return bool(plan.transition_layers())

    def recompute_count(self, plan):
        return len(self.recomputed_layers(plan))

    def prefill(self, model, plan, token_ids, sender, memo=None):
        return executor.groups_prefill(model, plan, token_ids, sender, memo)


class ReuseOnly(PlanKind):
    name = "reuse_only"
    syntax = ("'reuse_only:i[,j...]'",)

    def parse(self, spec, n_layers, cacheblend_ratio):
        if not spec.startswith("reuse_only:"):
            return None
        layers = [int(x) for x in spec.split(":", 1)[1].split(",") if x.strip()]
        return Plan("reuse_only", checked_groups([(i, i) for i in layers], n_layers), _n_layers=n_layers)

    def label(self, plan):
        return "reuse_only:" + ",".join(str(i) for a, b in plan.groups for i in range(a, b + 1))

    def recomputed_layers(self, plan):
        reused = {i for a, b in plan.groups for i in range(a, b + 1)}
        return [i for i in range(plan._n_layers) if i not in reused]

    def prefill(self, model, plan, token_ids, sender, memo=None):
        return executor.reuse_only_prefill(model, plan, token_ids, sender)


class CacheBlend(PlanKind):
    name = "cacheblend"
    syntax = ("cacheblend", "'cacheblend@RATIO'")
    batched = False  # its token selection is per context

    def parse(self, spec, n_layers, cacheblend_ratio):
        m = re.fullmatch(r"cacheblend(?:@(.+))?", spec)
        if m is None:
            return None
        try:
            ratio = float(m.group(1)) if m.group(1) else cacheblend_ratio
        except ValueError:
            raise PlanError(f"cacheblend ratio must be a number, got {m.group(1)!r}") from None
        if not 0 < ratio <= 1:
            raise PlanError(f"cacheblend ratio must be in (0, 1], got {ratio}")
        return Plan("cacheblend", ratio=ratio, _n_layers=n_layers)

    def label(self, plan):
        return f"cacheblend@{plan.ratio:g}"

    def prefill(self, model, plan, token_ids, sender, memo=None):
        return executor.cacheblend_prefill(model, token_ids, sender, plan.ratio, plan.check_layer)


class Sender(PlanKind):
    name = "sender"
    syntax = ("sender",)
    decoder = "sender"

    def parse(self, spec, n_layers, cacheblend_ratio):
        return Plan("sender", _n_layers=n_layers) if spec == "sender" else None

    def prefill(self, model, plan, token_ids, sender, memo=None):
        if sender is None:
            raise PlanError("plan sender needs the sender's cache")
        return list(zip(sender.keys, sender.values))
