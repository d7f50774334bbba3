"""Batched evaluation of the baselines (full prefill, sender alone, full reuse) with continuous signals.

At batch 1 a 135M model spends most of its time on per-call overhead: a context costs about a
second of prefill and every decoded token 90 ms. Here B examples go through each model together:

- the contexts are **right-padded** to one length P, so every real token keeps its position
  (RoPE sees 0..n-1) and no query ever faces a fully masked row (which would give NaN K/V);
- the suffix (and, for teacher forcing, the gold answer) follows at columns P.., with position ids
  continuing each row's own context length and a 2-D mask that hides the context padding;
- greedy decoding then appends one token per row per step, finished rows idling.

Beside the task metric, each example gets two continuous signals that need no decoding:

- ``nll``: the gold answer's mean negative log-likelihood per token under teacher forcing;
- ``kl``: the mean KL divergence, over the answer's positions, of the plan's next-token
  distribution from the receiver's own full-prefill distribution (0 for full prefill itself).

A plan's prefix cache is shared: ``sender`` and ``full_reuse`` both read the sender's context KV
(the sender decodes on it, the receiver reuses it). Results agree with the batch-1 executor to
float precision (tested on the fixture models).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BASELINES = ("full_prefill", "sender", "full_reuse")


@dataclass
class Item:
    """One example as token ids: context (shared prefix), suffix, gold answer (for teacher forcing)."""

    prefix: list[int]
    suffix: list[int]
    answer: list[int]


def prefix_cache(model, items: list[Item], pad_id: int):
    """Run the right-padded contexts through ``model``; (cache, context mask [B, P])."""
    B, P = len(items), max(len(it.prefix) for it in items)
    dev = next(model.parameters()).device
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=dev)
    mask = torch.zeros((B, P), dtype=torch.long, device=dev)
    for i, it in enumerate(items):
        ids[i, : len(it.prefix)] = torch.tensor(it.prefix, device=dev)
        mask[i, : len(it.prefix)] = 1
    out = model.model(input_ids=ids, attention_mask=mask, use_cache=True)
    return out.cache, mask


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


def _crop(cache, n: int) -> None:
    """Back to the context's ``n`` columns (transformers 5.x crops by a negative count)."""
    extra = cache.get_seq_length() - n
    if extra > 0:
        cache.crop(-extra)


def _forward(model, cache, ids, pos, mask) -> torch.Tensor:
    out = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return model.lm_head(out.last_hidden_state).float()


def teacher_forced(model, cache, prefix_mask, items: list[Item], pad_id: int) -> list[torch.Tensor]:
    """Log-probabilities [len(answer), vocab] of each row's answer positions, suffix + answer fed in."""
    P = prefix_mask.shape[1]
    rows = [it.suffix + it.answer for it in items]
    ids, pos, mask, _ = _block(items, rows, prefix_mask, pad_id)
    logp = torch.log_softmax(_forward(model, cache, ids, pos, mask), dim=-1)
    _crop(cache, P)
    out = []
    for i, it in enumerate(items):
        s, a = len(it.suffix), len(it.answer)
        out.append(logp[i, s - 1: s - 1 + a])  # position s-1+k predicts answer[k]
    return out


def greedy(model, cache, prefix_mask, items: list[Item], pad_id: int, max_new_tokens: int, eos_ids: set[int],
           stop=None) -> list[list[int]]:
    """Greedy decoding of every row after its suffix; ``stop(ids)`` ends a row early (metrics.stop_rule)."""
    P = prefix_mask.shape[1]
    ids, pos, mask, lens = _block(items, [it.suffix for it in items], prefix_mask, pad_id)
    logits = _forward(model, cache, ids, pos, mask)
    nxt = logits[torch.arange(len(items)), torch.tensor(lens, device=logits.device) - 1].argmax(-1)
    gen: list[list[int]] = [[] for _ in items]
    done = [False] * len(items)
    last_pos = pos[torch.arange(len(items)), torch.tensor(lens, device=pos.device) - 1]
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
        logits = _forward(model, cache, nxt[:, None], last_pos[:, None], mask)
        nxt = logits[:, -1].argmax(-1)
    _crop(cache, P)
    return gen


@torch.no_grad()
def evaluate_baselines(receiver, sender, items: list[Item], pad_id: int, max_new_tokens: int, eos_ids: set[int],
                       plans=BASELINES, stop=None) -> dict[str, list[dict]]:
    """{plan: [{"tokens", "nll", "kl"} per item]} for the requested baselines, one batch."""
    need_sender_cache = any(p in ("sender", "full_reuse") for p in plans)
    rcache, rmask = prefix_cache(receiver, items, pad_id)
    ref = teacher_forced(receiver, rcache, rmask, items, pad_id)
    out: dict[str, list[dict]] = {}
    scache = smask = None
    if need_sender_cache:
        scache, smask = prefix_cache(sender, items, pad_id)
    for plan in plans:
        model, cache, mask = {"full_prefill": (receiver, rcache, rmask), "sender": (sender, scache, smask),
                              "full_reuse": (receiver, scache, smask)}[plan]
        logp = ref if plan == "full_prefill" else teacher_forced(model, cache, mask, items, pad_id)
        tokens = greedy(model, cache, mask, items, pad_id, max_new_tokens, eos_ids, stop)
        rows = []
        for i, it in enumerate(items):
            gold = torch.tensor(it.answer, device=logp[i].device)
            nll = float(-logp[i].gather(1, gold[:, None]).mean())
            kl = float((ref[i].exp() * (ref[i] - logp[i])).sum(-1).mean())
            rows.append({"tokens": tokens[i], "nll": nll, "kl": max(0.0, kl)})
        out[plan] = rows
    return out
