"""S2-Attn (and full attention) over variable-length-sequence kernels (CUDA, fp16/bf16).

Every (row, group, document) run of real tokens becomes one sequence, described by
``cu_seqlens``; each half of the heads is one kernel call over its unpadded tokens. So
padding costs nothing, packed documents never see each other, batch > 1 with padding is
exact (the case LongLoRA's own flash path gets wrong), and no mask is ever built. Padded
positions return zeros, as flash-attn's own padding-free path does.

Two kernels share this plumbing: flash-attn's ``flash_attn_varlen_func`` (``flash.py``) and
torch's built-in ``torch.nn.attention.varlen.varlen_attn`` (here, ``torch_varlen_kernel``).
A kernel is called as ``kernel(q, k, v, cu, max_len, scale=, window=, softcap=, dropout=)``
with q: [T, H, D], k/v: [T, Hkv, D], causal within each sequence, and returns [T, H, D].
"""

from __future__ import annotations

from typing import Callable

import torch

from longtune.attention import backends
from longtune.attention.masks import per_forward, repeat_kv, varlen_sequences

Kernel = Callable[..., torch.Tensor]


def varlen_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    kernel: Kernel,
    group_size: int | None,
    shift: str = "split",
    valid: torch.Tensor | None,
    docs: torch.Tensor | None,
    scaling: float | None,
    dropout: float = 0.0,
    window: int | None = None,
    softcap: float | None = None,
    anchors: tuple = (),
    always_shift: bool = False,
) -> torch.Tensor:
    """q: [B, H, N, D], k/v: [B, Hkv, N, D] -> [B, N, H, D]. ``group_size=None``: full causal
    attention (every head sees its whole document), else S2-Attn with that group size
    (``always_shift``: shifted even when N is one group, as ``s2_attention`` says)."""
    b, h, n, d = query.shape
    n_rep = h // key.shape[1]
    hu = h // 2
    full = group_size is None or n < group_size or (n == group_size and not always_shift)
    if not full and hu % n_rep:  # a half must own whole kv heads; else give every query head its own
        key, value, n_rep = repeat_kv(key, n_rep), repeat_kv(value, n_rep), 1
    hkv = key.shape[1]
    device = query.device

    def plan():
        pos = torch.arange(n, device=device)
        if full:
            orders = [(pos, pos * 0)]
        else:
            half = group_size // 2
            orders = [(pos, pos // group_size)]
            if shift == "split":
                orders.append((pos, (pos + half) // group_size))
            else:  # roll: visit token (r + g/2) mod n at rolled position r
                orders.append(((pos + half) % n, pos // group_size))
        return [varlen_sequences(b, n, group_of, order, valid, docs, device) for order, group_of in orders]

    sequences = per_forward(anchors, ("varlen", b, n, group_size if not full else None, shift, device), plan)
    if full:
        heads = [(slice(0, h), slice(0, hkv))]
    else:
        heads = [(slice(0, hu), slice(0, hu // n_rep)), (slice(hu, h), slice(hu // n_rep, hkv))]

    out = query.new_zeros(b * n, h, d)
    q_tok = query.transpose(1, 2).reshape(b * n, h, d)  # [B * N, H, D]
    k_tok = key.transpose(1, 2).reshape(b * n, hkv, d)
    v_tok = value.transpose(1, 2).reshape(b * n, hkv, d)
    for (q_heads, kv_heads), (flat, cu, max_len) in zip(heads, sequences):
        if flat.numel() == 0:
            continue
        o = kernel(
            q_tok[flat, q_heads], k_tok[flat, kv_heads], v_tok[flat, kv_heads], cu, max_len,
            scale=scaling, window=window, softcap=softcap, dropout=dropout,
        )
        out[flat, q_heads] = o
    return out.view(b, n, h, d)


def torch_varlen_kernel(q, k, v, cu, max_len, *, scale, window, softcap, dropout) -> torch.Tensor:
    """torch's ``varlen_attn``, whichever way this torch spells it: causal through
    ``window_size`` (torch >= 2.11) or ``is_causal`` (2.10); GQA through ``enable_gqa`` where it
    exists, else kv heads repeated; a custom scale folded into q where ``scale`` is missing.
    ``backends.pick_backend`` has already refused softcap, dropout, and a window it lacks."""
    func, why = backends.torch_varlen_probe()
    if func is None:
        raise RuntimeError(why)
    if softcap is not None or dropout:
        raise RuntimeError("torch varlen_attn has no softcap and no dropout (pick_backend routes those elsewhere)")
    params = backends.signature_params(func)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (window - 1, 0) if window is not None else (-1, 0)
    elif window is not None:
        raise RuntimeError(f"this torch's varlen_attn has no window_size argument (sliding window {window})")
    else:
        kwargs["is_causal"] = True
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:
            q = q * (scale * q.shape[-1] ** 0.5)
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return func(q, k, v, cu, cu, max_len, max_len, **kwargs)
