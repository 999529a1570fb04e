"""data/tokenize.py: which tokenizer a job uses, its identity, and the tokenizing actor."""

from __future__ import annotations

import pyarrow as pa
import pytest

from longtune.config import load_config
from longtune.data.errors import DataError
from longtune.data.pack import DOC, SHORT
from longtune.data.tokenize import TokenizeDocuments, load_tokenizer, tokenizer_name, vocab_hash


def test_the_job_uses_data_tokenizer_else_the_models_own(tiny_tokenizer_path):
    assert tokenizer_name(load_config(None, ["model.name_or_path=/m"])) == "/m"
    assert tokenizer_name(load_config(None, ["model.name_or_path=/m", f"data.tokenizer={tiny_tokenizer_path}"])) \
        == tiny_tokenizer_path


def test_a_tokenizer_that_cannot_load_is_named(tmp_path):
    with pytest.raises(DataError, match=f"cannot load tokenizer '{tmp_path / 'none'}'"):
        load_tokenizer(load_config(None, [f"data.tokenizer={tmp_path / 'none'}"]))


def test_the_vocabulary_hash_is_stable_and_tells_tokenizers_apart(tiny_tokenizer_path):
    tokenizer = load_tokenizer(load_config(None, [f"data.tokenizer={tiny_tokenizer_path}"]))
    again = load_tokenizer(load_config(None, [f"data.tokenizer={tiny_tokenizer_path}"]))
    assert vocab_hash(tokenizer) == vocab_hash(again) and vocab_hash(tokenizer).startswith("sha256:")
    tokenizer.add_tokens(["<extra>"])
    assert vocab_hash(tokenizer) != vocab_hash(again)


def test_documents_get_their_tokens_and_an_eos_and_skipped_rows_none(tiny_tokenizer_path):
    tokenizer = load_tokenizer(load_config(None, [f"data.tokenizer={tiny_tokenizer_path}"]))
    actor = TokenizeDocuments(tokenizer.backend_tokenizer.to_str(), tokenizer.eos_token_id)
    batch = pa.table({"kind": [DOC, SHORT, DOC], "text": ["kalo mi", "", "nu pe ra"], "path": ["a", "b", "c"]})
    out = actor(batch)
    assert out.column_names == ["kind", "path", "input_ids"]  # the text is not carried further
    ids = out.column("input_ids").to_pylist()
    assert ids[0] == tokenizer.encode("kalo mi", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ids[1] == []
    assert ids[2][-1] == tokenizer.eos_token_id and len(ids[2]) > 1
