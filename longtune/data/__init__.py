"""Corpus preparation: read documents, tokenize, pack into context-length blocks (Ray Data).

Importing ``longtune.data`` (or its Ray-free parts: passkey, pack, sources, stdlib) does not
import Ray; the pipeline functions below load it when first used.
"""

from __future__ import annotations

from typing import Any

from longtune.data.errors import DataError

_PIPELINE = {
    "prepare", "prepare_command", "stream_blocks", "open_blocks", "load_prepared", "PreparedData",
}
_TOKENIZE = {"load_tokenizer", "vocab_hash", "tokenizer_name"}

__all__ = ["DataError", *sorted(_PIPELINE), *sorted(_TOKENIZE)]


def __getattr__(name: str) -> Any:
    if name in _PIPELINE:
        from longtune.data import pipeline

        return getattr(pipeline, name)
    if name in _TOKENIZE:
        from longtune.data import tokenize

        return getattr(tokenize, name)
    raise AttributeError(f"module 'longtune.data' has no attribute {name!r}")
