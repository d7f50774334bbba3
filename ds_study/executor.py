"""Plans and the partial-prefill executor (DroidSpeak §4.1, CacheBlend-style baseline).

A *plan* says which decoder layers the receiver recomputes over the shared context; every other
layer reuses the sender's K/V. A recompute group ``[a, b]`` starts from the sender's E at layer
``a`` (from the receiver's own token embeddings when ``a == 0``) and runs the receiver's layers
``a..b`` over the whole context. The prompt's suffix (question, answer cue) then runs through all
receiver layers against the assembled cache, and decoding continues greedily with the receiver.

The executor drives the model's own decoder-layer, rotary and mask modules from transformers; it
never re-implements attention. Cache objects below are duck-typed stand-ins that a layer's
attention calls ``update(k, v, layer_idx)`` on; they decide which K/V that attention sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ds_study.caches import ContextCache
from ds_study.arch import layout
from ds_study.plans import Plan, PlanError

# --------------------------------------------------------------------------------------------
# Cache stand-ins the attention modules write into


class LayerKV:
    """Fresh pass over the context: keep what each layer computes, attend to exactly that."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.k[layer_idx], self.v[layer_idx] = key_states, value_states
        return key_states, value_states


class SubstituteKV:
    """Attend to given K/V instead of the ones just computed (deviation: attention with sender KV)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.keys, self.values


class MixedKV(LayerKV):
    """Fresh pass in which the given layers attend to (and keep) the sender's K/V instead of their own."""

    def __init__(self, sender: ContextCache, layers: set[int]):
        super().__init__()
        self.sender, self.layers = sender, layers

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.layers:  # on the pass's device and dtype, wherever the sender's cache lives
            key_states = self.sender.keys[layer_idx].to(key_states.device, key_states.dtype)
            value_states = self.sender.values[layer_idx].to(value_states.device, value_states.dtype)
        return super().update(key_states, value_states, layer_idx)


class BlendKV:
    """CacheBlend: the sender's K/V with the rows of the recomputed tokens replaced by fresh ones."""

    def __init__(self, base: ContextCache, positions: torch.Tensor):
        self.base, self.positions = base, positions
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k = self.base.keys[layer_idx].to(key_states.device, key_states.dtype, copy=True)
        v = self.base.values[layer_idx].to(value_states.device, value_states.dtype, copy=True)
        k[:, :, self.positions] = key_states
        v[:, :, self.positions] = value_states
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v


# --------------------------------------------------------------------------------------------
# Running decoder layers


def check_supported(model) -> None:
    """Refuse a model whose layout no architecture adapter drives (ds_study.arch)."""
    layout(model)


