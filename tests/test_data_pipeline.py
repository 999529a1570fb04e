"""The Ray Data pipeline end to end on a real local Ray and real files: block lengths,
position_ids at document starts, token conservation, determinism, the manifest, loading
and streaming, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longtune.config import from_dict
from longtune.data import DataError, load_prepared, prepare, stream_blocks, vocab_hash
from longtune.data.manifest import MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("ray_local")

L = 64


def write_corpus(root: Path, make_text) -> list[str]:
    """Twelve documents in every supported shape: text files in a directory tree, a .jsonl,
    a .json array and a .parquet file. Returns the documents' texts."""
    texts = [make_text(seed, 40 + 37 * seed) for seed in range(12)]
    (root / "docs" / "sub").mkdir(parents=True)
    for i in range(4):
        (root / "docs" / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(texts[i])
    (root / "docs" / "notes.bin").write_bytes(b"\x00\x01 ignored: not a text suffix")
    (root / "docs" / ".hidden.txt").write_text("ignored: hidden")
    with open(root / "records.jsonl", "w") as f:
        for t in texts[4:7]:
            f.write(json.dumps({"id": 1, "content": t}) + "\n")
    (root / "array.json").write_text(json.dumps([{"content": t} for t in texts[7:9]]))
    pq.write_table(pa.table({"content": texts[9:12]}), root / "shard.parquet")
    return texts


def config(tmp_path: Path, tokenizer: str, sources: list[str], **data):
    tree = {
        "data": {
            "sources": sources,
            "tokenizer": tokenizer,
            "context_length": L,
            "prepared_path": str(tmp_path / "out"),
            "text_field": "content",
            "min_doc_chars": 0,
            "eval_fraction": 0.25,
            "tokenize_batch_size": 3,
            **data,
        }
    }
    return from_dict(tree)


def read_split(out: str, manifest: dict, split: str) -> dict[str, np.ndarray]:
    tables = [pq.read_table(f"{out}/{name}") for name in manifest["splits"][split]["files"]]
    if not tables:
        return {}
    table = pa.concat_tables(tables)
    return {name: np.array(table[name].to_pylist()) for name in table.column_names}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_text):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root, make_text)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


def sources_of(root: Path) -> list[str]:
    return [str(root / "docs"), str(root / "records.jsonl"), str(root / "*.json"), str(root / "shard.parquet")]


