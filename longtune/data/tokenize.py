"""Tokenizers: which one a job uses, its identity (vocabulary hash), and the Ray Data actor
that tokenizes documents with it."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa

from longtune.config import SEED_MODEL, Config
from longtune.data.errors import DataError
from longtune.data.pack import DOC


def tokenizer_name(config: Config) -> str:
    """data.tokenizer, else the model's own (model.name_or_path)."""
    return config.data.tokenizer or config.model.name_or_path


def load_tokenizer(config: Config):
    """The job's fast Hugging Face tokenizer: the seed tokenizer for ``longtune/seed``,
    else ``AutoTokenizer.from_pretrained`` (hub id or local path, no remote code)."""
    name = tokenizer_name(config)
    if name == SEED_MODEL:
        from longtune.seed import seed_tokenizer

        return seed_tokenizer(config.model.cache_dir)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load tokenizer {name!r}: {first_line}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {name!r} is a slow (Python) tokenizer; longtune needs a fast one "
            "(a tokenizer.json); convert it with transformers' convert_slow_tokenizer"
        )
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {name!r} has no EOS token to put between documents")
    return tokenizer


def vocab_hash(tokenizer) -> str:
    """sha256 over the vocabulary (token, id) sorted by id, and the special tokens: the same
    in every process, so a prepared dataset can be matched to the tokenizer that reads it."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    special = sorted(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    payload = json.dumps(
        {"vocab": vocab, "special": special, "eos": tokenizer.eos_token_id},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


class TokenizeDocuments:
    """Ray Data actor-pool UDF: documents -> token ids with EOS appended.

    The tokenizer travels as its ``tokenizer.json`` text and is built once per actor, so
    workers need neither the driver's files nor a hub download. Rows other than documents
    (skipped records) pass through with no tokens. The text column is dropped: from here on
    only tokens travel.
    """

    def __init__(self, tokenizer_json: str, eos_id: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        # A tokenizer saved mid-call can carry truncation or padding; documents need neither.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.eos = np.array([eos_id], dtype=np.int32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        kinds = batch.column("kind").to_pylist()
        doc_rows = [i for i, kind in enumerate(kinds) if kind == DOC]
        texts = batch.column("text").take(pa.array(doc_rows, type=pa.int64())).to_pylist()
        encodings = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        ids = [np.zeros(0, np.int32)] * len(kinds)
        for row, enc in zip(doc_rows, encodings):
            ids[row] = np.concatenate([np.asarray(enc.ids, dtype=np.int32), self.eos])
        lengths = np.array([len(a) for a in ids], dtype=np.int64)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        values = pa.array(np.concatenate(ids) if ids else np.zeros(0, np.int32))
        column = pa.ListArray.from_arrays(offsets, values, type=pa.list_(pa.int32()))
        return batch.drop_columns(["text"]).append_column("input_ids", column)


def special_tokens(tokenizer) -> dict[str, str]:
    """The tokenizer's named special tokens (bos, eos, unk, pad) as strings, for rebuilding
    it from its ``tokenizer.json`` in a Ray actor."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {n: str(getattr(tokenizer, n)) for n in names if getattr(tokenizer, n, None)}


class TokenizeConversations:
    """Ray Data actor-pool UDF for data.format sft: conversation rows (``text`` = messages as
    JSON, from the readers) -> one ``example`` row each (input_ids, loss_mask = its targets)
    and one stats row per batch: examples and tokens per split, truncated, dropped as too
    long, invalid (each skipped record listed with its reason). ``log_skips``: also log each
    record this step skips (streaming into training keeps no manifest)."""

    def __init__(self, tokenizer_json: str, specials: dict[str, str], template: str,
                 max_tokens: int, overlong: str, train_on_prompt: bool, log_skips: bool = False):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer.from_str(tokenizer_json)
        backend.no_truncation()
        backend.no_padding()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
        self.template, self.max_tokens = template, max_tokens
        self.overlong, self.train_on_prompt = overlong, train_on_prompt
        self.log_skips = log_skips

    def __call__(self, batch: pa.Table) -> pa.Table:
        import json as _json

        from longtune.data.pack import ERROR, EXAMPLE, LONG, SHORT, STATS, _add, _lists
        from longtune.data.sft import RecordError, encode_example

        stats: dict = {"documents": {}, "tokens": {}, "short": 0, "long": 0, "errors": 0, "skipped": [],
                       "truncated": 0, "truncated_tokens": 0}
        rows: list[tuple[str, str, np.ndarray, np.ndarray]] = []
        kinds = batch.column("kind").to_pylist()
        for i, kind in enumerate(kinds):
            source = batch.column("source")[i].as_py()
            if kind == DOC:
                split = batch.column("split")[i].as_py()
                try:
                    ex = encode_example(
                        self.tokenizer, self.template, _json.loads(batch.column("text")[i].as_py()),
                        max_tokens=self.max_tokens, overlong=self.overlong,
                        train_on_prompt=self.train_on_prompt,
                    )
                except RecordError as exc:
                    if self.log_skips:
                        logging.getLogger(__name__).warning("longtune data: skipped %s: %s", source, exc.reason)
                    stats["long" if exc.kind == LONG else "errors"] += 1
                    stats["skipped"].append([source, exc.reason])
                    continue
                rows.append((EXAMPLE, split, ex.ids, ex.targets))
                _add(stats["documents"], split, 1)
                _add(stats["tokens"], split, len(ex.ids))
                stats["truncated"] += ex.truncated > 0
                stats["truncated_tokens"] += ex.truncated
            elif kind == SHORT:
                stats["short"] += batch.column("count")[i].as_py()
            elif kind in (LONG, ERROR):
                stats["long" if kind == LONG else "errors"] += batch.column("count")[i].as_py()
                stats["skipped"].append([source, batch.column("reason")[i].as_py()])
        empty = np.zeros(0, np.int32)
        rows.append((STATS, "", empty, empty))
        return pa.table({
            "kind": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "input_ids": _lists([r[2] for r in rows]),
            "loss_mask": _lists([r[3] for r in rows]),
            "stats": [""] * (len(rows) - 1) + [_json.dumps(stats)],
        })