def layer_type(config, i: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def fresh_masks(model, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """Causal masks (per attention type) for a pass over tokens with no cached past."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    cfg = model.config
    kw = dict(config=cfg, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=position_ids)
    types = {layer_type(cfg, i) for i in range(cfg.num_hidden_layers)}
    masks = {"full_attention": create_causal_mask(**kw)} if "full_attention" in types else {}
    if "sliding_attention" in types:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
    return masks


def run_layers(model, hidden: torch.Tensor, position_ids: torch.Tensor, start: int, end: int, cache,
               mask: torch.Tensor | None = None, record_inputs: dict | None = None,
               pos_emb: tuple | None = None) -> torch.Tensor:
    """Run decoder layers ``start..end-1`` of ``model`` on ``hidden`` (E at ``start``), writing K/V to ``cache``.

    ``mask`` overrides the fresh causal masks: one for every layer, or one per attention type
    (``{"full_attention": ..., "sliding_attention": ...}``, CacheBlend's selected queries over all
    keys); ``record_inputs[i]`` receives the residual stream entering layer ``i``. ``pos_emb``: the
    rotary (cos, sin) of ``position_ids``, if already computed.
    """
    if pos_emb is None:
        pos_emb = layout(model).rotary(hidden, position_ids)
    masks = mask if isinstance(mask, dict) else None if mask is not None else fresh_masks(model, hidden, position_ids)
    for i in range(start, end):
        if record_inputs is not None:
            record_inputs[i] = hidden
        m = masks[layer_type(model.config, i)] if masks is not None else mask
        hidden = run_layer(model, i, hidden, m, pos_emb, position_ids, cache)
    return hidden


def run_layer(model, i: int, hidden: torch.Tensor, mask, pos_emb, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """Decoder layer ``i`` of ``model``, its K/V written to (and read back from) ``cache``."""
    out = layout(model).layer(i)(hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids,
                                cache=cache, use_cache=True)
    return out[0] if isinstance(out, tuple) else out


def _positions(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device).unsqueeze(0)


def as_ids(token_ids, device) -> torch.Tensor:
    """Context token ids as a [B, P] tensor: one context (a list of ids) or a batch of right-padded
    contexts (a [B, P] tensor, see ``ds_study.batched``). Right padding keeps every real token at its
    own position and, attention being causal, out of reach of the padding after it, so the layer
    functions below run a padded batch unchanged; what they compute at padded positions is never read."""
    if torch.is_tensor(token_ids):
        return token_ids.to(device).view(-1, token_ids.shape[-1])
    return torch.tensor([list(token_ids)], dtype=torch.long, device=device)


@torch.no_grad()
def capture(model, token_ids, with_embeds: bool = True, model_id: dict | None = None) -> ContextCache:
    """One model's prefill of a context (or of a right-padded batch, ``as_ids``), keeping every layer's
    K, V and (optionally) E."""
    check_supported(model)
    device = next(model.parameters()).device
    ids = as_ids(token_ids, device)
    hidden = layout(model).embed(ids)
    kv, inputs = LayerKV(), {}
    run_layers(model, hidden, _positions(ids.shape[1], device), 0, model.config.num_hidden_layers, kv,
               record_inputs=inputs if with_embeds else None)
    n = model.config.num_hidden_layers
    return ContextCache([kv.k[i] for i in range(n)], [kv.v[i] for i in range(n)],
                        [inputs[i] for i in range(n)] if with_embeds else None, model_id or {},
                        [] if torch.is_tensor(token_ids) else list(token_ids))


# --------------------------------------------------------------------------------------------
# Partial prefill and decoding


def group_input(model, a: int, token_ids, sender: ContextCache | None) -> torch.Tensor:
    """What a recompute group starting at layer ``a`` reads: the sender's E_a, or own embeddings if a == 0."""
    p = next(model.parameters())
    if a == 0:
        return layout(model).embed(as_ids(token_ids, p.device))
    if sender is None or sender.embeds is None:
        raise PlanError(f"a recompute group starting at layer {a} needs the sender's E at layer {a}, "
                        f"which was not captured")
    return sender.embeds[a].to(p.device, p.dtype)


@torch.no_grad()
def recompute_group(model, a: int, b: int, token_ids, sender: ContextCache | None) -> LayerKV:
    """Receiver layers a..b over the whole context, from the sender's E_a (own embeddings if a == 0)."""
    hidden = group_input(model, a, token_ids, sender)
    kv = LayerKV()
    run_layers(model, hidden, _positions(hidden.shape[1], hidden.device), a, b + 1, kv)
    return kv


class AppendKV(LayerKV):
    """Keeps each layer's K/V across successive token chunks and lets every chunk attend to all of it."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx in self.k:
            key_states = torch.cat([self.k[layer_idx], key_states], dim=-2)
            value_states = torch.cat([self.v[layer_idx], value_states], dim=-2)
        self.k[layer_idx], self.v[layer_idx] = key_states, value_states
        return key_states, value_states


def streams_e_rows(model) -> bool:
    """Whether ``recompute_group_streaming`` supports the model (not with sliding-window attention)."""
    return not getattr(model.config, "sliding_window", None)


def rotary_table(model, n: int) -> tuple:
    """Rotary (cos, sin) of positions 0..n-1, shape (1, n, head_dim): rows [t0, t1) are exactly what the
    model computes for positions t0..t1-1 (each entry is one product and a cos/sin, so slicing the table
    changes no bit)."""
    p = next(model.parameters())
    return layout(model).rotary(torch.empty(0, dtype=p.dtype, device=p.device), _positions(n, p.device))


@torch.no_grad()
def recompute_group_streaming(model, a: int, b: int, n_tokens: int, e_rows: Callable[[int], tuple], chunk: int) -> LayerKV:
    """Receiver layers a..b over the context from the sender's E_a, as E_a's token rows arrive.

    Attention is causal, so tokens [t0, t1) of layers a..b need only E_a's first t1 rows and the
    K/V of earlier tokens. ``e_rows(t)`` blocks until at least t rows are in and returns (E, rows
    in); each step takes every row that is in, at least ``chunk`` more (one step when E is already
    complete). The group's
    recomputation overlaps E's own transfer instead of starting after it (the wait the
    max(compute, load) bound does not count). What does not depend on E's values -- the rotary
    table of every position, the first step's causal mask -- is made before the first wait. The same
    operations as recompute_group, except that matrix products run per chunk (float summation
    order), and no sliding-window support.
    """
    if not streams_e_rows(model):
        raise PlanError("streaming recomputation does not support sliding-window attention")
    p = next(model.parameters())
    device = p.device
    cos, sin = rotary_table(model, n_tokens)
    # With no padding and no past, transformers' SDPA path passes no mask whatever the length (its
    # causal fast path): then the probe's answer holds for the first step, which may take more rows.
    probe = torch.empty(1, min(n_tokens, max(chunk, 2)), model.config.hidden_size, dtype=p.dtype, device=device)
    probe_masks = fresh_masks(model, probe, _positions(probe.shape[1], device))
    first_masks = probe_masks if all(m is None for m in probe_masks.values()) else None  # None: make them then
    kv = AppendKV()
    t0 = 0
    while t0 < n_tokens:
        e, have = e_rows(min(n_tokens, t0 + chunk))  # at least one more chunk's rows: take all that are in
        t1 = min(n_tokens, have)
        hidden = e[:, t0:t1].to(device, p.dtype)
        if t0 == 0:  # no past: the model's own causal mask
            mask = first_masks
        else:  # query t0 + i sees keys j <= t0 + i (triu: 4x cheaper to build than a masked_fill)
            mask = torch.full((1, 1, t1 - t0, t1), torch.finfo(hidden.dtype).min, dtype=hidden.dtype,
                              device=device).triu_(t0 + 1)
        run_layers(model, hidden, torch.arange(t0, t1, device=device).view(1, -1), a, b + 1, kv, mask=mask,
                   pos_emb=(cos[:, t0:t1], sin[:, t0:t1]))
        t0 = t1
    return kv


class GroupMemo:
    """Recomputed layers of one context from one start layer, extended on demand and shared across plans.

    Groups [a, b] and [a, b'] run the same layers a..min(b, b') on the same input, so profiling every
    group (O(L) ends per start) need not redo them: keeping the running hidden state of the latest
    start turns O(L^3) layer passes per context into O(L^2). Running layers in two calls instead of
    one performs the same operations, so the K/V are bit-identical. Only the latest start is kept,
    which bounds memory at one full-depth KV; enumerate groups start-major to benefit.
    """

    def __init__(self, model, token_ids, sender: ContextCache | None):
        self.model, self.token_ids, self.sender = model, token_ids, sender
        self.start: int | None = None
        self.hidden, self.next_layer, self.kv = None, 0, LayerKV()

    @torch.no_grad()
    def group(self, a: int, b: int) -> LayerKV:
        if self.start != a:
            self.start, self.next_layer, self.kv = a, a, LayerKV()
            self.hidden = group_input(self.model, a, self.token_ids, self.sender)
        if self.next_layer <= b:
            pos = _positions(self.hidden.shape[1], self.hidden.device)
            self.hidden = run_layers(self.model, self.hidden, pos, self.next_layer, b + 1, self.kv)
            self.next_layer = b + 1
        return self.kv


@torch.no_grad()
def partial_prefill(model, plan: Plan, token_ids, sender: ContextCache | None,
                    memo: GroupMemo | None = None) -> list[tuple]:
    """Per-layer (K, V) of the shared context under ``plan``, assembled by the plan's kind
    (``ds_study.plans``): reused from ``sender``, recomputed, or blended.

    ``memo`` (a GroupMemo of the same model, context and sender) shares recomputed layers across plans.
    """
    check_supported(model)
    if (sender is not None and sender.token_ids and not torch.is_tensor(token_ids)
            and list(sender.token_ids) != list(token_ids)):
        raise PlanError("the sender cache was captured for a different context")
    kind = plan.impl
    if torch.is_tensor(token_ids) and not kind.batched:
        raise PlanError(f"{plan.kind} plans select tokens per context: prefill one context (a list of ids) at a time")
    return kind.prefill(model, plan, token_ids, sender, memo)


@torch.no_grad()
def groups_prefill(model, plan: Plan, token_ids, sender: ContextCache | None,
                   memo: GroupMemo | None = None) -> list[tuple]:
    """Recompute-group plans: each group [a, b] recomputed from the sender's E_a, every other layer reused."""
    n = model.config.num_hidden_layers
    rec = set(plan.recomputed_layers())
    if len(rec) < n and sender is None:
        raise PlanError(f"plan {plan.name} reuses layers {plan.reused_layers(n)} but no sender cache was given")
    layers: list = [None] * n
    for a, b in plan.groups:
        kv = memo.group(a, b) if memo is not None else recompute_group(model, a, b, token_ids, sender)
        for i in range(a, b + 1):
            layers[i] = (kv.k[i], kv.v[i])
    p = next(model.parameters())
    for i in range(n):
        if layers[i] is None:  # reused: on the receiver's device and in its dtype
            layers[i] = (sender.keys[i].to(p.device, p.dtype), sender.values[i].to(p.device, p.dtype))
    return layers


@torch.no_grad()
def reuse_only_prefill(model, plan: Plan, token_ids, sender: ContextCache) -> list[tuple]:
    """The receiver computes every layer itself, but the plan's layers read the sender's K/V.

    This isolates one layer's KV (paper Fig. 7) without injecting the sender's E anywhere.
    """
    if sender is None:
        raise PlanError(f"plan {plan.name} needs a sender cache")
    device = next(model.parameters()).device
    kv = MixedKV(sender, {i for a, b in plan.groups for i in range(a, b + 1)})
    hidden = layout(model).embed(as_ids(token_ids, device))
    run_layers(model, hidden, _positions(hidden.shape[1], device), 0, model.config.num_hidden_layers, kv)
    return [(kv.k[i], kv.v[i]) for i in range(model.config.num_hidden_layers)]


@torch.no_grad()
def cacheblend_prefill(model, token_ids: list[int], sender: ContextCache, ratio: float,
                       check_layer: int = 1) -> list[tuple]:
    """CacheBlend across models: recompute layers 0..check fully, then only the tokens whose K at
    ``check_layer`` deviates most from the sender's, keeping the sender's K/V for the rest."""
    if sender is None:
        raise PlanError("cacheblend needs a sender cache")
    n = model.config.num_hidden_layers
    device = next(model.parameters()).device
    T = len(token_ids)
    kv = LayerKV()
    hidden = layout(model).embed(torch.tensor([token_ids], device=device))
    hidden = run_layers(model, hidden, _positions(T, device), 0, check_layer + 1, kv)
    layers = [(kv.k[i], kv.v[i]) for i in range(check_layer + 1)]
    if check_layer + 1 >= n:
        return layers
    deviation = ((kv.k[check_layer] - sender.keys[check_layer].to(device)) ** 2).sum(dim=(0, 1, 3))
    n_sel = max(1, math.ceil(ratio * T))
    sel = torch.topk(deviation, n_sel).indices.sort().values
    q_pos, kv_pos = sel.view(-1, 1), torch.arange(T, device=device).view(1, -1)
    masks = {}  # selected queries over all keys, per attention type (sliding: only the last `window` keys)
    for kind in {layer_type(model.config, i) for i in range(check_layer + 1, n)}:
        blocked = kv_pos > q_pos
        if kind == "sliding_attention":
            blocked |= kv_pos <= q_pos - model.config.sliding_window
        masks[kind] = torch.zeros(1, 1, n_sel, T, dtype=hidden.dtype, device=device).masked_fill_(
            blocked, torch.finfo(hidden.dtype).min)
    blend = BlendKV(sender, sel)
    run_layers(model, hidden[:, sel], sel.unsqueeze(0), check_layer + 1, n, blend, mask=masks)
    return layers + [(blend.k[i], blend.v[i]) for i in range(check_layer + 1, n)]


def lower_right_exact(model, past: int, new: int) -> bool:
    """Whether ``new`` tokens after ``past`` cached ones can attend through torch's lower-right causal
    bias and compute exactly what transformers' own forward computes: SDPA attention, only
    full-attention layers (no sliding window), a non-empty context, more than one new token."""
    cfg = model.config
    return (past > 0 and new > 1 and getattr(cfg, "_attn_implementation", None) == "sdpa"
            and all(layer_type(cfg, i) == "full_attention" for i in range(cfg.num_hidden_layers)))


@dataclass
class SuffixInputs:
    """What the final prompt pass needs before any context K/V is there (see ``prepare_suffix``)."""

    past: int
    hidden: torch.Tensor  # the suffix's embeddings
    positions: torch.Tensor
    pos_emb: tuple
    mask: object  # torch's lower-right causal bias


def prepare_suffix(model, ids: torch.Tensor, past: int) -> SuffixInputs | None:
    """The suffix's embeddings, positions, rotary table and causal bias after ``past`` context tokens,
    or None where ``lower_right_exact`` says transformers' own forward must run the pass. None of it
    depends on the context's K/V, so a receiver can make it while it still waits for them."""
    new = ids.shape[1]
    if not lower_right_exact(model, past, new):
        return None
    from torch.nn.attention.bias import causal_lower_right

    positions = torch.arange(past, past + new, device=ids.device).unsqueeze(0)
    hidden = layout(model).embed(ids)
    return SuffixInputs(past, hidden, positions, layout(model).rotary(hidden, positions),
                        causal_lower_right(new, past + new))


def suffix_pass(model, ids: torch.Tensor, cache, prepared: SuffixInputs | None = None) -> torch.Tensor:
    """Final-norm hidden states of ``ids`` run through every layer after the context held in ``cache``.

    Transformers builds an explicit boolean mask for a query block that follows cached tokens; the
    same causal attention expressed as torch's lower-right causal bias needs no mask tensor (on
    CUDA SDPA may then pick its flash kernel; elsewhere it materializes the identical mask, so on
    CPU the result is bitwise transformers', tested). It is also what the engine's CUDA-graphed
    final pass captures. Where ``lower_right_exact`` says no: transformers' own forward.
    ``prepared``: ``prepare_suffix`` of these ids after this cache's length, made earlier.
    """
    past = cache.get_seq_length()
    if prepared is None:
        prepared = prepare_suffix(model, ids, past)
    elif prepared.past != past:
        raise ValueError(f"suffix inputs were prepared after {prepared.past} context tokens, the cache holds {past}")
    if prepared is None:
        return layout(model).body(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
    hidden = run_layers(model, prepared.hidden, prepared.positions, 0, model.config.num_hidden_layers, cache,
                        mask=prepared.mask, pos_emb=prepared.pos_emb)
    return layout(model).norm(hidden)


@dataclass
class Decoded:
    token_ids: list[int]
    first_logits: torch.Tensor  # logits of the first generated token, [vocab]
    last_hidden: torch.Tensor  # final-norm hidden state of the last prompt token, [hidden]
    suffix_hidden: torch.Tensor  # final-norm hidden states of all suffix tokens, [suffix, hidden]


@torch.no_grad()
def decode(model, layers: list[tuple], suffix_ids, max_new_tokens: int,
           eos_token_id: int | None = None, cache=None, stop=None, prepared: SuffixInputs | None = None) -> Decoded:
    """Run the suffix through every layer against the context's K/V, then greedy decoding.

    ``suffix_ids``: token ids, or a (1, n) tensor already on the device. Staging it early matters on
    CUDA: building it here from a Python list is a blocking copy that waits for all queued GPU work,
    which would stop the host from issuing the suffix pass while a recompute group still runs.
    ``stop(generated_ids)``: end decoding early once it returns True (see metrics.stop_rule).
    ``prepared``: the suffix's ``prepare_suffix``, made earlier (the engine makes it while it waits)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    if cache is None:
        cache = DynamicCache(ddp_cache_data=[(k.to(device), v.to(device)) for k, v in layers], config=model.config)
    ids = suffix_ids if torch.is_tensor(suffix_ids) else torch.tensor([suffix_ids], device=device)
    return greedy_after(model, cache, suffix_pass(model, ids, cache, prepared)[0], max_new_tokens, eos_token_id, stop)


@torch.no_grad()
def greedy_after(model, cache, hidden: torch.Tensor, max_new_tokens: int, eos_token_id=None, stop=None,
                 logits: torch.Tensor | None = None) -> Decoded:
    """Greedy decoding once the prompt has been run: ``hidden`` [suffix, hidden] are its final-norm
    states, ``cache`` holds every prompt token's K/V, ``logits`` the first token's (if already computed)."""
    device = hidden.device
    if logits is None:
        logits = layout(model).head(hidden[-1:])[0]
    first, generated = logits, []
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    for _ in range(max_new_tokens):
        tok = int(logits.argmax())
        if tok in eos:
            break
        generated.append(tok)
        if len(generated) == max_new_tokens or (stop is not None and stop(generated)):
            break
        out = layout(model).body(input_ids=torch.tensor([[tok]], device=device), cache=cache, use_cache=True)
        logits = layout(model).head(out.last_hidden_state[0, -1:])[0]
    return Decoded(generated, first.float().cpu(), hidden[-1].float().cpu(), hidden.float().cpu())


@torch.no_grad()
def run_plan(receiver, sender_model, plan: Plan, prefix_ids: list[int], suffix_ids: list[int],
             max_new_tokens: int, eos_token_id=None, sender_cache: ContextCache | None = None,
             memo: GroupMemo | None = None, stop=None) -> Decoded:
    """Execute one plan end to end. A plan whose kind decodes with the sender (``sender``) runs on the
    sender model and its own cache, captured here if not given."""
    model = sender_model if plan.impl.decoder == "sender" else receiver
    if sender_cache is None and plan.impl.decoder == "sender":
        sender_cache = capture(sender_model, prefix_ids, with_embeds=False)
    layers = partial_prefill(receiver, plan, prefix_ids, sender_cache, memo)
    return decode(model, layers, suffix_ids, max_new_tokens, eos_token_id, stop=stop)
