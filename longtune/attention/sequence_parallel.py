"""Sequence-parallel S2-Attn: one sequence across P ranks, exchanging only a half-group halo.

A sequence of N tokens is cut into P contiguous shards of L = N / P tokens, on group
boundaries (L a multiple of the group size G). In S2-Attn (split shift) a token attends
only inside its group (unshifted heads) or its shifted group (shifted heads), so:

* unshifted heads: every group lies inside one shard. No communication.
* shifted heads: the shifted groups are ``[0, G/2), [G/2, 3G/2), ...``. All but one of a
  shard's shifted groups lie inside it; the one starting G/2 before the shard straddles
  the cut. Its queries on this rank (the shard's first G/2 tokens) need the keys and values
  of the previous shard's last G/2 tokens: the **halo**. Its queries on the previous rank
  need nothing from this one (causality).

So each rank runs plain S2-Attn on its shard (``s2_attention(..., always_shift=True)``; the
shard's first shifted half group, computed there without the halo, is discarded), sends
its last G/2 keys and values of the shifted heads to the next rank, receives the previous
rank's, and recomputes the straddling group's queries with them (one group of G keys,
the halo queries zero and their outputs dropped). The backward sends the halo's gradient
back the same way. Per layer and rank boundary, one direction:
``2 * B * Hkv_shifted * G/2 * D`` elements forward and as many backward; no all-gather, no
all-to-all. The first rank receives nothing, the last sends nothing.

Document boundaries, padding and sliding windows need the whole sequence's
``position_ids`` and ``attention_mask``: a ``SequenceShard`` carries them, and every rank of
a group holds the same block (ids, positions and labels are sliced per rank by the
training loop: ``longtune/train/sequence.py``).

Plain torch (``longtune.distributed`` for the point-to-point calls): no Ray, no MLflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from longtune.attention.backends import Backend
from longtune.attention.masks import repeat_kv
from longtune.attention.s2 import full_attention, s2_attention
from longtune.distributed import exchange

__all__ = ["SequenceShard", "active_shard", "sequence_parallel_s2_attention", "sharded_sequence"]


class SequenceShard:
    """This rank's place in the sequence its group shares, for one forward.

    ``index``: 0..size-1 within the group; ``size``: P; ``seq_len``: N, the whole sequence;
    ``members``: the group's global ranks in order (``longtune.distributed.sequence_groups``);
    ``group``: their process group (None: the default group); ``device``: where the halo
    lives (the worker's device). ``position_ids`` ([B or 1, N]) and ``attention_mask``
    ([B, N], 1 = real) are the whole sequence's, as the unsharded forward would get them."""

    def __init__(
        self,
        index: int,
        size: int,
        seq_len: int,
        *,
        members: tuple[int, ...] = (),
        group: Any = None,
        device: torch.device | str = "cpu",
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> None:
        if size < 1 or not 0 <= index < size:
            raise ValueError(f"shard index must be in [0, {size}), got {index}")
        if seq_len % size:
            raise ValueError(f"sequence of {seq_len} tokens cannot be cut into {size} equal shards")
        if size > 1 and len(members) != size:
            raise ValueError(f"a group of {size} ranks needs {size} members, got {members!r}")
        self.index, self.size, self.seq_len = index, size, seq_len
        self.members, self.group, self.device = tuple(members), group, torch.device(device)
        self.position_ids, self.attention_mask = position_ids, attention_mask
        self.local_len = seq_len // size
        self.start = index * self.local_len
        # the same slice objects for every layer: per-forward caches key on them (masks.py)
        self.local_position_ids = self.local(position_ids)
        self.local_attention_mask = self.local(attention_mask)
        self._halo_meta: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.bytes_sent = 0  # halo bytes this shard sent, forward and backward (tests, benchmarks)

    @property
    def previous(self) -> int | None:
        return self.members[self.index - 1] if self.index > 0 else None

    @property
    def next(self) -> int | None:
        return self.members[self.index + 1] if self.index < self.size - 1 else None

    def local(self, x: torch.Tensor | None, dim: int = 1) -> torch.Tensor | None:
        """This rank's tokens of a whole-sequence tensor (tokens along ``dim``)."""
        if x is None:
            return None
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"expected {self.seq_len} tokens along dim {dim}, got shape {list(x.shape)}")
        return x.narrow(dim, self.start, self.local_len)

    def halo_meta(self, half: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """position_ids and attention_mask of the straddling group: the whole sequence's
        tokens ``[start - half, start + half)`` (one object per forward, for the caches)."""
        if half not in self._halo_meta:
            lo, hi = self.start - half, self.start + half
            pos = None if self.position_ids is None else self.position_ids[:, lo:hi]
            mask = None if self.attention_mask is None else self.attention_mask[:, lo:hi]
            self._halo_meta[half] = (pos, mask)
        return self._halo_meta[half]


# Process-wide, not a ContextVar or thread-local: the backward (where checkpointed layers
# run their forward again, halo exchange included) runs on autograd's own threads on GPUs.
_ACTIVE: list[SequenceShard | None] = [None]


@contextlib.contextmanager
def sharded_sequence(shard: SequenceShard | None) -> Iterator[SequenceShard | None]:
    """Within this block, training-mode S2-Attn (``interface.py``) runs sequence-parallel
    on ``shard`` (None: as usual). Hold it over the forward *and* the backward: gradient
    checkpointing recomputes each layer's attention during the backward."""
    previous, _ACTIVE[0] = _ACTIVE[0], shard
    try:
        yield shard
    finally:
        _ACTIVE[0] = previous


def active_shard() -> SequenceShard | None:
    return _ACTIVE[0]


class _Halo(torch.autograd.Function):
    """Forward: send ``tail`` (this rank's last G/2 keys/values of the shifted heads) to the
    next rank, receive the previous rank's as the halo. Backward: the halo's gradient goes
    back to the previous rank; the next rank's gradient of ``tail`` comes in.

    ``out`` (the local attention output) passes through unchanged so that this node lies on
    every rank's path to the loss: on the first rank the halo itself is unused, yet its
    backward must still run to receive the gradient of its tail."""

    @staticmethod
    def forward(ctx, out, tail, shard: SequenceShard):
        ctx.shard = shard
        ctx.set_materialize_grads(False)
        halo = torch.empty_like(tail) if shard.previous is not None else tail.new_empty(0)
        sends = [(tail.contiguous(), shard.next)] if shard.next is not None else []
        recvs = [(halo, shard.previous)] if shard.previous is not None else []
        exchange(sends, recvs, shard.device, shard.group)
        _count(shard, sends, "forward")
        ctx.tail_shape, ctx.tail_dtype = tail.shape, tail.dtype
        return out.view_as(out), halo

    @staticmethod
    def backward(ctx, grad_out, grad_halo):
        shard: SequenceShard = ctx.shard
        sends, recvs, grad_tail = [], [], None
        if shard.previous is not None:
            if grad_halo is None:  # the halo did not reach the loss (e.g. all padding): zeros
                grad_halo = torch.zeros(ctx.tail_shape, dtype=ctx.tail_dtype, device=shard.device)
            sends.append((grad_halo.contiguous(), shard.previous))
        if shard.next is not None:
            grad_tail = torch.empty(ctx.tail_shape, dtype=ctx.tail_dtype, device=shard.device)
            recvs.append((grad_tail, shard.next))
        exchange(sends, recvs, shard.device, shard.group)
        _count(shard, sends, "backward")
        return grad_out, grad_tail, None


HALO_TRAFFIC = {"forward": 0, "backward": 0, "exchanges": 0}
"""Halo bytes this process sent, by pass (a checkpointed layer's recompute is a forward),
and how many exchanges: what benchmarks/sequence_parallel.py reads."""


def _count(shard: SequenceShard, sends, direction: str) -> None:
    sent = sum(t.numel() * t.element_size() for t, _ in sends)
    shard.bytes_sent += sent
    HALO_TRAFFIC[direction] += sent
    HALO_TRAFFIC["exchanges"] += 1


def sequence_parallel_s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    shard: SequenceShard,
    group_size: int,
    scaling: float | None = None,
    dropout: float = 0.0,
    backend: Backend = "auto",
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, None]:
    """S2-Attn (split shift) of this rank's shard. q: [B, H, L, D], k/v: [B, Hkv, L, D]
    (after RoPE), L = shard.local_len; ``group_size`` is the whole sequence's G, which must
    divide L. Returns ``(out [B, L, H, D], None)``: exactly the rows [start, start + L) of
    ``s2_attention`` on the whole sequence. Every rank of the group calls it, layer by layer
    in the same order (the halo exchange pairs them)."""
    b, h, n, d = query.shape
    if n != shard.local_len:
        raise ValueError(f"this rank's shard holds {shard.local_len} tokens, but attention got {n}")
    if group_size < 2 or group_size % 2 or n % group_size:
        raise ValueError(
            f"sequence parallelism needs an even group size that divides each shard's {n} tokens "
            f"(sequence {shard.seq_len} / {shard.size} ranks), got group_size={group_size}"
        )
    out, _ = s2_attention(
        query, key, value, group_size=group_size, shift="split",
        attention_mask=shard.local_attention_mask, position_ids=shard.local_position_ids,
        scaling=scaling, dropout=dropout, backend=backend, sliding_window=sliding_window,
        softcap=softcap, always_shift=shard.size > 1,  # one shard: exactly s2_attention
    )  # [B, L, H, D]
    if shard.size == 1:
        return out, None
    half, hu = group_size // 2, h // 2
    n_rep = h // key.shape[1]
    if hu % n_rep == 0:  # the shifted heads own whole kv heads: send only those
        k_s, v_s = key[:, hu // n_rep :], value[:, hu // n_rep :]  # [B, Hkv_s, L, D]
    else:
        k_s, v_s = repeat_kv(key, n_rep)[:, hu:], repeat_kv(value, n_rep)[:, hu:]  # [B, H - hu, L, D]
    dtype = _compute_dtype(query)  # bf16 under autocast: half the bytes of RoPE's fp32 keys
    tail = torch.stack([x[:, :, n - half :].to(dtype) for x in (k_s, v_s)])  # [2, B, Hkv_s, G/2, D]
    out, halo = _Halo.apply(out, tail, shard)
    if shard.previous is None:
        return out, None
    # The straddling shifted group: halo keys/values, then this shard's first G/2 tokens.
    # Its first G/2 queries belong to the previous rank (zeros here; outputs dropped).
    q_first = query[:, hu:, :half].to(dtype)  # [B, H - hu, G/2, D]
    q_ext = torch.cat([torch.zeros_like(q_first), q_first], dim=2)  # [B, H - hu, G, D]
    k_ext = torch.cat([halo[0], k_s[:, :, :half].to(dtype)], dim=2)  # [B, Hkv_s, G, D]
    v_ext = torch.cat([halo[1], v_s[:, :, :half].to(dtype)], dim=2)
    position_ids, attention_mask = shard.halo_meta(half)
    straddling, _ = full_attention(
        q_ext, k_ext, v_ext, attention_mask=attention_mask, position_ids=position_ids,
        scaling=scaling, dropout=dropout, sliding_window=sliding_window, softcap=softcap, backend=backend,
    )  # [B, G, H - hu, D]
    first = torch.cat([out[:, :half, :hu], straddling[:, half:].to(out.dtype)], dim=2)  # [B, G/2, H, D]
    return torch.cat([first, out[:, half:]], dim=1), None


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
