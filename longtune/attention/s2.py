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
across padding or documents. A padded query attends to itself only, which keeps its output
finite: a NaN there would reach the weights through the backward pass even though the loss
ignores that position.

Edge cases, decided:

* ``seq <= group_size``: the sequence is one group, no shift: plain causal attention.
* ``seq % group_size != 0``: split mode pads the sequence internally at the end (those keys
  lie in every real query's future, so they need no mask); the last groups are shorter.
  Roll mode raises (its wrap-around is defined on whole groups only).
* An odd number of heads: the shifted half gets the extra head (``H - H//2`` heads), as
  LongLoRA's ``num_heads // 2`` split does. One head cannot be split: error.
* GQA/MQA: key/value heads are repeated to the query heads before the split.
* ``sliding_window`` (Mistral, Qwen2/3, Gemma 2/3 sliding layers): a query sees at most the
  last ``window`` tokens (itself included), on top of everything above. When groups are no
  larger than the window, this changes nothing and costs nothing.
* ``softcap`` (Gemma 2's ``attn_logit_softcapping``): every logit becomes
  ``softcap * tanh(logit / softcap)`` after scaling, before masking and the softmax. flash-attn
  caps natively; everywhere else an exact blockwise math path does (``softcap.py``).

Speed: groups are folded into the batch dimension (views, no copy, in the layout transformers
produces) and each fold is one SDPA call, so torch's fused causal kernel does the work.
Groups that hold a document start or padding are cut into their document runs, each the
fused causal kernel on a view of its tokens (the variable-length way flash-attn's varlen
works), so a packed block costs what its documents cost; padded tokens attend to themselves.
Only where that path cannot run (dropout, softcap, a sliding window shorter than a group, or
SDPA on a GPU) do such groups get a dense [g, g] mask. Masks, document ids and cu_seqlens are
built once per forward (``masks.py``) and shared by every layer. Backends (SDPA, flash-attn, torch varlen): ``backends.py``.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F

from longtune.attention.backends import Backend, check_backend, pick_backend
from longtune.attention.flash import flash_kernel
from longtune.attention.masks import (
    dirty_rows,
    document_ids,
    group_mask,
    key_padding,
    per_forward,
    repeat_kv,
    token_runs,
)
from longtune.attention.segments import segment_attention
from longtune.attention.softcap import softcap_attention
from longtune.attention.varlen import torch_varlen_kernel, varlen_attention

Shift = Literal["split", "roll"]
__all__ = ["Backend", "Shift", "full_attention", "resolve_group_size", "s2_attention"]


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


def check_softcap(softcap) -> float | None:
    """None (or 0, flash-attn's "off") for no capping, else a positive float."""
    if softcap is None or softcap == 0:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0 or math.isinf(softcap):
        raise ValueError(
            f"softcap (a model's attn_logit_softcapping) must be a positive number or None, got {softcap!r}"
        )
    return float(softcap)


def token_meta(attention_mask, position_ids, batch: int, seq: int, device):
    """(valid [B, N] bool or None, docs [B, N] or None) on ``device``, once per forward."""

    def build():
        valid = key_padding(attention_mask, batch, seq)
        docs = document_ids(position_ids, batch, seq)
        return (None if valid is None else valid.to(device), None if docs is None else docs.to(device))

    return per_forward((position_ids, attention_mask), ("tokens", batch, seq, device), build)


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
    softcap: float | None = None,
    always_shift: bool = False,
) -> tuple[torch.Tensor, None]:
    """S2-Attn. q: [B, H, N, D], k/v: [B, Hkv, N, D] (after RoPE). Returns ``(out, None)``
    with out: [B, N, H, D], as transformers' attention functions do.

    ``always_shift``: shift the second half of the heads even when the N tokens are one
    group: they are then one shard of a longer sequence (sequence parallelism,
    ``sequence_parallel.py``), whose shifted groups straddle the shard's ends.

    ``attention_mask`` is the 2-D padding mask ([B, N], 1 = real token); ``position_ids``
    ([B or 1, N]) mark document starts in packed rows; ``softcap`` caps the logits (Gemma 2).
    Everything derived from the mask and positions is built once per forward (per
    ``position_ids``/``attention_mask`` object), not once per layer."""
    _check_shapes(query, key, value)
    b, h, n, _ = query.shape
    query, key, value = _autocast_inputs(query, key, value)
    if shift not in ("split", "roll"):
        raise ValueError(f"shift must be 'split' or 'roll', got {shift!r}")
    if h < 2:
        raise ValueError(f"S2-Attn shifts half of the heads, so it needs at least 2 heads, got {h}")
    check_backend(backend)
    softcap = check_softcap(softcap)
    group_size = resolve_group_size(n, group_size)
    if always_shift and (shift != "split" or n % group_size):
        raise ValueError(
            f"always_shift needs shift='split' and whole groups, got shift={shift!r}, seq_len={n}, "
            f"group_size={group_size}"
        )
    if shift == "roll" and n > group_size and n % group_size:
        raise ValueError(
            f"shift='roll' needs seq_len to be a multiple of group_size, got seq_len={n}, "
            f"group_size={group_size} (shift='split' handles any length)"
        )
    anchors = (position_ids, attention_mask)
    valid, docs = token_meta(attention_mask, position_ids, b, n, query.device)
    window = _effective_window(sliding_window, n if always_shift else min(n, group_size))
    choice = pick_backend(
        backend, query, softcap=softcap, dropout=dropout, window=window,
        needs_masks=valid is not None or docs is not None or window is not None,
    )
    if choice != "sdpa":
        out = varlen_attention(
            query, key, value, kernel=_KERNELS[choice], group_size=group_size, shift=shift, valid=valid,
            docs=docs, scaling=scaling, dropout=dropout, window=window, softcap=softcap, anchors=anchors,
            always_shift=always_shift,
        )
        return out, None
    k = repeat_kv(key, h // key.shape[1])
    v = repeat_kv(value, h // value.shape[1])
    out = _s2_sdpa(
        query, k, v, group_size, shift, valid, docs, scaling, dropout, window, softcap, anchors, always_shift
    )
    return out, None


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
    softcap: float | None = None,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, None]:
    """Causal attention with the same padding, document, window and softcap rules as
    ``s2_attention``, and never an N x N mask for packed or padded rows: each document run
    is its own causal call (SDPA), or its own sequence of a varlen kernel (CUDA).

    Keys may be longer than queries (a KV cache): query i sits at position
    ``kv_len - q_len + i``. Returns ``(out [B, N, H, D], None)``."""
    b, h, q_len, _ = query.shape
    kv_len = key.shape[2]
    query, key, value = _autocast_inputs(query, key, value)
    check_backend(backend)
    softcap = check_softcap(softcap)
    if q_len == kv_len:
        anchors = (position_ids, attention_mask)
        valid, docs = token_meta(attention_mask, position_ids, b, q_len, query.device)
        window = _effective_window(sliding_window, q_len)
        needs_masks = valid is not None or docs is not None or window is not None
        choice = "sdpa"
        if needs_masks or softcap is not None:
            choice = pick_backend(backend, query, softcap=softcap, dropout=dropout, window=window, needs_masks=needs_masks)
        if choice != "sdpa":
            out = varlen_attention(
                query, key, value, kernel=_KERNELS[choice], group_size=None, valid=valid, docs=docs,
                scaling=scaling, dropout=dropout, window=window, softcap=softcap, anchors=anchors,
            )
            return out, None
        if not needs_masks and softcap is None:
            # one causal row: torch's fused kernel with its own backward, as the model's own
            # SDPA runs it (kv heads not repeated); the lean backward, made for groups, is
            # slower on one row of a whole sequence (0.98 vs 0.58 s at 4096 tokens, 8 heads)
            out = F.scaled_dot_product_attention(
                query, key, value, dropout_p=dropout, is_causal=True, scale=scaling,
                enable_gqa=key.shape[1] != h,
            )
            return out.transpose(1, 2).contiguous(), None  # [B, N, H, D]
        k = repeat_kv(key, h // key.shape[1])
        v = repeat_kv(value, h // value.shape[1])
        if not needs_masks:  # softcap: no fused kernel caps logits, the blockwise math path
            return _s2_sdpa(query, k, v, q_len, "split", None, None, scaling, dropout, None, softcap), None
        if window is None and _lean(query, dropout, softcap):
            # one group of the whole row, cut into its document runs: the fused causal kernel
            # on views, with the lean backward (see _LeanGroupedAttention)
            out = _s2_sdpa(query, k, v, q_len, "split", valid, docs, scaling, dropout, None, softcap, anchors)
            return out, None
        runs = per_forward(anchors, ("runs", b, q_len, query.device), lambda: token_runs(valid, docs, b, q_len))
        out = segment_attention(
            query, k, v, runs, padded=valid is not None, window=window, scaling=scaling,
            dropout=dropout, softcap=softcap,
        )
        return out, None
    # Decoding with a cache: causal with an offset, padding from the 2-D mask. q_len is small.
    k = repeat_kv(key, h // key.shape[1])
    v = repeat_kv(value, h // value.shape[1])
    offset = kv_len - q_len
    ones = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
    allowed = ones.tril(offset)
    if sliding_window is not None:
        allowed = allowed & ~ones.tril(offset - sliding_window)
    mask = allowed[None, None]
    if attention_mask is not None:
        mask = mask & attention_mask[:, -kv_len:].to(torch.bool)[:, None, None, :]
    if softcap is not None:
        out = softcap_attention(query, k, v, mask, scaling=scaling, softcap=softcap, dropout=dropout)
    else:
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


_KERNELS = {"flash": flash_kernel, "varlen": torch_varlen_kernel}


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


def _pieces(h: int, m: int, g: int, shift: str, always_shift: bool = False) -> list[_Piece]:
    """How the heads of an [B, H, M, D] input split into groupings (M a multiple of g;
    ``always_shift``: split-mode groupings even for one group, see ``s2_attention``)."""
    if m < g or (m == g and not always_shift):
        return [_Piece(slice(0, h), 0, 1, m)]
    hu, n_groups, half = h // 2, m // g, g // 2
    unshifted = _Piece(slice(0, hu), 0, n_groups, g)
    if shift == "roll":
        return [unshifted, _Piece(slice(hu, h), 0, n_groups, g, roll=half)]
    # Shifted heads: full middle groups, and the half groups at both ends as pieces of their
    # own, so that every piece is a plain view of its input (no copies, in either pass).
    middle = [_Piece(slice(hu, h), half, n_groups - 1, g)] if n_groups > 1 else []
    return [
        unshifted,
        *middle,
        _Piece(slice(hu, h), 0, 1, half),
        _Piece(slice(hu, h), m - half, 1, half),
    ]


class _Span:
    """A unit of work inside one piece (folded [rows, heads, g, D] tensors).

    * a fold: consecutive folded ``rows``, every token of them; ``mask`` [r or 1, 1, g, g]
      bool, or None for plain causal (the fused kernel with no mask);
    * a run (``tokens`` set): the tokens ``tokens`` of the one folded row ``rows``, one
      document's real tokens, attending causally among themselves: the fused causal kernel on
      a view, no mask. A group holding a document start is cut into runs, each costing what
      its document's share of the group costs (flash-attn's varlen does the same on GPU);
    * padding (``pad``): padded tokens of one row; each attends to itself only, so its output
      is its value (and its gradient goes to that value alone)."""

    __slots__ = ("rows", "mask", "tokens", "pad")

    def __init__(self, rows: slice, mask: torch.Tensor | None = None, tokens: slice | None = None, pad: bool = False):
        self.rows, self.mask, self.tokens, self.pad = rows, mask, tokens, pad

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """This span's part of a folded [rows, heads, g, ...] tensor (a view)."""
        return x[self.rows] if self.tokens is None else x[self.rows, :, self.tokens]


def _runs_of_row(d: torch.Tensor | None, v: torch.Tensor | None) -> list[tuple[int, int, bool]] | None:
    """(start, end, padded) for each maximal run of tokens of one document and one kind
    (real or padded) in a group's [g] document ids / validity; None when some document's
    real tokens are not one run (padding inside a document, as roll's wrapped group has with
    left padding): its later tokens see its earlier ones across the gap, which only a mask says."""
    g = (d if d is not None else v).shape[0]
    change = torch.zeros(g, dtype=torch.bool, device=(d if d is not None else v).device)
    if d is not None:
        change[1:] |= d[1:] != d[:-1]
    if v is not None:
        change[1:] |= v[1:] != v[:-1]
    starts = [0, *change.nonzero().flatten().tolist()]
    bounds = [*starts, g]
    real = [True] * len(starts) if v is None else v[starts].tolist()
    doc = [0] * len(starts) if d is None else d[starts].tolist()
    real_docs = [x for x, r in zip(doc, real) if r]
    if len(set(real_docs)) != len(real_docs):
        return None
    return [(a, e, not r) for a, e, r in zip(bounds[:-1], bounds[1:], real)]


def _masked_span(cut: slice, d_t, v_t, g: int, device, window) -> list["_Span"]:
    """[] for no rows, else one fold span of ``cut``'s rows with their dense [r, 1, g, g] mask."""
    if cut.stop <= cut.start:
        return []
    mask = group_mask(None if d_t is None else d_t[cut], None if v_t is None else v_t[cut], g, device, window)
    return [_Span(cut, mask)]


class _Plan:
    """The pieces of one geometry, each cut into spans (``_Span``): consecutive clean folded
    groups share one fold span with the shared causal-window mask ([1, 1, g, g]) or None;
    a group with a document start or padding is, with ``runs``, cut into its document runs
    and padding (no mask at all), else carries its own dense mask ([r, 1, g, g]). Built once
    per forward; every layer reuses it."""

    def __init__(self, parts: list[tuple[_Piece, list[_Span]]]):
        self.parts = parts
        self._additive: dict[torch.dtype, list] = {}

    @classmethod
    def build(cls, b, h, m, g, shift, valid, docs, window, device, always_shift=False, runs=False) -> "_Plan":
        runs = runs and window is None  # a run longer than a window is not plain causal
        shared: dict[int, torch.Tensor | None] = {}
        parts = []
        for piece in _pieces(h, m, g, shift, always_shift):
            if piece.g not in shared:
                shared[piece.g] = group_mask(None, None, piece.g, device, window)
            rows = b * piece.n_groups
            d_t, v_t = piece.tokens(docs), piece.tokens(valid)  # [rows, g] each, or None
            if d_t is None and v_t is None:
                parts.append((piece, [_Span(slice(0, rows), shared[piece.g])]))
                continue
            spans, start = [], 0
            for dirty, run in itertools.groupby(dirty_rows(d_t, v_t)):
                end = start + len(list(run))
                if not dirty:
                    spans.append(_Span(slice(start, end), shared[piece.g]))
                else:
                    cuts = [_runs_of_row(None if d_t is None else d_t[r], None if v_t is None else v_t[r])
                            for r in range(start, end)] if runs else [None] * (end - start)
                    masked = start  # consecutive rows that need their dense mask share one span
                    for r, row_cuts in enumerate(cuts, start):
                        if row_cuts is None:
                            continue
                        spans.extend(_masked_span(slice(masked, r), d_t, v_t, piece.g, device, window))
                        spans.extend(_Span(slice(r, r + 1), tokens=slice(a, e), pad=pad) for a, e, pad in row_cuts)
                        masked = r + 1
                    spans.extend(_masked_span(slice(masked, end), d_t, v_t, piece.g, device, window))
                start = end
            parts.append((piece, spans))
        return cls(parts)

    def additive(self, dtype: torch.dtype) -> list[list[torch.Tensor | None]]:
        """The masks as additive biases of ``dtype`` (what the fused CPU kernel takes)."""
        if dtype not in self._additive:
            self._additive[dtype] = [[_additive(span.mask, dtype) for span in spans] for _, spans in self.parts]
        return self._additive[dtype]


LEAN_CPU_BACKWARD = True
"""Use the hand-written backward on the CPU (tests switch it off to cover the other path)."""


def _lean(q: torch.Tensor, dropout: float, softcap: float | None) -> bool:
    """Whether the hand-written fused-CPU path runs (it also cuts masked groups into runs)."""
    return (
        LEAN_CPU_BACKWARD
        and softcap is None
        and dropout == 0.0
        and q.device.type == "cpu"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
    )


def _grouped_attention(q, k, v, plan: _Plan, scaling, dropout, softcap) -> torch.Tensor:
    """q/k/v: [B, H, M, D] (k/v already repeated to H heads) -> [B, M, H, D]."""
    if softcap is not None:  # no fused kernel caps logits: the exact blockwise math path
        def attend(qs, ks, vs, mask):
            return softcap_attention(qs, ks, vs, mask, scaling=scaling, softcap=softcap, dropout=dropout)

        return _each_span(q, k, v, plan, attend)
    if _lean(q, dropout, softcap):
        return _LeanGroupedAttention.apply(q, k, v, plan, scaling)

    def attend(qs, ks, vs, mask):
        return F.scaled_dot_product_attention(
            qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
        )

    return _each_span(q, k, v, plan, attend)


def _each_span(q, k, v, plan: _Plan, attend) -> torch.Tensor:
    """Plain autograd over every span of every piece: [B, H, M, D] -> [B, M, H, D].
    (Plans built for this path hold fold spans only.)"""
    b, h, m, d = q.shape
    out = q.new_empty(b, m, h, d)
    for piece, spans in plan.parts:
        qs, ks, vs = piece.gather(q), piece.gather(k), piece.gather(v)  # [rows, heads, g, D]
        outs = [attend(qs[span.rows], ks[span.rows], vs[span.rows], span.mask) for span in spans]
        piece.scatter(out.transpose(1, 2), outs[0] if len(outs) == 1 else torch.cat(outs))  # autograd tracks the copies
    return out


class _LeanGroupedAttention(torch.autograd.Function):
    """Grouped attention with a hand-written backward, on torch's fused CPU kernel.

    Through plain autograd every head or token slice's backward allocates a zero gradient
    of its whole input, and the pieces are summed: 2-3x the memory of full attention. Here
    each of dq, dk, dv is one buffer, written block by block (see ``_blocks``) while each
    block's own gradients are freed, so peak memory stays below full attention's. Runs
    (document spans, see ``_Span``) are views too, so cutting a group into documents costs
    kernel calls, not copies."""

    @staticmethod
    def forward(ctx, q, k, v, plan, scaling):
        b, h, m, d = q.shape
        out = q.new_empty(b, m, h, d)  # transformers' output layout
        fmasks = plan.additive(q.dtype)
        lses = []  # one fp32 tensor per non-padding span: [span rows, heads, span tokens]
        for (piece, spans), fspans in zip(plan.parts, fmasks):
            qs, ks, vs = piece.gather(q), piece.gather(k), piece.gather(v)  # [rows, heads, g, D]
            dst = piece.gather(out.transpose(1, 2))
            # The kernel returns a fresh output, copied into ``out`` block by block, so only
            # one block's copy exists at a time (a whole piece's would be half of ``out``).
            direct = _same_storage(dst, out)
            if not direct:  # batch > 1 with groups off the row start, or roll: a folded buffer
                dst = torch.empty_like(qs)
            for span, fmask in zip(spans, fspans):
                if span.pad:
                    span.view(dst).copy_(span.view(vs))
                    continue
                if span.tokens is not None:  # a run: one row, causal, a view of its tokens
                    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        span.view(qs), span.view(ks), span.view(vs), 0.0, True, scale=scaling
                    )
                    span.view(dst).copy_(o)
                    lses.append(lse)  # [1, heads, run]
                    del o
                    continue
                rows_span = span.rows
                lse = qs.new_empty(rows_span.stop - rows_span.start, qs.shape[1], qs.shape[2], dtype=torch.float32)
                for rows, heads in _forward_blocks(rows_span, qs.shape[1], qs[0, 0].numel()):
                    mask = fmask if fmask is None or fmask.shape[0] == 1 else fmask[rows.start - rows_span.start : rows.stop - rows_span.start]
                    o, block_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        qs[rows, heads], ks[rows, heads], vs[rows, heads], 0.0, fmask is None, attn_mask=mask,
                        scale=scaling,
                    )
                    lse[rows.start - rows_span.start : rows.stop - rows_span.start, heads] = block_lse
                    dst[rows, heads].copy_(o)
                    del o, block_lse
                lses.append(lse)  # [span rows, heads, g]
            if not direct:
                piece.scatter(out.transpose(1, 2), dst)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.plan, ctx.fmasks, ctx.scaling = plan, fmasks, scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *lses = ctx.saved_tensors
        grads = [torch.empty_like(x) for x in (q, k, v)]  # the pieces' spans tile every element
        grad_out, out = grad_out.transpose(1, 2), out.transpose(1, 2)
        threads = torch.get_num_threads()
        lse_of_span = iter(lses)
        for (piece, spans), fspans in zip(ctx.plan.parts, ctx.fmasks):
            ins = [piece.gather(x) for x in (grad_out, q, k, v, out)]  # folded, mostly views
            dsts = [piece.gather(g) for g in grads]
            direct = all(_same_storage(d, g) for d, g in zip(dsts, grads))
            if not direct:  # roll, or batch > 1 with groups off the row start: a folded buffer
                dsts = [torch.empty_like(x) for x in ins[1:4]]
            for span, fmask in zip(spans, fspans):
                span_ins = [span.view(x) for x in ins]
                span_dsts = [span.view(x) for x in dsts]
                if span.pad:  # out = v there: the gradient is the value's alone
                    span_dsts[0].zero_()
                    span_dsts[1].zero_()
                    span_dsts[2].copy_(span_ins[0])
                    continue
                lse = next(lse_of_span)
                causal = fmask is None
                for rows, heads in _blocks(span_ins[1].shape[0], span_ins[1].shape[1], threads):
                    go, qb, kb, vb, ob = (x[rows, heads] for x in span_ins)
                    mask = fmask if fmask is None or fmask.shape[0] == 1 else fmask[rows]
                    block_grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        go, qb, kb, vb, ob, lse[rows, heads], 0.0, causal, attn_mask=mask, scale=ctx.scaling,
                    )
                    for dst, g in zip(span_dsts, block_grads):
                        dst[rows, heads].copy_(g)
                    del block_grads
            if not direct:
                for dst, folded in zip(grads, dsts):
                    piece.scatter(dst, folded)
        return *grads, None, None


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


_FORWARD_BLOCK_ELEMENTS = 1 << 17
"""Output elements per fused forward call on the CPU: the bound on the kernel's fresh output
that exists beside ``out`` (0.5 MiB in fp32). The forward kernel spreads heads and query
blocks over threads, so even a block of one head of one group keeps them busy."""


def _forward_blocks(span: slice, n_heads: int, head_elements: int):
    """(rows, heads) blocks of a span of a folded [rows, heads, g, D] piece, about
    ``_FORWARD_BLOCK_ELEMENTS`` output elements each: whole rows (heads ``slice(None)``)
    when a row fits, else one row cut into groups of heads (at least one)."""
    row_elements = n_heads * head_elements
    if row_elements <= _FORWARD_BLOCK_ELEMENTS:
        per = _FORWARD_BLOCK_ELEMENTS // max(row_elements, 1)
        for r in range(span.start, span.stop, per):
            yield slice(r, min(r + per, span.stop)), slice(None)
        return
    heads_per = max(1, _FORWARD_BLOCK_ELEMENTS // max(head_elements, 1))
    for r in range(span.start, span.stop):
        for h in range(0, n_heads, heads_per):
            yield slice(r, r + 1), slice(h, min(h + heads_per, n_heads))


def _same_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The fused CPU kernel takes masks as additive biases of the query's dtype."""
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _s2_sdpa(
    q, k, v, g, shift, valid, docs, scaling, dropout, window, softcap, anchors=(), always_shift=False
) -> torch.Tensor:
    """[B, H, N, D] inputs (k/v repeated to H heads) -> [B, N, H, D]."""
    b, h, n, _ = q.shape
    extra = -n % g if n > g else 0
    if extra:  # split mode: padded keys lie after every real query; causality hides them
        q, k, v = (F.pad(x, (0, 0, 0, extra)) for x in (q, k, v))

    def build() -> _Plan:
        # The tail joins the last document as real tokens: its keys are in every real
        # query's future and its queries are dropped, so it needs no mask of its own.
        vt = None if valid is None else F.pad(valid, (0, extra), value=True)
        dt = None if docs is None else torch.cat([docs, docs[:, -1:].expand(-1, extra)], 1)
        return _Plan.build(b, h, n + extra, g, shift, vt, dt, window, q.device, always_shift, runs=lean)

    lean = _lean(q, dropout, softcap)
    plan = per_forward(anchors, ("s2", b, n, g, shift, window, h, q.device, always_shift, lean), build)
    out = _grouped_attention(q, k, v, plan, scaling, dropout, softcap)
    return out[:, :n] if extra else out
