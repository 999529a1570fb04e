"""data/manifest.py: what a prepared dataset says about itself, and the datasets refused."""

from __future__ import annotations

import pytest
from pyarrow.fs import LocalFileSystem

from longtune.data.errors import DataError
from longtune.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    check_manifest,
    merge_counts,
    per_split,
    read_manifest,
    write_manifest,
)


def manifest(**extra):
    return {"format": FORMAT, "context_length": 1024,
            "tokenizer": {"name": "seed", "vocab_hash": "sha256:" + "a" * 64}, **extra}


def test_counts_merge_numbers_lists_and_nested_dicts():
    total = {"kept": 1, "skips": ["a"], "tokens": {"train": 10}}
    merge_counts(total, {"kept": 2, "skips": ["b"], "tokens": {"train": 5, "eval": 1}, "new": 3})
    assert total == {"kept": 3, "skips": ["a", "b"], "tokens": {"train": 15, "eval": 1}, "new": 3}
    assert per_split({"train": 4}) == {"train": 4, "eval": 0} == per_split({"train": 4, "other": 9})
    assert per_split(None) == {"train": 0, "eval": 0}


def test_a_written_manifest_reads_back(tmp_path):
    fs = LocalFileSystem()
    write_manifest(fs, str(tmp_path), manifest(blocks={"train": 3}))
    assert read_manifest(fs, str(tmp_path), "here") == manifest(blocks={"train": 3})


@pytest.mark.parametrize("content, message", [
    (None, f"has no {MANIFEST_NAME}: it is not a prepared dataset, or its preparation did not finish"),
    ("{not json", "is not valid JSON"),
    ('{"format": "something/9"}', "has format 'something/9'; this longtune reads"),
    ("[1, 2]", "has format None"),
])
def test_unfinished_or_foreign_datasets_are_refused_by_name(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(DataError) as caught:
        read_manifest(LocalFileSystem(), str(tmp_path), "s3://bucket/prepared")
    assert message in str(caught.value) and "s3://bucket/prepared" in str(caught.value)


def test_another_tokenizer_or_block_length_is_refused_with_the_fix():
    m = manifest()
    check_manifest(m, "data", "sha256:" + "a" * 64, 1024)  # the matching job
    check_manifest(m, "data", None, None)  # nothing to check against
    with pytest.raises(DataError, match="prepared with tokenizer 'seed'.*prepare it again with this job's tokenizer"):
        check_manifest(m, "data", "sha256:" + "b" * 64, 1024)
    with pytest.raises(DataError, match="holds blocks of 1024 tokens.*--context-length 2048"):
        check_manifest(m, "data", None, 2048)
