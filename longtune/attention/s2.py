"""Shifted sparse attention (S2-Attn, LongLoRA) over [batch, heads, seq, head_dim] tensors.

The pattern, for a sequence of N tokens and groups of G tokens (G even):

* heads ``[0, H//2)`` ("unshifted") attend causally within groups ``[0, G), [G, 2G), ...``;
* heads ``[H//2, H)`` ("shifted", as in LongLoRA's code) attend causally within groups moved
  by G/2. Two ways to move them exist:

  - ``shift="split"`` (default): group boundaries at ``G/2, 3G/2, ...``; the first group
    ``[0, G/2)`` and the last group are half size. Nothing wraps, so no token ever sees a
    later token. This is LongLoRA's flash-attention training path.
  - ``shift="roll"``: the paper's Algorithm 1: roll the shifted heads' q/k/v by -G/2, attend
    in groups of G, roll back. The last rolled group holds the sequence's last G/2 tokens
    followed by its first G/2 tokens, so tokens ``[0, G/2)`` attend to tokens
    ``[N - G/2, N)``: a **future-token leak**. Kept only to reproduce published numbers.

Every head additionally obeys the padding mask (no query attends to a padded key) and
document boundaries (a new document starts wherever ``position_ids[t] !=
position_ids[t-1] + 1``, the rule transformers uses for packed rows), so no token attends
across padding or documents. A query whose every key is masked (a padded query) attends to
itself only, which keeps its output finite: a NaN there would reach the weights through the
backward pass even though the loss ignores that position.

Edge cases, decided:

* ``seq <= group_size``: the sequence is one group, no shift: plain causal attention.
* ``seq % group_size != 0``: split mode pads the sequence internally at the end (those keys
  lie in every real query's future, so they need no mask); the last groups are shorter.
  Roll mode raises (its wrap-around is defined on whole groups only).
* An odd number of heads: the shifted half gets the extra head (``H - H//2`` heads), as
  LongLoRA's ``num_heads // 2`` split does. One head cannot be split: error.
* GQA/MQA: key/value heads are repeated to the query heads before the split.
* ``sliding_window`` (Mistral, Qwen2 layers): a query sees at most the last ``window``
  tokens (itself included), on top of everything above. When groups are no larger than
  the window, this changes nothing and costs nothing.

Speed: groups are folded into the batch dimension (views, no copy, in the layout transformers
produces) and each fold is one SDPA call, so torch's fused causal kernel does the work.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

Shift = Literal["split", "roll"]
Backend = Literal["auto", "sdpa", "flash"]


def resolve_group_size(seq_len: int, group_size: int | None = None, ratio: float = 0.25) -> int:
    """Group size for a sequence: the fixed ``group_size`` if given, else ``ratio * seq_len``
    rounded down to an even number (the shift is G/2), at least 2."""
    if group_size is not None:
        if group_size < 2 or group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {group_size}")
        return group_size
    if not 0 < ratio <= 1:
        raise ValueError(f"group_size_ratio must be in (0, 1], got {ratio}")
    g = int(seq_len * ratio)
    return max(2, g - g % 2)


def document_ids(position_ids: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """[batch, seq] document index per token, or None when every row is one document.

    A document starts wherever the position does not continue the previous one."""
    if position_ids is None:
        return None
    pos = position_ids.reshape(-1, position_ids.shape[-1]).expand(batch, seq)
    starts = torch.zeros_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if not bool(starts.any()):
        return None
    return starts.cumsum(-1)


def key_padding(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """[batch, seq] bool, True for real tokens; None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(
            f"attention_mask must be a 2-D padding mask of shape [batch, seq] = {[batch, seq]}, "
            f"got shape {list(attention_mask.shape)}"
        )
    valid = attention_mask.to(torch.bool)
    return None if bool(valid.all()) else valid


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * n_rep, N, D] (GQA: each kv head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def flash_available(query: torch.Tensor) -> bool:
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and importlib.util.find_spec("flash_attn") is not None
    )


