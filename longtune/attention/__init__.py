"""Shifted sparse attention (S2-Attn) for transformers 5 models. Plain torch + transformers."""

from longtune.attention.backends import BACKENDS, backend_report
from longtune.attention.interface import (
    ATTN_IMPLEMENTATION,
    S2Settings,
    longtune_s2_attention,
    s2_settings,
    use_full_attention,
    use_s2_attention,
)
from longtune.attention.reference import reference_attention, s2_reference_mask
from longtune.attention.s2 import full_attention, resolve_group_size, s2_attention

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BACKENDS",
    "S2Settings",
    "backend_report",
    "full_attention",
    "longtune_s2_attention",
    "reference_attention",
    "resolve_group_size",
    "s2_attention",
    "s2_reference_mask",
    "s2_settings",
    "use_full_attention",
    "use_s2_attention",
]
