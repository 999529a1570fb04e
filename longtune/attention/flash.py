"""flash-attn varlen backend for S2-Attn (CUDA, fp16/bf16). Imported only when used.

Each half of the heads becomes one ``flash_attn_varlen_func`` call over unpadded tokens:
every (row, group, document) run of real tokens is one variable-length sequence, described
by ``cu_seqlens``. So padding costs nothing, packed documents never see each other, and
batch > 1 with padding is exact (the case LongLoRA's own flash path gets wrong). Padded
positions return zeros, as flash-attn's own padding-free path does.
"""

from __future__ import annotations

import torch

from longtune.attention.s2 import repeat_kv


def _sequences(
    batch: int, seq: int, group_of: torch.Tensor, order: torch.Tensor,
    valid: torch.Tensor | None, docs: torch.Tensor | None, device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For tokens visited in ``order`` (per row), the flat indices of the real ones and the
    cu_seqlens that cut them into (row, group, document) runs."""
    rows = torch.arange(batch, device=device)[:, None].expand(batch, seq)
    groups = group_of[None].expand(batch, seq)
    flat = (rows * seq + order[None]).reshape(-1)  # index into [B * N] tokens
    keep = torch.ones(batch * seq, dtype=torch.bool, device=device)
    if valid is not None:
        keep = valid.reshape(-1)[flat]
    doc = docs.reshape(-1)[flat] if docs is not None else torch.zeros_like(flat)
    flat, rows, groups, doc = flat[keep], rows.reshape(-1)[keep], groups.reshape(-1)[keep], doc[keep]
    start = torch.ones_like(flat, dtype=torch.bool)
    start[1:] = (rows[1:] != rows[:-1]) | (groups[1:] != groups[:-1]) | (doc[1:] != doc[:-1])
    starts = start.nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return flat, cu, max_len


def flash_s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group_size: int,
    shift: str,
    valid: torch.Tensor | None,
    docs: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    window: int | None = None,
) -> torch.Tensor:
    """q: [B, H, N, D], k/v: [B, Hkv, N, D] -> [B, N, H, D]."""
    from flash_attn import flash_attn_varlen_func

    b, h, n, d = query.shape
    n_rep = h // key.shape[1]
    hu = h // 2
    if hu % n_rep:  # a half must own whole kv heads; else give every query head its own
        key, value, n_rep = repeat_kv(key, n_rep), repeat_kv(value, n_rep), 1
    device = query.device
    pos = torch.arange(n, device=device)
    half = group_size // 2
    single = n <= group_size

    # (heads slice, kv heads slice, visiting order, group of each visited position)
    plans = [(slice(0, hu), slice(0, hu // n_rep), pos, pos // group_size if not single else pos * 0)]
    if single:
        plans.append((slice(hu, h), slice(hu // n_rep, None), pos, pos * 0))
    elif shift == "split":
        plans.append((slice(hu, h), slice(hu // n_rep, None), pos, (pos + half) // group_size))
    else:  # roll: visit token (r + g/2) mod n at rolled position r
        plans.append((slice(hu, h), slice(hu // n_rep, None), (pos + half) % n, pos // group_size))

    out = query.new_zeros(b * n, h, d)
    q_tok = query.transpose(1, 2).reshape(b * n, h, d)
    k_tok = key.transpose(1, 2).reshape(b * n, key.shape[1], d)
    v_tok = value.transpose(1, 2).reshape(b * n, value.shape[1], d)
    for heads, kv_heads, order, group_of in plans:
        flat, cu, max_len = _sequences(b, n, group_of, order, valid, docs, device)
        o = flash_attn_varlen_func(
            q_tok[flat, heads], k_tok[flat, kv_heads], v_tok[flat, kv_heads],
            cu, cu, max_len, max_len,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
            window_size=(window - 1, 0) if window is not None else (-1, -1),
        )
        out[flat, heads] = o
    return out.view(b, n, h, d)
