"""Per-layer deviation between the sender's and the receiver's view of the same context.

For each layer: relative L2 distance ``||x_sender - x_receiver|| / ||x_receiver||`` and mean
per-token cosine similarity of K, V and E, plus ``attn_cos``: the cosine between the attention
output the receiver computes at that layer from its own hidden state with its *own* K/V and with
the *sender's* K/V. KV-fit statistics are weak predictors of downstream quality, attention-output
agreement much better (reference.md §3), so both are reported.
"""

from __future__ import annotations

import torch

from ds_study.arch import layout
from ds_study.caches import ContextCache
from ds_study.executor import SubstituteKV, fresh_masks, layer_type

COLUMNS = ("k_dev", "v_dev", "e_dev", "k_cos", "v_cos", "e_cos", "attn_cos")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[1, heads, T, d] or [1, T, d] -> [T, features] (float64 for exact zeros and stable sums)."""
    x = x.detach().double()
    return x[0].transpose(0, 1).reshape(x.shape[2], -1) if x.dim() == 4 else x[0]


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over all elements, in float64 (0 exactly when x == ref)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref).clamp_min(1e-30))


def token_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(_tokens(a), _tokens(b), dim=-1, eps=1e-30).mean())


@torch.no_grad()
def attention_outputs(model, layer: int, own: ContextCache, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Receiver's attention output at ``layer`` (its own query from its own E) over the given K/V."""
    parts = layout(model)
    hidden = parts.attention_norm(layer)(own.embeds[layer])
    pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    pos_emb = parts.rotary(hidden, pos)
    mask = fresh_masks(model, hidden, pos)[layer_type(model.config, layer)]
    out = parts.attention(layer)(hidden_states=hidden, position_embeddings=pos_emb, attention_mask=mask,
                          cache=SubstituteKV(keys, values))
    return out[0] if isinstance(out, tuple) else out


def layer_deviation(receiver_model, receiver: ContextCache, sender: ContextCache) -> list[dict]:
    """One row per layer for one context (receiver and sender caches must include E)."""
    rows = []
    for i in range(receiver.n_layers):
        own = attention_outputs(receiver_model, i, receiver, receiver.keys[i], receiver.values[i])
        theirs = attention_outputs(receiver_model, i, receiver, sender.keys[i], sender.values[i])
        rows.append({
            "layer": i,
            "k_dev": rel_l2(sender.keys[i], receiver.keys[i]),
            "v_dev": rel_l2(sender.values[i], receiver.values[i]),
            "e_dev": rel_l2(sender.embeds[i], receiver.embeds[i]),
            "k_cos": token_cos(sender.keys[i], receiver.keys[i]),
            "v_cos": token_cos(sender.values[i], receiver.values[i]),
            "e_cos": token_cos(sender.embeds[i], receiver.embeds[i]),
            "attn_cos": token_cos(theirs, own),
        })
    return rows


def summarize(per_example):
    """Mean per layer plus spread (std, p25, p75) over examples: the columns of deviation.csv."""
    import pandas as pd

    df = pd.DataFrame(per_example)
    g = df.groupby("layer")[list(COLUMNS)]
    out = g.mean()
    for stat, fn in (("std", g.std(ddof=0)), ("p25", g.quantile(0.25)), ("p75", g.quantile(0.75))):
        out = out.join(fn.add_suffix(f"_{stat}"))
    out.insert(0, "n_examples", g.size())
    return out.reset_index()
