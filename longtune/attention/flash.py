"""flash-attn's varlen kernel for S2-Attn (CUDA, fp16/bf16). flash-attn is imported only here,
and only when this backend runs; the cu_seqlens plumbing is ``varlen.py``'s."""

from __future__ import annotations

import torch

from longtune.attention import backends
from longtune.attention.varlen import varlen_attention


def flash_kernel(q, k, v, cu, max_len, *, scale, window, softcap, dropout) -> torch.Tensor:
    """``flash_attn_varlen_func`` over [T, H, D] tokens cut by ``cu``; GQA, softcap, dropout
    and windows native (``window_size=(window - 1, 0)``: itself and window - 1 earlier keys)."""
    from flash_attn import flash_attn_varlen_func

    kwargs = {}
    if softcap is not None:
        if "softcap" not in backends.signature_params(flash_attn_varlen_func):
            raise RuntimeError("this flash-attn has no softcap argument (flash-attn >= 2.6 has)")
        kwargs["softcap"] = softcap
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len,
        dropout_p=dropout, softmax_scale=scale, causal=True,
        window_size=(window - 1, 0) if window is not None else (-1, -1),
        **kwargs,
    )


def flash_s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group_size: int | None,
    shift: str,
    valid: torch.Tensor | None,
    docs: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    window: int | None = None,
    softcap: float | None = None,
    anchors: tuple = (),
) -> torch.Tensor:
    """q: [B, H, N, D], k/v: [B, Hkv, N, D] -> [B, N, H, D] (group_size None: full attention)."""
    return varlen_attention(
        query, key, value, kernel=flash_kernel, group_size=group_size, shift=shift, valid=valid,
        docs=docs, scaling=scaling, dropout=dropout, window=window, softcap=softcap, anchors=anchors,
    )