# ---------------------------------------------------------------- public entry points


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    group_size: int,
    shift: Shift = "split",
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    backend: Backend = "auto",
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """S2-Attn. q: [B, H, N, D], k/v: [B, Hkv, N, D] (after RoPE). Returns ``(out, None)``
    with out: [B, N, H, D], as transformers' attention functions do.

    ``attention_mask`` is the 2-D padding mask ([B, N], 1 = real token); ``position_ids``
    ([B or 1, N]) mark document starts in packed rows."""
    b, h, n, d = query.shape
    _check_shapes(query, key, value)
    query, key, value = _autocast_inputs(query, key, value)
    if shift not in ("split", "roll"):
        raise ValueError(f"shift must be 'split' or 'roll', got {shift!r}")
    if h < 2:
        raise ValueError(f"S2-Attn shifts half of the heads, so it needs at least 2 heads, got {h}")
    group_size = resolve_group_size(n, group_size)
    if shift == "roll" and n > group_size and n % group_size:
        raise ValueError(
            f"shift='roll' needs seq_len to be a multiple of group_size, got seq_len={n}, "
            f"group_size={group_size} (shift='split' handles any length)"
        )
    valid = key_padding(attention_mask, b, n)
    docs = document_ids(position_ids, b, n)
    window = _effective_window(sliding_window, min(n, group_size))
    if _pick_backend(backend, query) == "flash":
        from longtune.attention.flash import flash_s2_attention

        out = flash_s2_attention(
            query, key, value, group_size=group_size, shift=shift, valid=valid, docs=docs,
            scaling=scaling, dropout=dropout, window=window,
        )
        return out, None
    k = repeat_kv(key, h // key.shape[1])
    v = repeat_kv(value, h // value.shape[1])
    return _s2_sdpa(query, k, v, group_size, shift, valid, docs, scaling, dropout, window), None


def full_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, None]:
    """Causal attention with the same padding, document and window rules as ``s2_attention``.

    Keys may be longer than queries (a KV cache): query i sits at position
    ``kv_len - q_len + i``. Returns ``(out [B, N, H, D], None)``."""
    b, h, q_len, _ = query.shape
    kv_len = key.shape[2]
    query, key, value = _autocast_inputs(query, key, value)
    k = repeat_kv(key, h // key.shape[1])
    v = repeat_kv(value, h // value.shape[1])
    if q_len == kv_len:
        valid = key_padding(attention_mask, b, kv_len)
        docs = document_ids(position_ids, b, q_len)
        window = _effective_window(sliding_window, q_len)
        return _s2_sdpa(query, k, v, q_len, "split", valid, docs, scaling, dropout, window), None
    # Decoding with a cache: causal with an offset, padding from the 2-D mask.
    offset = kv_len - q_len
    ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
    allowed = ones.tril(offset)
    if sliding_window is not None:
        allowed = allowed & ~ones.tril(offset - sliding_window)
    mask = allowed[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, -kv_len:].to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(
        query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


# ---------------------------------------------------------------- sdpa implementation


def _check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("query, key and value must be [batch, heads, seq, head_dim] tensors")
    b, h, n, _ = query.shape
    if key.shape[0] != b or key.shape[2] != n or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            f"S2-Attn needs keys/values for exactly the query tokens (no KV cache): query "
            f"{list(query.shape)}, key {list(key.shape)}, value {list(value.shape)}"
        )
    if h % key.shape[1]:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({key.shape[1]})")


def _autocast_inputs(q, k, v):
    """Under autocast, attention runs in the autocast dtype, as SDPA's autocast policy does
    (q and k often arrive in fp32 from RoPE, v in bf16 from its projection); the fused ops
    called directly below are not autocast-aware themselves."""
    device = q.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


def _effective_window(sliding_window: int | None, span: int) -> int | None:
    """The window, or None when it cannot cut anything (no key is ``span`` or more back)."""
    if sliding_window is None or sliding_window >= span:
        return None
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    return sliding_window


def _pick_backend(backend: Backend, query: torch.Tensor) -> str:
    if backend == "sdpa":
        return "sdpa"
    if backend == "flash":
        if not flash_available(query):
            raise RuntimeError(
                "backend='flash' needs the flash-attn package (pip install 'longtune[gpu]'), "
                f"a CUDA tensor and fp16/bf16; got device={query.device}, dtype={query.dtype}"
            )
        return "flash"
    if backend == "auto":
        return "flash" if flash_available(query) else "sdpa"
    raise ValueError(f"backend must be 'auto', 'sdpa' or 'flash', got {backend!r}")


class _Piece:
    """One set of heads attending in one grouping: ``n_groups`` groups of ``g`` tokens
    from ``start``; ``roll`` first rolls the tokens by ``-roll``.

    ``gather`` turns [B, H, M, D] into the folded [B * groups, heads, g, D] SDPA input
    (a view where the layout allows: groups folded into the batch dimension); ``scatter``
    writes such a tensor back into its place in a [B, H, M, D] tensor."""

    def __init__(self, heads: slice, start: int, n_groups: int, g: int, *, roll: int = 0):
        self.heads, self.start, self.n_groups, self.g, self.roll = heads, start, n_groups, g, roll

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, self.heads]
        b, h, m, d = x.shape
        if self.roll:
            x = x.roll(-self.roll, dims=2)
        x = x[:, :, self.start : self.start + self.n_groups * self.g]
        return x.unflatten(2, (self.n_groups, self.g)).transpose(1, 2).reshape(-1, h, self.g, d)

    def scatter(self, dst: torch.Tensor, y: torch.Tensor) -> None:
        dst = dst[:, self.heads]
        b, h, m, d = dst.shape
        y = y.view(b, self.n_groups, h, self.g, d).transpose(1, 2).flatten(2, 3)
        if self.roll:
            dst.copy_(y.roll(self.roll, dims=2))
        else:
            dst[:, :, self.start : self.start + self.n_groups * self.g].copy_(y)

    def tokens(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """The same grouping of a [B, M] per-token tensor: [B * groups, g]."""
        if t is None:
            return None
        if self.roll:
            t = t.roll(-self.roll, dims=1)
        return t[:, self.start : self.start + self.n_groups * self.g].reshape(-1, self.g)

    def mask(self, valid, docs, window, device) -> torch.Tensor | None:
        return _group_mask(self.tokens(docs), self.tokens(valid), self.g, device, window)


def _pieces(h: int, m: int, g: int, shift: str) -> list[_Piece]:
    """How the heads of an [B, H, M, D] input split into groupings (M a multiple of g)."""
    if m <= g:
        return [_Piece(slice(0, h), 0, 1, m)]
    hu, n_groups, half = h // 2, m // g, g // 2
    unshifted = _Piece(slice(0, hu), 0, n_groups, g)
    if shift == "roll":
        return [unshifted, _Piece(slice(hu, h), 0, n_groups, g, roll=half)]
    # Shifted heads: full middle groups, and the half groups at both ends as pieces of their
    # own, so that every piece is a plain view of its input (no copies, in either pass).
    return [
        unshifted,
        _Piece(slice(hu, h), half, n_groups - 1, g),
        _Piece(slice(hu, h), 0, 1, half),
        _Piece(slice(hu, h), m - half, 1, half),
    ]


def _group_mask(
    docs: torch.Tensor | None, valid: torch.Tensor | None, g: int, device, window: int | None = None
) -> torch.Tensor | None:
    """[G', 1, g, g] bool mask for grouped tokens (docs/valid: [G', g]); None = plain causal."""
    if window is not None and window >= g:
        window = None
    if docs is None and valid is None and window is None:
        return None
    ones = torch.ones(g, g, dtype=torch.bool, device=device)
    causal = ones.tril() if window is None else ones.tril() & ~ones.tril(-window)
    if docs is None and valid is None:
        return causal[None, None]
    n = (docs if docs is not None else valid).shape[0]
    mask = causal.expand(n, g, g)
    if docs is not None:
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    if valid is not None:
        mask = mask & valid[:, None, :]
    # keep the diagonal: a fully masked row would make SDPA return NaN
    mask = mask | torch.eye(g, dtype=torch.bool, device=device)
    return mask[:, None]


LEAN_CPU_BACKWARD = True
"""Use the hand-written backward on the CPU (tests switch it off to cover the other path)."""


def _grouped_attention(q, k, v, pieces, masks, scaling, dropout) -> torch.Tensor:
    """q/k/v: [B, H, M, D] (k/v already repeated to H heads) -> [B, M, H, D]."""
    lean = (
        LEAN_CPU_BACKWARD
        and dropout == 0.0
        and q.device.type == "cpu"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )
    if lean:
        return _LeanGroupedAttention.apply(q, k, v, pieces, masks, scaling)
    b, h, m, d = q.shape
    out = q.new_empty(b, m, h, d)
    for piece, mask in zip(pieces, masks):
        o = F.scaled_dot_product_attention(
            piece.gather(q), piece.gather(k), piece.gather(v), attn_mask=mask,
            dropout_p=dropout, is_causal=mask is None, scale=scaling,
        )
        piece.scatter(out.transpose(1, 2), o)  # autograd tracks the in-place copies
    return out


class _LeanGroupedAttention(torch.autograd.Function):
    """Grouped attention with a hand-written backward, on torch's fused CPU kernel.

    Through plain autograd every head or token slice's backward allocates a zero gradient
    of its whole input, and the pieces are summed: 2-3x the memory of full attention. Here
    each of dq, dk, dv is one buffer, written block by block (see ``_blocks``) while each
    block's own gradients are freed, so peak memory stays below full attention's."""

    @staticmethod
    def forward(ctx, q, k, v, pieces, masks, scaling):
        b, h, m, d = q.shape
        out = q.new_empty(b, m, h, d)  # transformers' output layout
        lses, float_masks = [], []
        for piece, mask in zip(pieces, masks):
            fmask = _additive(mask, q.dtype)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                piece.gather(q), piece.gather(k), piece.gather(v), 0.0, fmask is None,
                attn_mask=fmask, scale=scaling,
            )
            piece.scatter(out.transpose(1, 2), o)
            lses.append(lse)
            float_masks.append(fmask)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.pieces, ctx.masks, ctx.scaling = pieces, float_masks, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *lses = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (q, k, v)]  # the pieces tile every element
        grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)
        threads = torch.get_num_threads()
        for piece, fmask, lse in zip(ctx.pieces, ctx.masks, lses):
            ins = [piece.gather(x) for x in (grad_out, q, k, v, out)]  # folded, mostly views
            dsts = [piece.gather(g) for g in grads]
            direct = all(_same_storage(d, g) for d, g in zip(dsts, grads))
            if not direct:  # roll, or batch > 1 with groups off the row start: a folded buffer
                dsts = [torch.empty_like(x) for x in ins[1:4]]
            for rows, heads in _blocks(ins[1].shape[0], ins[1].shape[1], threads):
                go, qb, kb, vb, ob = (x[rows, heads] for x in ins)
                mask = fmask if fmask is None or fmask.shape[0] == 1 else fmask[rows]
                block_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    go, qb, kb, vb, ob, lse[rows, heads], 0.0, fmask is None,
                    attn_mask=mask, scale=ctx.scaling,
                )
                for dst, g in zip(dsts, block_grads):
                    dst[rows, heads].copy_(g)
                del block_grads
            if not direct:
                for dst, folded in zip(grads, dsts):
                    piece.scatter(dst, folded)
        return *grads, None, None, None