@pytest.fixture(scope="module")
def prepared(corpus, tiny_tokenizer_path, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("prepared")
    cfg = config(out, tiny_tokenizer_path, sources_of(root))
    return cfg, prepare(cfg)


def test_blocks_have_context_length_and_positions_restart_at_documents(prepared, hf_tokenizer):
    cfg, manifest = prepared
    eos = hf_tokenizer.eos_token_id
    for split in ("train", "eval"):
        blocks = read_split(cfg.data.prepared_path, manifest, split)
        ids, pos = blocks["input_ids"], blocks["position_ids"]
        assert ids.shape == pos.shape == (manifest["blocks"][split], L)
        assert "loss_mask" not in blocks  # remainder: drop, so no padding and no mask
        assert (pos[:, 0] == 0).all()
        # A document starts right after an EOS, and only there.
        after_eos = np.zeros_like(ids, dtype=bool)
        after_eos[:, 1:] = ids[:, :-1] == eos
        assert ((pos == 0)[:, 1:] == after_eos[:, 1:]).all()
        step = np.diff(pos, axis=1)
        assert ((step == 1) | (pos[:, 1:] == 0)).all()


def test_token_conservation_and_manifest(prepared, corpus, hf_tokenizer):
    cfg, manifest = prepared
    _, texts = corpus
    expected = sum(len(hf_tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)
    tokens = manifest["tokens"]
    assert sum(tokens["tokenized"].values()) == expected
    for split in ("train", "eval"):
        assert tokens["in_blocks"][split] == manifest["blocks"][split] * L
        assert tokens["in_blocks"][split] + tokens["dropped"][split] == tokens["tokenized"][split]
        assert tokens["dropped"][split] < L  # one pass-2 batch: at most one partial block

    assert manifest["documents"]["kept"]["train"] + manifest["documents"]["kept"]["eval"] == 12
    assert manifest["documents"]["kept"]["eval"] > 0
    assert manifest["documents"]["too_short"] == manifest["documents"]["unreadable"] == 0
    assert manifest["skipped"] == []
    assert manifest["files"]["found"] == 7  # 4 text files, the jsonl, json and parquet
    assert manifest["context_length"] == L and manifest["position_ids"] == "document"
    assert manifest["tokenizer"]["vocab_hash"] == vocab_hash(hf_tokenizer)
    assert manifest["tokenizer"]["name"] == cfg.data.tokenizer
    on_disk = json.loads((Path(cfg.data.prepared_path) / MANIFEST_NAME).read_text())
    assert on_disk == manifest
    leftovers = [p.name for p in Path(cfg.data.prepared_path).parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_padding_conserves_every_token_and_is_masked(corpus, tiny_tokenizer_path, hf_tokenizer, tmp_path):
    root, texts = corpus
    cfg = config(tmp_path, tiny_tokenizer_path, sources_of(root), remainder="pad", eval_fraction=0.0)
    manifest = prepare(cfg)
    blocks = read_split(cfg.data.prepared_path, manifest, "train")
    real = blocks["input_ids"][blocks["loss_mask"] == 1]
    expected = Counter()
    for t in texts:
        expected.update(hf_tokenizer.encode(t, add_special_tokens=False) + [hf_tokenizer.eos_token_id])
    assert Counter(real.tolist()) == expected
    assert manifest["tokens"]["padding"]["train"] == int((blocks["loss_mask"] == 0).sum()) < L
    assert manifest["tokens"]["dropped"]["train"] == 0


def test_output_is_deterministic_across_runs_and_actor_counts(prepared, corpus, tiny_tokenizer_path, tmp_path):
    cfg, manifest = prepared
    root, _ = corpus
    again = config(tmp_path, tiny_tokenizer_path, sources_of(root), tokenize_concurrency=2)
    manifest2 = prepare(again)
    for split in ("train", "eval"):
        a = read_split(cfg.data.prepared_path, manifest, split)
        b = read_split(again.data.prepared_path, manifest2, split)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    for key in ("documents", "tokens", "blocks", "tokenizer"):
        assert manifest[key] == manifest2[key]


def test_load_prepared_refuses_another_tokenizer_or_length(prepared, tmp_path):
    cfg, manifest = prepared
    path = cfg.data.prepared_path
    good = load_prepared(path, manifest["tokenizer"]["vocab_hash"], L)
    ds = good.split("train")
    assert ds.count() == manifest["blocks"]["train"]
    batch = next(iter(ds.iter_torch_batches(batch_size=2)))
    assert tuple(batch["input_ids"].shape) == (2, L) and tuple(batch["position_ids"].shape) == (2, L)

    with pytest.raises(DataError, match="prepared with tokenizer .* not the one this job uses"):
        load_prepared(path, "sha256:" + "0" * 64, L)
    with pytest.raises(DataError, match=f"blocks of {L} tokens, but this job's context length is 128"):
        load_prepared(path, None, 128)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="has no manifest.json"):
        load_prepared(str(tmp_path / "half"))


@pytest.mark.parametrize("split", ["train", "eval"])
def test_the_workers_reader_gives_what_ray_data_gives(prepared, split):
    """data.prepared_reader: workers (longtune/data/shards.py) against Ray Data's reading of
    the same files: the same batches, tensors, dtypes, in the same order."""
    cfg, manifest = prepared
    data = load_prepared(cfg.data.prepared_path)
    ours = list(data.worker_split(split).whole().iter_torch_batches(batch_size=2, drop_last=True))
    theirs = list(data.split(split).iter_torch_batches(batch_size=2, drop_last=True))
    assert len(ours) == len(theirs) == manifest["blocks"][split] // 2 > 0
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name])


