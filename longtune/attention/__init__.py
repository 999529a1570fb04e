"""Shifted sparse attention (S2-Attn) for transformers 5 models. Plain torch + transformers.

The transformers glue (``interface.py``) is imported on first use: the attention itself is
plain torch, and a process that only runs it (a gloo rank of a test, a benchmark) need not
pay transformers' import (seconds)."""

from longtune.attention.backends import BACKENDS, backend_report
from longtune.attention.reference import reference_attention, s2_reference_mask
from longtune.attention.s2 import full_attention, resolve_group_size, s2_attention

_INTERFACE = {
    "ATTN_IMPLEMENTATION", "S2Settings", "longtune_s2_attention", "s2_settings", "use_document_full_attention",
    "use_full_attention", "use_s2_attention",
}


def __getattr__(name: str):
    if name in _INTERFACE:
        from longtune.attention import interface

        return getattr(interface, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

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
    "use_document_full_attention",
    "use_full_attention",
    "use_s2_attention",
]
