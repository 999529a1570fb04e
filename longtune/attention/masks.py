"""What every attention path needs to know about the tokens, and a cache that builds it once
per forward.

A packed or padded row tells each layer the same things: which tokens are real, where
documents start, which groups need a mask, how the real tokens cut into variable-length
sequences. Built per layer, that costs a host sync and, for dense masks, memory: ~480 MiB a
layer at 32k tokens with 8k groups. ``per_forward`` builds each once per forward and hands
every layer the same tensors.

Lifetime. An entry is keyed on the *identity* and in-place version of the tensors the model
passes to every layer (``position_ids``, the 2-D ``attention_mask``) and on the geometry
asked for; it holds those tensors only through weak references and drops itself when one of
them is freed. ``install_forward_cache_hooks`` clears the cache when the model's forward
starts and ends, so nothing outlives a forward even when the caller keeps its batch (the
held-out eval reuses its blocks). Gradient checkpointing recomputes layers after the forward
has ended: the first recomputed layer rebuilds the entry (the checkpoint keeps the same
``position_ids`` object alive) and the other layers reuse it; it is freed with the batch.
A tensor changed in place, or a new tensor that happens to reuse a freed one's id, never
matches an old entry.

Plain torch; imports nothing else from longtune.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * n_rep, N, D] (GQA: each kv head serves n_rep query heads)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def document_ids(position_ids: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """[batch, seq] document index per token, or None when every row is one document.

    A document starts wherever the position does not continue the previous one (the rule
    transformers uses for packed rows)."""
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


def causal_window(g: int, window: int | None, device) -> torch.Tensor:
    """[g, g] bool: causal, and no key ``window`` or more tokens back."""
    ones = torch.ones(g, g, dtype=torch.bool, device=device)
    return ones.tril() if window is None else ones.tril() & ~ones.tril(-window)


def group_mask(
    docs: torch.Tensor | None, valid: torch.Tensor | None, g: int, device, window: int | None = None
) -> torch.Tensor | None:
    """[G', 1, g, g] bool mask for grouped tokens (docs/valid: [G', g]); None = plain causal.

    A query sees earlier keys of its own document that are real tokens, within the window;
    a padded query sees only itself (its output is never used, and a fully masked row
    would make the kernels return NaN, which the backward would carry into the weights)."""
    if window is not None and window >= g:
        window = None
    if docs is None and valid is None and window is None:
        return None
    causal = causal_window(g, window, device)
    if docs is None and valid is None:
        return causal[None, None]
    n = (docs if docs is not None else valid).shape[0]
    mask = causal.expand(n, g, g)
    if docs is not None:
        mask = mask & (docs[:, :, None] == docs[:, None, :])
    if valid is not None:
        mask = mask & valid[:, None, :] & valid[:, :, None]
    mask = mask | torch.eye(g, dtype=torch.bool, device=device)
    return mask[:, None]


def dirty_rows(docs: torch.Tensor | None, valid: torch.Tensor | None) -> list[bool]:
    """For grouped tokens ([G', g]), whether each group needs a mask beyond causality: it
    holds a document start after its first token, or a padded token."""
    t = docs if docs is not None else valid
    dirty = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    if docs is not None:
        dirty |= (docs != docs[:, :1]).any(-1)
    if valid is not None:
        dirty |= ~valid.all(-1)
    return dirty.tolist()


def varlen_sequences(
    batch: int, seq: int, group_of: torch.Tensor, order: torch.Tensor,
    valid: torch.Tensor | None, docs: torch.Tensor | None, device,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For tokens visited in ``order`` (per row), the flat indices of the real ones into
    [B * N] tokens, and the int32 cu_seqlens that cut them into (row, group, document) runs,
    and the longest run."""
    rows = torch.arange(batch, device=device)[:, None].expand(batch, seq)
    groups = group_of[None].expand(batch, seq)
    flat = (rows * seq + order[None]).reshape(-1)  # [B * N]
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


def token_runs(valid: torch.Tensor | None, docs: torch.Tensor | None, batch: int, seq: int) -> list[tuple[int, int, int]]:
    """(row, start, end) for every maximal run of real tokens of one document in a row."""
    if valid is None and docs is None:
        return [(b, 0, seq) for b in range(batch)]
    order = torch.arange(seq, device=(valid if valid is not None else docs).device)
    flat, cu, _ = varlen_sequences(batch, seq, order * 0, order, valid, docs, order.device)
    bounds = cu.tolist()
    first = flat[cu[:-1].long()].tolist() if len(bounds) > 1 else []
    runs = []
    for f, s, e in zip(first, bounds[:-1], bounds[1:]):
        row, start = divmod(f, seq)
        runs.append((row, start, start + (e - s)))
    return runs


# ---------------------------------------------------------------- the per-forward cache


class _Entry:
    __slots__ = ("refs", "versions", "stamp", "values")

    def __init__(self, refs, versions, stamp):
        self.refs, self.versions, self.stamp, self.values = refs, versions, stamp, {}


_CACHE: dict[tuple, _Entry] = {}
_MAX_ENTRIES = 8  # a few forwards in flight at most (a model in eval inside a training step)
_STAMPS = itertools.count()
_ENABLED = True


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _drop(key: tuple, stamp: int) -> Callable:
    # Holds the key and a stamp, not the entry: the entry must not keep itself alive.
    def callback(_ref) -> None:
        entry = _CACHE.get(key)
        if entry is not None and entry.stamp == stamp:
            del _CACHE[key]

    return callback


def per_forward(anchors: tuple[torch.Tensor | None, ...], key: tuple, build: Callable[[], T]) -> T:
    """``build()``, computed once for as long as the ``anchors`` (the tensors the model hands
    every layer) are the same objects, unchanged, and the cache has not been cleared.
    Without any anchor tensor there is nothing to key on: built every time."""
    present = tuple(t for t in anchors if t is not None)
    if not present or not _ENABLED:
        return build()
    ident = tuple(id(t) if t is not None else None for t in anchors)
    versions = tuple(_version(t) for t in present)
    entry = _CACHE.get(ident)
    if entry is None or entry.versions != versions or any(r() is not t for r, t in zip(entry.refs, present)):
        stamp = next(_STAMPS)
        entry = _Entry(tuple(weakref.ref(t, _drop(ident, stamp)) for t in present), versions, stamp)
        _CACHE.pop(ident, None)
        _CACHE[ident] = entry
        while len(_CACHE) > _MAX_ENTRIES:
            del _CACHE[next(iter(_CACHE))]
    if key not in entry.values:
        entry.values[key] = build()
    return entry.values[key]


def clear_forward_cache(*_args, **_kwargs) -> None:
    """Forget everything cached (called by the model's forward hooks; safe any time)."""
    _CACHE.clear()


def cached_entries() -> int:
    """How many forwards have something cached (for tests and debugging)."""
    return len(_CACHE)


_HOOKS_ATTR = "_longtune_forward_cache_hooks"


def install_forward_cache_hooks(model: torch.nn.Module) -> None:
    """Clear the cache when ``model``'s forward starts and when it ends (idempotent)."""
    if getattr(model, _HOOKS_ATTR, None):
        return
    handles = (
        model.register_forward_pre_hook(clear_forward_cache),
        model.register_forward_hook(clear_forward_cache, always_call=True),
    )
    object.__setattr__(model, _HOOKS_ATTR, handles)