def test_stream_blocks_feeds_training_without_writing(corpus, tiny_tokenizer_path, tmp_path, prepared):
    root, _ = corpus
    _, manifest = prepared
    cfg = config(tmp_path, tiny_tokenizer_path, sources_of(root), remainder="pad")
    ds = stream_blocks(cfg, "train")
    n_real = 0
    for batch in ds.iter_torch_batches(batch_size=4, drop_last=False):
        assert batch["input_ids"].shape[1] == L and batch["loss_mask"].shape[1] == L
        assert (batch["position_ids"][:, 0] == 0).all()
        n_real += int(batch["loss_mask"].sum())
    # The same documents as the prepared train split: every token once, nothing dropped.
    assert n_real == manifest["tokens"]["tokenized"]["train"]
    assert not (tmp_path / "out").exists()


def test_continuous_positions_and_max_documents(corpus, tiny_tokenizer_path, tmp_path):
    root, _ = corpus
    cfg = config(tmp_path, tiny_tokenizer_path, [str(root / "docs"), str(root / "records.jsonl")],
                 position_ids="continuous", max_documents=5, eval_fraction=0.0)
    manifest = prepare(cfg)
    assert manifest["documents"]["kept"] == {"train": 5, "eval": 0}
    blocks = read_split(cfg.data.prepared_path, manifest, "train")
    assert (blocks["position_ids"] == np.arange(L)).all()


def test_prepare_command_line(corpus, tiny_tokenizer_path, tmp_path, capsys):
    from longtune.cli import main

    root, _ = corpus
    out = tmp_path / "cli-out"
    code = main(["prepare", "--source", str(root / "docs"), "--tokenizer", tiny_tokenizer_path,
                 "--context-length", str(L), "--out", str(out), "data.min_doc_chars=0"])
    assert code == 0
    assert (out / MANIFEST_NAME).is_file()
    shown = capsys.readouterr().out
    assert "longtune prepare" in shown and "blocks of 64 tokens" in shown and "tokens/s" in shown


def test_object_store_layout_writes_the_manifest_last_and_drops_stale_files(corpus, tiny_tokenizer_path, tmp_path):
    # file:// goes through the object-store code path (pyarrow filesystem, no rename).
    root, _ = corpus
    uri = f"file://{tmp_path}/remote"
    cfg = config(tmp_path, tiny_tokenizer_path, [str(root / "docs")], prepared_path=uri)
    first = prepare(cfg)
    second = prepare(cfg)
    files = sorted(str(p.relative_to(tmp_path / "remote")) for p in (tmp_path / "remote").rglob("*.parquet"))
    listed = sorted(f for s in second["splits"].values() for f in s["files"])
    assert files == listed and set(listed).isdisjoint(f for s in first["splits"].values() for f in s["files"])
    assert load_prepared(uri).split("train").count() == second["blocks"]["train"]
    assert load_prepared(uri).worker_split("train").total == second["blocks"]["train"]


@pytest.mark.slow
def test_default_corpus_with_the_seed_tokenizer(tmp_path):
    """The embedded default: the stdlib's own source files and the seed tokenizer."""
    cfg = from_dict(
        {
            "model": {"cache_dir": str(tmp_path / "cache")},
            "data": {"prepared_path": str(tmp_path / "out"), "max_documents": 30, "context_length": 256},
        }
    )
    manifest = prepare(cfg)
    assert manifest["tokenizer"]["name"] == "longtune/seed"
    assert manifest["tokenizer"]["vocab_size"] == 4096
    assert manifest["documents"]["too_short"] > 100  # most stdlib modules are under 8000 chars
    assert sum(manifest["documents"]["kept"].values()) + manifest["documents"]["unreadable"] <= 30
    assert manifest["blocks"]["train"] > 100