def _blocks(n_rows: int, n_heads: int, threads: int):
    """(rows, heads) slices of a folded [rows, heads, g, D] piece, ``threads`` items each.

    The fused CPU backward spreads (row, head) items over threads and copies its inputs
    to its own layout. Blocks of exactly ``threads`` items keep every thread busy (a block
    of 3 items on 2 threads idles one a third of the time) while bounding those copies to
    ``threads`` group-sized items."""
    if n_heads % threads == 0:
        rows_per, heads_per = 1, threads
    elif n_rows % threads == 0:
        rows_per, heads_per = threads, 1
    else:
        rows_per, heads_per = n_rows, 1
    for h in range(0, n_heads, heads_per):
        for r in range(0, n_rows, rows_per):
            yield slice(r, r + rows_per), slice(h, h + heads_per)


def _same_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The fused CPU kernel takes masks as additive biases of the query's dtype."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _s2_sdpa(q, k, v, g, shift, valid, docs, scaling, dropout, window) -> torch.Tensor:
    """[B, H, N, D] inputs (k/v repeated to H heads) -> [B, N, H, D]."""
    b, h, n, d = q.shape
    extra = -n % g if n > g else 0
    if extra:  # split mode: padded keys lie after every real query; causality hides them
        q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))
        valid = None if valid is None else F.pad(valid, (0, extra), value=False)
        docs = None if docs is None else F.pad(docs, (0, extra), value=-1)
    pieces = _pieces(h, n + extra, g, shift)
    masks = [p.mask(valid, docs, window, q.device) for p in pieces]
    out = _grouped_attention(q, k, v, pieces, masks, scaling, dropout)
    return out[:, :n] if extra else out
