"""Packing, without Ray: block shapes, position_ids at block and document starts, exact
token conservation through both passes, padding and its mask."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from longtune.data.pack import (
    BLOCK,
    DOC,
    ERROR,
    PIECE,
    SHORT,
    STATS,
    PackOptions,
    merge_pieces,
    pack,
    pack_documents,
)

EOS = 0


def _doc(d: int, n: int) -> np.ndarray:
    """Document d: n tokens that name their document and index (d*100000 + i), then EOS."""
    return np.concatenate([d * 100_000 + 1 + np.arange(n - 1), [EOS]]).astype(np.int32)


def _records(lengths: list[int], *, first: int = 0, splits: list[str] | None = None) -> pa.Table:
    docs = [_doc(first + i, n) for i, n in enumerate(lengths)]
    return pa.table(
        {
            "kind": [DOC] * len(docs),
            "source": [f"doc{first + i}" for i in range(len(docs))],
            "split": splits or ["train"] * len(docs),
            "reason": [""] * len(docs),
            "count": [1] * len(docs),
            "input_ids": pa.array([d.tolist() for d in docs], type=pa.list_(pa.int32())),
        }
    )


def _opts(L: int, *, remainder: str = "drop", position_ids: str = "document") -> PackOptions:
    return PackOptions(context_length=L, position_ids=position_ids, remainder=remainder, pad_id=EOS)


def _two_passes(batches: list[pa.Table], opts: PackOptions) -> pa.Table:
    """Pass 1 per batch, then pass 2 over all pass-1 rows at once."""
    return merge_pieces(pa.concat_tables([pack_documents(b, opts) for b in batches]), opts)


def _blocks(out: pa.Table, split: str = "train"):
    rows = out.filter(pa.compute.and_(pa.compute.equal(out["kind"], BLOCK), pa.compute.equal(out["split"], split)))
    ids = np.array(rows["input_ids"].to_pylist(), dtype=np.int64)
    pos = np.array(rows["position_ids"].to_pylist(), dtype=np.int64)
    mask = np.array(rows["loss_mask"].to_pylist()) if "loss_mask" in rows.column_names else None
    return ids, pos, mask


def _stats(out: pa.Table) -> dict:
    total: dict = {}
    from longtune.data.manifest import merge_counts

    for text in out.filter(pa.compute.equal(out["kind"], STATS))["stats"].to_pylist():
        merge_counts(total, json.loads(text))
    return total


def test_pack_cuts_full_blocks_and_restarts_positions_at_segments():
    ids = np.arange(10, dtype=np.int32)
    starts = np.zeros(10, bool)
    starts[[0, 3]] = True
    p = pack(ids, starts, 4)
    assert p.ids.shape == (2, 4)
    assert p.positions.tolist() == [[0, 1, 2, 0], [0, 1, 2, 3]]  # block 2 starts mid-document at 0
    assert p.rest_ids.tolist() == [8, 9] and p.rest_positions.tolist() == [0, 1]


@pytest.mark.parametrize("remainder", ["drop", "pad"])
@pytest.mark.parametrize("L", [7, 64, 1000])
def test_every_token_is_in_one_block_or_the_counted_remainder(L, remainder):
    rng = np.random.default_rng(L)
    lengths = rng.integers(1, 3 * L, size=60).tolist()
    batches = [_records(lengths[i : i + 7], first=i) for i in range(0, 60, 7)]
    out = _two_passes(batches, _opts(L, remainder=remainder))
    ids, pos, mask = _blocks(out)
    stats = _stats(out)

    assert ids.shape[1] == L and pos.shape == ids.shape
    real = ids[mask == 1] if mask is not None else ids.reshape(-1)
    assert len(real) + stats["dropped_tokens"].get("train", 0) == sum(lengths)
    assert stats["tokens"]["train"] == sum(lengths)
    # Each token names its document and index: none is duplicated...
    non_eos = real[real != EOS]
    assert len(np.unique(non_eos)) == len(non_eos)
    all_tokens = np.concatenate([_doc(i, n) for i, n in enumerate(lengths)])
    assert set(non_eos.tolist()) <= set(all_tokens.tolist())
    if remainder == "pad":
        # ...and with padding, none is lost.
        assert sorted(real.tolist()) == sorted(all_tokens.tolist())
        assert stats["pad_tokens"]["train"] == int((mask == 0).sum())
        assert stats.get("dropped_tokens", {}) == {}
    else:
        assert mask is None
        assert stats["dropped_tokens"]["train"] < L  # one batch in pass 2: one remainder


def test_document_positions_restart_at_block_and_document_starts_only():
    L = 50
    lengths = [30, 80, 5, 5, 120, 44, 17]
    out = _two_passes([_records(lengths[:3]), _records(lengths[3:], first=3)], _opts(L))
    ids, pos, _ = _blocks(out)
    for row_ids, row_pos in zip(ids, pos):
        assert row_pos[0] == 0
        for t in range(1, L):
            starts_here = row_ids[t - 1] == EOS  # every piece ends with its document's EOS
            assert (row_pos[t] == 0) == starts_here
            if not starts_here:
                assert row_pos[t] == row_pos[t - 1] + 1
                assert row_ids[t] == row_ids[t - 1] + 1 or row_ids[t] == EOS  # same document


def test_continuous_positions_are_one_range_per_block():
    out = _two_passes([_records([30, 80, 45])], _opts(32, position_ids="continuous"))
    _, pos, _ = _blocks(out)
    assert (pos == np.arange(32)).all()


def test_padding_is_masked_and_its_own_segment():
    L = 16
    out = _two_passes([_records([5])], _opts(L, remainder="pad"))
    ids, pos, mask = _blocks(out)
    assert mask.tolist() == [[1] * 5 + [0] * 11]
    assert ids[0, 5:].tolist() == [EOS] * 11
    assert pos[0].tolist() == list(range(5)) + list(range(11))


def test_pieces_of_many_batches_are_merged_before_dropping():
    # Each batch alone is under one block; together they fill three.
    L = 100
    batches = [_records([40, 35], first=2 * i) for i in range(4)]
    pass1 = pa.concat_tables([pack_documents(b, _opts(L)) for b in batches])
    assert set(pass1["kind"].to_pylist()) == {PIECE, STATS}
    ids, _, _ = _blocks(merge_pieces(pass1, _opts(L)))
    assert len(ids) == 3


def test_splits_are_packed_apart():
    L = 10
    out = _two_passes([_records([12, 9, 15, 8], splits=["train", "eval", "train", "eval"])], _opts(L))
    train, _, _ = _blocks(out, "train")
    evals, _, _ = _blocks(out, "eval")
    assert {t // 100_000 for t in train.reshape(-1) if t != EOS} <= {0, 2}
    assert {t // 100_000 for t in evals.reshape(-1) if t != EOS} <= {1, 3}
    stats = _stats(out)
    assert stats["documents"] == {"train": 2, "eval": 2}


def test_skipped_records_are_counted_and_listed():
    table = pa.table(
        {
            "kind": [DOC, SHORT, ERROR],
            "source": ["a", "b", "c.jsonl:line 3"],
            "split": ["train", "", ""],
            "reason": ["", "", "no field 'text'"],
            "count": [1, 4, 1],
            "input_ids": pa.array([_doc(0, 20).tolist(), [], []], type=pa.list_(pa.int32())),
        }
    )
    stats = json.loads(pack_documents(table, _opts(8))["stats"][-1].as_py())
    assert stats["short"] == 4 and stats["errors"] == 1
    assert stats["skipped"] == [["c.jsonl:line 3", "no field 'text'"]]


def test_training_output_has_only_numeric_fixed_size_columns():
    out = merge_pieces(pack_documents(_records([40, 40]), _opts(16, remainder="pad")), _opts(16, remainder="pad"), with_stats=False)
    assert out.column_names == ["input_ids", "position_ids", "loss_mask"]
    assert out.schema.field("input_ids").type == pa.list_(pa.int32(), 16)
    assert out.num_rows == 5  # 80 tokens: 5 blocks of 16, no padding needed
