"""Exact attention with logit softcapping (Gemma 2), for where no fused kernel caps.

Gemma 2 caps every attention logit: ``s = cap * tanh(s / cap)`` after scaling and before
masking and the softmax. torch's SDPA kernels cannot do that, and neither can the lean CPU
backward, so the SDPA backend routes softcapped layers here. The work is cut into blocks of
(rows, query tokens) whose score matrices hold at most ``BLOCK_ELEMENTS`` numbers; the
backward recomputes each block's scores from q and k (as flash attention does) instead of
keeping them, so memory is O(block) beyond q, k, v and their gradients, for any group size.
Scores and softmax are computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 23
"""Upper bound on one block's score matrix (8M numbers: 32 MiB in fp32)."""


def softcap_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scaling: float | None,
    softcap: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """q: [R, H, Lq, D]; k/v: [R, H, Lk, D] (kv heads already repeated); mask: bool
    [R or 1, 1, Lq, Lk], end-aligned causal (query i may only see keys <= i + Lk - Lq),
    or None for plain causal (Lq == Lk). Returns [R, H, Lq, D]."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if dropout:
        return _with_dropout(query, key, value, mask, scale, softcap, dropout)
    return _SoftcapAttention.apply(query, key, value, mask, scale, float(softcap))


def _blocks(rows: int, heads: int, lq: int, lk: int):
    """(row slice, first query, end query) blocks of at most BLOCK_ELEMENTS scores."""
    per_row = heads * lq * lk
    if per_row <= BLOCK_ELEMENTS:
        step = max(1, BLOCK_ELEMENTS // per_row)
        for r in range(0, rows, step):
            yield slice(r, min(rows, r + step)), 0, lq
        return
    qb = max(1, BLOCK_ELEMENTS // (heads * lk))
    for r in range(rows):
        for a in range(0, lq, qb):
            yield slice(r, r + 1), a, min(lq, a + qb)


def _allowed(mask, rows, a, b, kend, offset, device) -> torch.Tensor:
    """[r or 1, 1, b - a, kend] bool for a block."""
    if mask is None:
        i = torch.arange(a, b, device=device)[:, None]
        j = torch.arange(kend, device=device)[None, :]
        return (j <= i)[None, None]
    m = mask if mask.shape[0] == 1 else mask[rows]
    return m[:, :, a:b, :kend]


def _scores(qb, kb, scale, cap):
    """Capped scores and tanh of the scaled ones (the backward needs it), fp32."""
    t = torch.tanh((qb @ kb.transpose(-1, -2)) * (scale / cap))
    return t * cap, t


class _SoftcapAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, cap):
        r, h, lq, _ = q.shape
        lk = k.shape[2]
        offset = lk - lq
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(r, h, lq, dtype=torch.float32, device=q.device)  # [R, H, Lq]
        for rows, a, b in _blocks(r, h, lq, lk):
            kend = min(lk, b + offset)
            qb, kb, vb = q[rows, :, a:b].float(), k[rows, :, :kend].float(), v[rows, :, :kend].float()
            c, _ = _scores(qb, kb, scale, cap)
            c = c.masked_fill_(~_allowed(mask, rows, a, b, kend, offset, q.device), float("-inf"))
            block_lse = torch.logsumexp(c, -1)  # [r, H, b - a]
            p = c.sub_(block_lse[..., None]).exp_()
            out[rows, :, a:b] = (p @ vb).to(out.dtype)
            lse[rows, :, a:b] = block_lse
        ctx.save_for_backward(q, k, v, out, lse, *(() if mask is None else (mask,)))
        ctx.has_mask, ctx.scale, ctx.cap = mask is not None, scale, cap
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *rest = ctx.saved_tensors
        mask = rest[0] if ctx.has_mask else None
        scale, cap = ctx.scale, ctx.cap
        r, h, lq, _ = q.shape
        lk = k.shape[2]
        offset = lk - lq
        delta = (grad_out.float() * out.float()).sum(-1)  # [R, H, Lq]: rowsum(dP * P)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for rows, a, b in _blocks(r, h, lq, lk):
            kend = min(lk, b + offset)
            qb, kb, vb = q[rows, :, a:b].float(), k[rows, :, :kend].float(), v[rows, :, :kend].float()
            go = grad_out[rows, :, a:b].float()
            c, t = _scores(qb, kb, scale, cap)
            c = c.masked_fill_(~_allowed(mask, rows, a, b, kend, offset, q.device), float("-inf"))
            p = c.sub_(lse[rows, :, a:b, None]).exp_()  # [r, H, bq, kend]
            dv[rows, :, :kend] += p.transpose(-1, -2) @ go
            dp = go @ vb.transpose(-1, -2)
            # d softmax, then d(cap * tanh(x / cap)) = 1 - tanh^2, then the scale
            ds = p.mul_(dp.sub_(delta[rows, :, a:b, None])).mul_(1 - t * t).mul_(scale)
            dq[rows, :, a:b] += ds @ kb
            dk[rows, :, :kend] += ds.transpose(-1, -2) @ qb
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _with_dropout(q, k, v, mask, scale, cap, dropout):
    """Plain autograd (keeps every block's probabilities for the backward): dropout needs
    the same random mask in both passes, which the recomputing backward cannot give."""
    lq, lk = q.shape[2], k.shape[2]
    allowed = _allowed(mask, slice(None), 0, lq, lk, lk - lq, q.device)
    scores, _ = _scores(q.float(), k.float(), scale, cap)
    p = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    p = torch.nn.functional.dropout(p, dropout)
    return (p @ v.float()).to(q.dtype)
