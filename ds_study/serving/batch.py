"""Iteration-level batching (Orca, vLLM): every running request of a model takes one decode step in
one forward pass, and requests join and leave between steps.

The batch keeps one left-padded K/V tensor per layer; a request joining pads either itself or the
batch to the longer history, a request leaving drops its row (and any all-padding columns). Each
row carries its own positions and padding mask, so a row's tokens are the ones it would get
decoded alone, up to float summation order (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ds_study.arch import layout


@dataclass
class Row:
    """One decoding request: the token it feeds next, at which position, and when to stop."""

    key: object  # the caller's handle (a request name or record)
    next_token: int
    position: int  # of next_token: the number of tokens already in this row's cache
    remaining: int  # tokens still to generate (next_token, already out, not counted)
    eos: set = field(default_factory=set)


class DecodeBatch:
    """The running requests of one model, decoded together one token per ``step``."""

    def __init__(self, model):
        cfg = model.config
        if getattr(cfg, "sliding_window", None) and any(
                t == "sliding_attention" for t in (getattr(cfg, "layer_types", None) or [])):
            raise ValueError("batched decoding here supports full-attention models only")
        self.model = model
        self.rows: list[Row] = []
        self.keys: list[torch.Tensor] = []  # per layer (B, H, T, D), left-padded
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (B, T): 1 where a row has a real token

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, row: Row, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Add a request whose prompt (and any generated tokens before ``row.next_token``) is in
        ``layers``: one (K, V) per layer, each (1, H, T, D)."""
        t_new = layers[0][0].shape[-2]
        device = layers[0][0].device
        new_mask = torch.ones(1, t_new, dtype=torch.long, device=device)
        if not self.rows:
            self.keys = [k for k, _ in layers]
            self.values = [v for _, v in layers]
            self.mask = new_mask
            self.rows = [row]
            return
        t_old = self.mask.shape[1]
        width = max(t_old, t_new)
        self.keys = [torch.cat([_left_pad(a, width), _left_pad(k, width)]) for a, (k, _) in zip(self.keys, layers)]
        self.values = [torch.cat([_left_pad(a, width), _left_pad(v, width)]) for a, (_, v) in zip(self.values, layers)]
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(new_mask, width)])
        self.rows.append(row)

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int, bool]]:
        """One decode step for every row: (row, the token it generated or None at end-of-sequence,
        whether the row is done). Rows that are done have left the batch when this returns."""
        if not self.rows:
            return []
        device = self.keys[0].device
        ids = torch.tensor([[r.next_token] for r in self.rows], device=device)
        pos = torch.tensor([[r.position] for r in self.rows], device=device)
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=device)], dim=1)
        cache = DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)), config=self.model.config)
        parts = layout(self.model)
        out = parts.body(input_ids=ids, cache=cache, attention_mask=mask, position_ids=pos, use_cache=True)
        tokens = parts.head(out.last_hidden_state[:, -1]).argmax(-1).tolist()
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.mask = mask
        produced, keep = [], []
        for j, (row, tok) in enumerate(zip(self.rows, tokens)):
            if tok in row.eos:  # the end: not part of the output
                produced.append((row, None, True))
                continue
            row.remaining -= 1
            done = row.remaining <= 0
            produced.append((row, tok, done))
            if not done:
                row.next_token, row.position = tok, row.position + 1
                keep.append(j)
        if len(keep) < len(self.rows):
            self._keep(keep)
        return produced

    def _keep(self, idx: list[int]) -> None:
        self.rows = [self.rows[j] for j in idx]
        if not idx:
            self.keys, self.values, self.mask = [], [], torch.zeros(0, 0, dtype=torch.long)
            return
        sel = torch.tensor(idx, device=self.mask.device)
        mask = self.mask.index_select(0, sel)
        lead = int((mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding in every row
        self.mask = mask[:, lead:]
        self.keys = [k.index_select(0, sel)[..., lead:, :] for k in self.keys]
        self.values = [v.index_select(0, sel)[..., lead:, :] for v in self.values]


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the token axis (-2 for K/V, -1 for a mask) on the left to ``width``."""
    axis = -1 if t.dim() == 2 else -2
    short = width - t.shape[axis]
    if short == 0:
        return t
    shape = list(t.shape)
    shape[axis] = short
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim=axis)
