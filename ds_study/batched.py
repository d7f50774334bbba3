"""Batched evaluation of any plan on a batch of examples, with continuous quality signals.

At batch 1 a 135M model spends most of its time on per-call overhead: a context costs about a
second of prefill and every decoded token 90 ms. Here B examples go through each model together:

- the contexts are **right-padded** to one length P, so every real token keeps its position
  (RoPE sees 0..n-1) and, attention being causal, never sees the padding after it: the executor's
  own layer functions (``executor.partial_prefill``, ``GroupMemo``, ``capture``) run the padded
  batch unchanged, so a recompute group is one pass for the whole batch;
- the suffix (and, for teacher forcing, the gold answer) follows at columns P.., with position ids
  continuing each row's own context length and a 2-D mask that hides the context padding;
- one pass over suffix + answer gives the teacher-forced scores and the first greedy token (read at
  the suffix's end); greedy decoding then appends one token per row per step into preallocated room,
  the answer's columns masked out, finished rows idling.

Beside the task metric, each example gets two continuous signals that need no decoding:

- ``nll``: the gold answer's mean negative log-likelihood per token under teacher forcing;
- ``kl``: the mean KL divergence, over the answer's positions, of the plan's next-token
  distribution from the receiver's own full-prefill distribution (0 for full prefill itself).

and, on request, ``out_err``: the relative L2 distance of the suffix's final hidden states from
the receiver's full prefill (error propagation, paper Fig. 9).

Every plan kind runs here: recompute groups and single-layer reuse batched (plans of one batch
share recomputed layers through one ``GroupMemo``), ``sender`` on the sender's batched cache, and
CacheBlend (whose token selection is per context) prefilled one context at a time, then decoded
with the batch. Results agree with the batch-1 executor to float precision (tests/test_batched.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ds_study.arch import layout
from ds_study.caches import ContextCache
from ds_study.deviation import rel_l2
from ds_study.executor import GroupMemo, capture, partial_prefill
from ds_study.plans import Plan, parse_plan

BASELINES = ("full_prefill", "sender", "full_reuse")


@dataclass
class Item:
    """One example as token ids: context (shared prefix), suffix, gold answer (for teacher forcing)."""

    prefix: list[int]
    suffix: list[int]
    answer: list[int]


def padded(items: list[Item], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded context ids [B, P] and their mask (1 = real token)."""
    B, P = len(items), max(len(it.prefix) for it in items)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, P), dtype=torch.long, device=device)
    for i, it in enumerate(items):
        ids[i, : len(it.prefix)] = torch.tensor(it.prefix, device=device)
        mask[i, : len(it.prefix)] = 1
    return ids, mask


def _block(items: list[Item], rows: list[list[int]], prefix_mask: torch.Tensor, pad_id: int):
    """Right-padded block of per-row tokens after the context: ids, positions, full 2-D mask, lengths."""
    B, n = len(rows), max(len(r) for r in rows)
    dev = prefix_mask.device
    ids = torch.full((B, n), pad_id, dtype=torch.long, device=dev)
    bmask = torch.zeros((B, n), dtype=torch.long, device=dev)
    pos = torch.zeros((B, n), dtype=torch.long, device=dev)
    for i, (it, r) in enumerate(zip(items, rows)):
        ids[i, : len(r)] = torch.tensor(r, device=dev)
        bmask[i, : len(r)] = 1
        pos[i] = len(it.prefix) + torch.arange(n, device=dev)
    return ids, pos, torch.cat([prefix_mask, bmask], dim=1), [len(r) for r in rows]


