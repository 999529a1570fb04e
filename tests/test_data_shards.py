"""The workers' own reader of prepared blocks (longtune/data/shards.py), on real parquet files
of several row groups: equal contiguous shards in file order, batches as Ray's
iter_torch_batches gives them, a search's limit, bad files named."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longtune.data.errors import DataError
from longtune.data.shards import PreparedSplit, open_split

L = 8


def block_table(first: int, rows: int) -> pa.Table:
    """Rows ``first..first+rows-1``; row r's input_ids are r*L..r*L+L-1, its positions r."""
    ids = np.arange(first * L, (first + rows) * L, dtype=np.int32)
    positions = np.repeat(np.arange(first, first + rows, dtype=np.int32), L)
    column = lambda values: pa.FixedSizeListArray.from_arrays(pa.array(values), L)  # noqa: E731
    return pa.table({"input_ids": column(ids), "position_ids": column(positions)})


@pytest.fixture
def split(tmp_path) -> PreparedSplit:
    """23 rows in three files (7, 9, 7), row groups of 3 rows."""
    (tmp_path / "train").mkdir()
    files, first = [], 0
    for i, rows in enumerate((7, 9, 7)):
        name = f"train/part-{i:05d}.parquet"
        pq.write_table(block_table(first, rows), tmp_path / name, row_group_size=3)
        files.append(name)
        first += rows
    return open_split(str(tmp_path), files)


def rows_of(batches) -> list[int]:
    out = []
    for batch in batches:
        assert batch["input_ids"].dtype == torch.int32 and batch["input_ids"].shape[1] == L
        for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
            row = int(positions[0])
            assert ids.tolist() == list(range(row * L, row * L + L)) and (positions == row).all()
            out.append(row)
    return out


def test_the_footers_give_each_files_rows(split):
    assert split.rows == (7, 9, 7) and split.total == 23
    assert pq.ParquetFile(f"{split.root}/{split.files[1]}").metadata.num_row_groups == 3


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_shards_are_equal_contiguous_and_in_file_order(split, count):
    per = 23 // count
    seen = []
    for k in range(count):
        rows = rows_of(split.shard(k, count).iter_torch_batches(batch_size=1))
        assert rows == list(range(k * per, (k + 1) * per))  # across files and row groups
        seen += rows
    assert len(seen) == per * count and len(set(seen)) == len(seen)


def test_batches_and_drop_last(split):
    shard = split.shard(1, 2)  # rows 11..21: starts in a file's middle row group
    kept = list(shard.iter_torch_batches(batch_size=4, drop_last=True))
    assert [b["input_ids"].shape[0] for b in kept] == [4, 4]
    assert rows_of(kept) == list(range(11, 19))
    everything = list(shard.iter_torch_batches(batch_size=4))
    assert [b["input_ids"].shape[0] for b in everything] == [4, 4, 3]
    assert all(b["input_ids"].is_contiguous() for b in everything)


def test_device_and_a_fresh_pass_each_time(split):
    shard = split.whole()
    first = rows_of(shard.iter_torch_batches(batch_size=5, device=torch.device("cpu")))
    assert first == rows_of(shard.iter_torch_batches(batch_size=5)) == list(range(23))


def test_limit_keeps_the_first_rows(split):
    assert split.limit(10).rows == (7, 3) and split.limit(10).files == split.files[:2]
    assert rows_of(split.limit(10).whole().iter_torch_batches(batch_size=2)) == list(range(10))
    assert split.limit(100).rows == split.rows


def test_a_shard_index_out_of_range_is_refused(split):
    with pytest.raises(ValueError, match=r"shard index 3 is not in \[0, 3\)"):
        split.shard(3, 3)


def test_a_missing_or_foreign_file_is_named(split, tmp_path):
    with pytest.raises(DataError, match="cannot read the prepared block file .*part-00009.parquet"):
        open_split(split.root, ["train/part-00009.parquet"])
    (tmp_path / "train" / "notes.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="notes.parquet"):
        open_split(split.root, ["train/notes.parquet"])
    pq.write_table(pa.table({"input_ids": pa.array([[1, 2]])}), tmp_path / "train" / "lists.parquet")
    foreign = open_split(split.root, ["train/lists.parquet"])
    with pytest.raises(DataError, match="column 'input_ids' is list<.*int64>, not the fixed-size list"):
        list(foreign.whole().iter_torch_batches(batch_size=1))
