"""Dense-mask reference for S2-Attn: the exact boolean mask each head obeys, and attention
computed with it. Written independently of the fast path (no folding, no slicing), straight
from the definitions in ``longtune.attention.s2``, so tests can hold one against the other.
O(N^2) memory: for tests and small inputs only."""

from __future__ import annotations

from typing import Literal

import torch

Shift = Literal["split", "roll"]


def _document_ids(position_ids: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor:
    docs = torch.zeros(batch, seq, dtype=torch.long)
    if position_ids is None:
        return docs
    pos = position_ids.reshape(-1, seq).expand(batch, seq).cpu()
    for b in range(batch):
        for t in range(1, seq):
            docs[b, t] = docs[b, t - 1] + int(pos[b, t] != pos[b, t - 1] + 1)
    return docs


def s2_reference_mask(
    batch: int,
    heads: int,
    seq: int,
    group_size: int,
    shift: Shift = "split",
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """[batch, heads, seq(query), seq(key)] bool: True where the query may attend the key."""
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    half = group_size // 2
    per_head = []
    for h in range(heads):
        shifted = h >= heads // 2 and seq > group_size
        qi, kj = i, j  # positions in the order the head attends in
        if not shifted:
            allowed = (i // group_size == j // group_size) & (j <= i)
            if seq <= group_size:
                allowed = j <= i
        elif shift == "split":
            allowed = ((i + half) // group_size == (j + half) // group_size) & (j <= i)
        else:  # roll: token t sits at rolled position (t - g/2) mod seq
            qi, kj = (i - half) % seq, (j - half) % seq
            allowed = (qi // group_size == kj // group_size) & (kj <= qi)
        if sliding_window is not None:
            allowed = allowed & (qi - kj < sliding_window)
        per_head.append(allowed)
    mask = torch.stack(per_head)[None].expand(batch, heads, seq, seq).clone()
    docs = _document_ids(position_ids, batch, seq)
    mask &= (docs[:, :, None] == docs[:, None, :])[:, None]
    if attention_mask is not None:
        real = attention_mask.to(torch.bool).cpu()
        mask &= real[:, None, None, :]  # no query sees a padded key
        mask &= real[:, None, :, None]  # a padded query sees nothing else ...
    mask |= torch.eye(seq, dtype=torch.bool)  # ... and every query sees itself
    return mask


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention under a dense [B, H, N, N] mask. Returns [B, N, H, D].

    ``softcap`` (Gemma 2): logits become ``softcap * tanh(logits / softcap)`` after scaling,
    before the mask, as the model's own eager attention does."""
    h = query.shape[1]
    n_rep = h // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = (query @ key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask.to(scores.device), float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)
