"""Full causal attention over packed or padded rows without an N x N mask (SDPA backend).

Each run of real tokens of one document in a row (see ``masks.token_runs``) is its own
causal attention call on a view of q/k/v, so a packed 32k-token row costs what its
documents cost and no mask at all. With a sliding window, a run longer than the window is
cut into query blocks of ``window`` tokens, each attending to the keys of its own and the
previous block under a small band mask. Padded queries attend to themselves only (their
output is the value at that position), as in ``masks.group_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from longtune.attention.softcap import softcap_attention


def _band(lq: int, lk: int, window: int, device) -> torch.Tensor:
    """[1, 1, lq, lk] bool, end-aligned: query i sits at key position i + lk - lq."""
    i = torch.arange(lq, device=device)[:, None] + (lk - lq)
    j = torch.arange(lk, device=device)[None, :]
    return ((j <= i) & (i - j < window))[None, None]


def _attend(q, k, v, mask, scaling, dropout, softcap):
    """[1, H, Lq, D] x [1, H, Lk, D] -> [1, H, Lq, D]; mask None = square causal."""
    if softcap is not None:
        return softcap_attention(q, k, v, mask, scaling=scaling, softcap=softcap, dropout=dropout)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
    )


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    runs: list[tuple[int, int, int]],
    *,
    padded: bool,
    window: int | None,
    scaling: float | None,
    dropout: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """q/k/v: [B, H, N, D] (kv heads repeated) -> [B, N, H, D]. ``runs``: (row, start, end);
    ``padded``: some positions are in no run (they get their own value)."""
    b, h, n, d = query.shape
    out = value.transpose(1, 2).clone() if padded else query.new_empty(b, n, h, d)  # [B, N, H, D]
    bands: dict[tuple[int, int], torch.Tensor] = {}
    for row, start, end in runs:
        r = slice(row, row + 1)
        if window is None or end - start <= window:
            blocks = [(start, end, start)]
        else:
            blocks = [(a, min(end, a + window), max(start, a - window + 1)) for a in range(start, end, window)]
        for qa, qb, ka in blocks:
            if ka == qa and (window is None or qb - qa <= window):
                mask = None  # square and within the window: plain causal
            else:
                shape = (qb - qa, qb - ka)
                if shape not in bands:
                    bands[shape] = _band(*shape, window, query.device)
                mask = bands[shape]
            o = _attend(query[r, :, qa:qb], key[r, :, ka:qb], value[r, :, ka:qb], mask, scaling, dropout, softcap)
            out[row, qa:qb] = o[0].transpose(0, 1)
    return out