class _RoomyLayer:
    """Mixin over transformers' DynamicLayer: appended K/V are written into preallocated room after
    the context instead of concatenated to it, so a decoding step does not copy the whole context's
    K/V of every layer (at 700 context tokens that copy costs as much as the step's matrix products).
    ``keys``/``values`` stay views of the first n columns, so every other method works unchanged."""

    def fill(self, k: torch.Tensor, v: torch.Tensor, room: int):
        P = k.shape[-2]
        self._k = k.new_empty(*k.shape[:-2], P + room, k.shape[-1])
        self._v = v.new_empty(*v.shape[:-2], P + room, v.shape[-1])
        self._k[..., :P, :], self._v[..., :P, :] = k, v
        self.device, self.is_initialized = k.device, True
        self.keys, self.values = self._k[..., :P, :], self._v[..., :P, :]
        return self

    def update(self, key_states, value_states, *args, **kwargs):
        n, m = self.keys.shape[-2], key_states.shape[-2]
        if n + m > self._k.shape[-2]:  # out of room: make more (rare; room is sized by the caller)
            keys, values = self.keys, self.values
            self.fill(keys, values, 2 * m + keys.shape[-2] // 4)
        self._k[..., n: n + m, :], self._v[..., n: n + m, :] = key_states, value_states
        self.keys, self.values = self._k[..., : n + m, :], self._v[..., : n + m, :]
        return self.keys, self.values


@functools.lru_cache(maxsize=1)
def _roomy_layer_class():
    """_RoomyLayer over transformers' DynamicLayer, made once (transformers is imported on first use)."""
    from transformers.cache_utils import DynamicLayer

    return type("RoomyDynamicLayer", (_RoomyLayer, DynamicLayer), {})


def as_cache(model, layers: list[tuple], room: int = 0):
    """A transformers DynamicCache over the context's per-layer (K, V); appending to it never
    changes the given tensors, so one plan's layers can back several passes. ``room``: tokens that
    will be appended (suffix, answer, decoded tokens), preallocated on full-attention layers."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    dev = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    roomy = _roomy_layer_class()
    for i, (k, v) in enumerate(layers):
        k, v = k.to(dev), v.to(dev)
        if room > 0 and type(cache.layers[i]) is DynamicLayer:
            cache.layers[i] = roomy().fill(k, v, room)
        else:
            cache.layers[i].update(k, v)
    return cache


def _crop(cache, n: int) -> None:
    """Back to the context's ``n`` columns (transformers 5.x crops by a negative count)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


def _hidden(model, cache, ids, pos, mask) -> torch.Tensor:
    """Final-norm hidden states of a block after the cached context."""
    return layout(model).body(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).last_hidden_state


def score_and_decode(model, cache, prefix_mask, items: list[Item], pad_id: int, max_new_tokens: int,
                     eos_ids: set[int], stop=None):
    """One pass over each row's suffix + gold answer after the cached context gives (1) the answer's
    log-probabilities [len(answer), vocab] (teacher forcing), (2) the suffix's final-norm hidden states
    [len(suffix), hidden] and (3) the first greedy token, read at the suffix's last position, which
    attention being causal is what a pass over the suffix alone computes. Greedy decoding then goes on
    from there with the answer's columns masked out. The vocabulary projection runs only where it is
    read. Returns (log-probabilities, suffix hidden states, decoded ids) per row; ``stop(ids)`` ends a
    row early (metrics.stop_rule). The cache is cropped back to the context afterwards."""
    P, head = prefix_mask.shape[1], layout(model).head
    ids, pos, mask, _ = _block(items, [it.suffix + it.answer for it in items], prefix_mask, pad_id)
    hidden = _hidden(model, cache, ids, pos, mask)
    logp, suffix_hidden = [], []
    for i, it in enumerate(items):
        s, a = len(it.suffix), len(it.answer)
        # position s-1+k predicts answer[k]
        logp.append(torch.log_softmax(head(hidden[i, s - 1: s - 1 + a]).float(), dim=-1))
        suffix_hidden.append(hidden[i, :s])
    rows = torch.arange(len(items), device=ids.device)
    last = torch.tensor([len(it.suffix) - 1 for it in items], device=ids.device)
    mask = mask.clone()
    for i, it in enumerate(items):
        mask[i, P + len(it.suffix):] = 0  # decoding follows the suffix, not the gold answer
    nxt = head(hidden[rows, last]).float().argmax(-1)
    last_pos = pos[rows, last]
    gen: list[list[int]] = [[] for _ in items]
    done = [False] * len(items)
    for step in range(max_new_tokens):
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            if t in eos_ids:
                done[i] = True
                continue
            gen[i].append(t)
            if len(gen[i]) >= max_new_tokens or (stop is not None and stop(gen[i])):
                done[i] = True
        if all(done) or step == max_new_tokens - 1:
            break
        last_pos = last_pos + 1
        mask = torch.cat([mask, torch.ones((len(items), 1), dtype=mask.dtype, device=mask.device)], dim=1)
        step_hidden = _hidden(model, cache, nxt[:, None], last_pos[:, None], mask)
        nxt = head(step_hidden[:, -1]).float().argmax(-1)
    _crop(cache, P)
    return logp, suffix_hidden, gen


def _one_context(cache: ContextCache, i: int, n: int, token_ids: list[int]) -> ContextCache:
    """Row ``i`` of a batched cache, cut to its ``n`` real tokens (for per-context prefills)."""
    cut = lambda ts: None if ts is None else [t[i: i + 1, ..., :n, :] if t.dim() == 4 else t[i: i + 1, :n] for t in ts]
    return ContextCache(cut(cache.keys), cut(cache.values), cut(cache.embeds), cache.model_id, list(token_ids))


def _pad_layers(per_item: list[list[tuple]], P: int) -> list[tuple]:
    """Per-context layer lists [(K [1, h, n_i, d], V)] -> one right-padded batch [(K [B, h, P, d], V)]."""
    def pad(t):
        return torch.nn.functional.pad(t, (0, 0, 0, P - t.shape[-2]))
    return [(torch.cat([pad(layers[j][0]) for layers in per_item]), torch.cat([pad(layers[j][1]) for layers in per_item]))
            for j in range(len(per_item[0]))]


def _start(plan: Plan) -> tuple:
    """Plans of a kind together, start-major, so that groups of one start extend the same GroupMemo."""
    return (plan.kind, plan.groups)


@dataclass
class BatchContext:
    """What every plan of one batch shares: the padded contexts, the receiver's full prefill with its
    scores and greedy answer (the reference), and the sender's cache with E plus the recomputed-layer
    memo. A caller that scores more plans on the same batch later (each greedy step scores two)
    passes it back instead of capturing both models again, which at two plans per call is most of
    the cost. It holds both models' K/V and E for the batch, so keep one at a time."""

    items: list[Item]
    ids: torch.Tensor
    pmask: torch.Tensor
    room: int  # tokens appended after the context: suffix + answer, then decoding
    ref: tuple  # the receiver's full prefill: (log-probabilities, suffix hidden states, tokens) per row
    scache: ContextCache | None = None  # the sender's, with E; made when a plan first reads it
    memo: GroupMemo | None = None


@torch.no_grad()
def batch_context(receiver, items: list[Item], pad_id: int, max_new_tokens: int, eos_ids: set[int],
                  stop=None) -> BatchContext:
    """The receiver's side of a batch: its full prefill of the padded contexts, then the reference
    pass (teacher-forced scores and greedy decoding) every plan is compared with."""
    dev = next(receiver.parameters()).device
    ids, pmask = padded(items, pad_id, dev)
    own = capture(receiver, ids, with_embeds=False)
    room = max(len(it.suffix) + len(it.answer) for it in items) + max_new_tokens + 1
    ref = score_and_decode(receiver, as_cache(receiver, list(zip(own.keys, own.values)), room), pmask, items,
                           pad_id, max_new_tokens, eos_ids, stop)
    return BatchContext(items, ids, pmask, room, ref)


@torch.no_grad()
def evaluate_plans(receiver, sender, items: list[Item], plans, pad_id: int, max_new_tokens: int, eos_ids: set[int],
                   stop=None, out_err: bool = False, on_plan=None, context: BatchContext | None = None
                   ) -> dict[str, list[dict]]:
    """{plan name: [{"tokens", "nll", "kl"[, "out_err"]} per item]} for every plan, on one batch.

    ``plans``: Plan objects or anything ``parse_plan`` accepts. ``on_plan(plan, rows)`` is called as
    soon as each plan is done (a caller stores its cells then: an interruption loses one plan's work).
    ``context``: a ``batch_context`` of these items made earlier (same decoding settings), reused."""
    n_layers = receiver.config.num_hidden_layers
    plans = sorted((parse_plan(p, n_layers) for p in plans), key=_start)
    ctx = context if context is not None else batch_context(receiver, items, pad_id, max_new_tokens, eos_ids, stop)
    if ctx.items is not items and [(it.prefix, it.suffix, it.answer) for it in ctx.items] != [
            (it.prefix, it.suffix, it.answer) for it in items]:
        raise ValueError("the batch context was made for other items")
    ids, pmask, room, (ref, ref_hidden, ref_tokens) = ctx.ids, ctx.pmask, ctx.room, ctx.ref
    if ctx.scache is None and any(p.needs_sender for p in plans):
        # with E whatever these plans need: recording it costs memory, not compute, and a later call may need it
        ctx.scache = capture(sender, ids, with_embeds=True)
        ctx.memo = GroupMemo(receiver, ids, ctx.scache)
    scache, memo = ctx.scache, ctx.memo
    out: dict[str, list[dict]] = {}
    for plan in plans:
        model = sender if plan.impl.decoder == "sender" else receiver
        if plan.name == "full_prefill":  # the reference itself
            logp, hidden, tokens = ref, ref_hidden, ref_tokens
        else:
            if plan.impl.batched:
                layers = partial_prefill(receiver, plan, ids, scache, memo)
            else:  # e.g. cacheblend, whose token selection is per context
                layers = _pad_layers([partial_prefill(receiver, plan, it.prefix, _one_context(scache, i, len(it.prefix), it.prefix))
                                      for i, it in enumerate(items)], ids.shape[1])
            logp, hidden, tokens = score_and_decode(model, as_cache(model, layers, room), pmask, items, pad_id,
                                                    max_new_tokens, eos_ids, stop)
        rows = []
        for i, it in enumerate(items):
            gold = torch.tensor(it.answer, device=logp[i].device)
            row = {"tokens": tokens[i], "nll": float(-logp[i].gather(1, gold[:, None]).mean()),
                   "kl": max(0.0, float((ref[i].exp() * (ref[i] - logp[i])).sum(-1).mean()))}
            if out_err:
                row["out_err"] = rel_l2(hidden[i], ref_hidden[i])
            rows.append(row)
        out[plan.name] = rows
        if on_plan is not None:
            on_plan(plan, rows)
    return out


def evaluate_baselines(receiver, sender, items: list[Item], pad_id: int, max_new_tokens: int, eos_ids: set[int],
                       plans=BASELINES, stop=None) -> dict[str, list[dict]]:
    """The three baselines of the pair table (paper Fig. 6) on one batch."""
    return evaluate_plans(receiver, sender, items, plans, pad_id, max_new_tokens, eos_ids, stop=stop)
