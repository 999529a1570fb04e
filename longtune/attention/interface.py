"""S2-Attn for every transformers 5 model that calls attention through AttentionInterface.

``use_s2_attention(model)`` registers one attention function, ``longtune_s2``, and switches
the model to it: in training mode it runs S2-Attn (sequence-parallel inside
``sequence_parallel.sharded_sequence``); in eval mode, or when keys outnumber
queries (a KV cache), it runs full causal attention. ``use_document_full_attention(model)``
switches to the same function with full attention in training too: packed documents kept
apart by their own causal calls (or varlen sequences), never the [N, N] mask the model's own
SDPA builds for packed rows. ``use_full_attention(model)`` switches back to the
implementation the model had. No monkey-patching: Llama, Mistral, Qwen2/3,
Gemma 2/3, ... all reach it through ``config._attn_implementation``.

What transformers 5 passes to the function, and what is honoured: ``scaling``, ``dropout``,
``sliding_window`` (per layer: Mistral, Qwen2/3 and Gemma's sliding layers), ``softcap``
(Gemma 2's ``attn_logit_softcapping``) and ``position_ids`` (packed rows). Attention
modules with ``is_causal = False`` (bidirectional variants) are refused: S2-Attn and the
full attention here are causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from longtune.attention.backends import check_backend
from longtune.attention.masks import install_forward_cache_hooks
from longtune.attention.s2 import (
    Backend,
    Shift,
    full_attention,
    resolve_group_size,
    s2_attention,
)
from longtune.attention.sequence_parallel import active_shard, sequence_parallel_s2_attention

ATTN_IMPLEMENTATION = "longtune_s2"
_SETTINGS_ATTR = "_longtune_s2"
_PREVIOUS_ATTR = "_longtune_full_attn_implementation"


@dataclass(frozen=True)
class S2Settings:
    group_size_ratio: float = 0.25
    group_size: int | None = None  # fixed group size; overrides the ratio
    shift: Shift = "split"
    backend: Backend = "auto"
    full: bool = False  # train with full attention (use_document_full_attention)

    def __post_init__(self) -> None:
        resolve_group_size(1024, self.group_size, self.group_size_ratio)  # validates both
        if self.shift not in ("split", "roll"):
            raise ValueError(f"shift must be 'split' or 'roll', got {self.shift!r}")
        check_backend(self.backend)


def longtune_s2_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function. ``attention_mask`` is the 2-D padding mask (or None):
    the mask function registered beside it passes that through instead of a 4-D mask."""
    settings: S2Settings = getattr(module, _SETTINGS_ATTR, None) or S2Settings()
    if not getattr(module, "is_causal", True):
        raise ValueError(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} is causal, but {type(module).__name__} is "
            "bidirectional (is_causal=False, e.g. use_bidirectional_attention=True); use the model's own attention"
        )
    position_ids = kwargs.get("position_ids")
    softcap = kwargs.get("softcap")
    shard = active_shard()
    if shard is not None and module.training and query.shape[2] == key.shape[2]:
        if settings.shift != "split":
            raise ValueError("sequence parallelism needs shift='split': roll wraps the last shard onto the first")
        return sequence_parallel_s2_attention(
            query, key, value, shard=shard,
            group_size=resolve_group_size(shard.seq_len, settings.group_size, settings.group_size_ratio),
            scaling=scaling, dropout=dropout, backend=settings.backend,
            sliding_window=kwargs.get("sliding_window"), softcap=softcap,
        )
    if module.training and query.shape[2] == key.shape[2] and not settings.full:
        return s2_attention(
            query, key, value,
            group_size=resolve_group_size(query.shape[2], settings.group_size, settings.group_size_ratio),
            shift=settings.shift,
            attention_mask=attention_mask,
            position_ids=position_ids,
            scaling=scaling,
            dropout=dropout,
            backend=settings.backend,
            sliding_window=kwargs.get("sliding_window"),
            softcap=softcap,
        )
    return full_attention(
        query, key, value,
        attention_mask=attention_mask,
        position_ids=position_ids if query.shape[2] == key.shape[2] else None,
        scaling=scaling,
        dropout=dropout,
        sliding_window=kwargs.get("sliding_window"),
        softcap=softcap,
        backend=settings.backend,
    )


def register() -> None:
    """Make ``attn_implementation="longtune_s2"`` known to transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, longtune_s2_attention)
    # flash-attn's mask function hands attention the 2-D padding mask (None when unpadded).
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)


def use_s2_attention(
    model: torch.nn.Module,
    group_size_ratio: float = 0.25,
    shift: Shift = "split",
    *,
    group_size: int | None = None,
    backend: Backend = "auto",
) -> torch.nn.Module:
    """Train ``model`` with S2-Attn (eval mode keeps full attention). Returns the model.

    Also hooks ``model``'s forward so that what every layer shares (masks, document ids,
    cu_seqlens) is built once per forward and released when it ends."""
    return _switch(model, S2Settings(group_size_ratio, group_size, shift, backend))


def use_document_full_attention(model: torch.nn.Module, backend: Backend = "auto") -> torch.nn.Module:
    """Train ``model`` with full causal attention that keeps packed documents apart by their
    own causal calls (CPU: the fused kernel on each document's span; CUDA: a varlen kernel's
    sequences) instead of the [N, N] mask the model's own SDPA builds for packed rows; the
    same function as S2-Attn's eval mode. Returns the model."""
    return _switch(model, S2Settings(backend=backend, full=True))


def _switch(model: torch.nn.Module, settings: S2Settings) -> torch.nn.Module:
    register()
    config = _config_of(model)
    install_forward_cache_hooks(model)
    if config._attn_implementation != ATTN_IMPLEMENTATION:
        setattr(model, _PREVIOUS_ATTR, config._attn_implementation or "sdpa")
    for module in model.modules():
        if hasattr(module, "layer_idx"):  # the attention layers (and harmlessly, their blocks)
            setattr(module, _SETTINGS_ATTR, settings)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def use_full_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Switch back to the model's own attention (sdpa unless it had another)."""
    model.set_attn_implementation(getattr(model, _PREVIOUS_ATTR, "sdpa"))
    return model


def s2_settings(model: torch.nn.Module) -> S2Settings | None:
    """The settings of longtune's attention in force (``full`` set when it trains with full
    attention, ``use_document_full_attention``), or None when the model runs its own."""
    if _config_of(model)._attn_implementation != ATTN_IMPLEMENTATION:
        return None
    for module in model.modules():
        if hasattr(module, _SETTINGS_ATTR):
            return getattr(module, _SETTINGS_ATTR)
    return S2Settings()


def _config_of(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        raise TypeError(
            f"expected a transformers PreTrainedModel (or a PEFT wrapper of one), got {type(model).__name__}"
        )
    return config
