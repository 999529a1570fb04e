"""A prepared dataset's blocks read by the training workers themselves, without Ray Data.

`longtune prepare` has already tokenized and packed the corpus into parquet files of
fixed-size blocks, so all a worker needs is its own contiguous range of rows: the driver
reads the files' footers once (row counts), and each worker opens only the files its range
touches, row group by row group. No streaming executor, split coordinator, stats or
dataset-manager actors run beside training; on a machine whose cores all run the workers'
torch threads each of those took ~1% of a core, and every CPU-second taken from a torch
thread there costs the step about a second of wall clock (README: Ray's overhead).

The shard's interface is the part of Ray's ``DataIterator`` the loop uses
(``iter_torch_batches``), with the same tensors: every list column as a
``[batch, context_length]`` tensor of its parquet type (int32), on the given device. Rows go
to the shards in file order, shard ``k`` of ``n`` taking rows ``[k*m, (k+1)*m)`` with
``m = total // n`` (the rest, under ``n`` rows, is left out so every shard holds as many rows,
as Ray's ``streaming_split(equal=True)`` does); the order is the same on every run, which is
what resuming from a checkpoint's batch count needs.

No read-ahead: a row group is read when the first of its rows is needed (a local 27 MiB
one in ~20 ms; from object storage, a request per file), once per hundreds of steps, and
``train/data_wait_s`` shows it if it ever matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from longtune.data.errors import DataError


@dataclass(frozen=True)
class PreparedSplit:
    """One split of a prepared dataset: where its files are and how many rows each holds
    (read from their footers by ``open_split``, on the driver)."""

    root: str  # the prepared dataset: a local directory or an s3:// / gs:// URI
    files: tuple[str, ...]  # the split's parquet files, relative to root, in order
    rows: tuple[int, ...]  # rows (blocks) in each file

    @property
    def total(self) -> int:
        return sum(self.rows)

    def shard(self, index: int, count: int) -> PreparedShard:
        """The ``index``-th of ``count`` equal, contiguous shards."""
        if not 0 <= index < count:
            raise ValueError(f"shard index {index} is not in [0, {count})")
        per_shard = self.total // count
        return PreparedShard(self, index * per_shard, (index + 1) * per_shard)

    def limit(self, rows: int) -> PreparedSplit:
        """The split's first ``rows`` rows (a search's trials read no more)."""
        kept, left = [], rows
        for count in self.rows:
            if left <= 0:
                break
            kept.append(min(count, left))
            left -= kept[-1]
        return PreparedSplit(self.root, self.files[:len(kept)], tuple(kept))

    def whole(self) -> PreparedShard:
        return PreparedShard(self, 0, self.total)


def open_split(root: str, files: list[str]) -> PreparedSplit:
    """The split of the prepared dataset at ``root`` made of ``files`` (relative paths)."""
    import pyarrow.parquet as pq

    from longtune.data.sources import resolve

    fs, base = resolve(root)
    rows = []
    for name in files:
        path = f"{base.rstrip('/')}/{name}"
        try:
            with fs.open_input_file(path) as f:
                rows.append(pq.ParquetFile(f).metadata.num_rows)
        except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
            raise DataError(f"cannot read the prepared block file {root.rstrip('/')}/{name}: {exc}") from None
    return PreparedSplit(root=root, files=tuple(files), rows=tuple(rows))


@dataclass(frozen=True)
class PreparedShard:
    """Rows ``[start, stop)`` of a ``PreparedSplit``, read on the worker."""

    split: PreparedSplit
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def iter_torch_batches(self, *, batch_size: int, drop_last: bool = False, device=None
                           ) -> Iterator[dict[str, object]]:
        """Batches of ``batch_size`` rows as ``{column: tensor [batch, context_length]}``;
        the last, smaller one only without ``drop_last``."""
        import torch

        pending: list[dict[str, object]] = []  # single-row slices not yet batched
        for rows in self._row_batches():
            for i in range(len(next(iter(rows.values())))):
                pending.append({k: v[i:i + 1] for k, v in rows.items()})
                if len(pending) == batch_size:
                    yield _stack(pending, device, torch)
                    pending = []
        if pending and not drop_last:
            yield _stack(pending, device, torch)

    def _row_batches(self) -> Iterator[dict[str, object]]:
        """This shard's rows, a row group at a time, as ``{column: ndarray [rows, length]}``."""
        import pyarrow.parquet as pq

        from longtune.data.sources import resolve

        fs, base = resolve(self.split.root)
        first = 0  # the split's row index of the current file's first row
        for name, count in zip(self.split.files, self.split.rows):
            lo, hi = max(self.start, first), min(self.stop, first + count)
            if lo < hi:
                with fs.open_input_file(f"{base.rstrip('/')}/{name}") as f:
                    pfile = pq.ParquetFile(f)
                    group_first = first
                    for g in range(pfile.metadata.num_row_groups):
                        group_rows = pfile.metadata.row_group(g).num_rows
                        a, b = max(lo, group_first), min(hi, group_first + group_rows)
                        if a < b:
                            table = pfile.read_row_group(g).slice(a - group_first, b - a)
                            yield _columns(table, f"{self.split.root.rstrip('/')}/{name}")
                        group_first += group_rows
            first += count
            if first >= self.stop:
                return


def _columns(table, where: str) -> dict[str, object]:
    """The table's fixed-size list columns as ``[rows, length]`` numpy arrays."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if not pa.types.is_fixed_size_list(column.type):
            raise DataError(f"{where}: column {name!r} is {column.type}, not the fixed-size list of a "
                            "prepared block; was it written by `longtune prepare`?")
        width = column.type.list_size
        # flatten() honours the slice's offset; values would not
        out[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    return out


def _stack(rows: list[dict[str, object]], device, torch) -> dict[str, object]:
    import numpy as np

    batch = {}
    for name in rows[0]:
        tensor = torch.from_numpy(np.ascontiguousarray(np.concatenate([r[name] for r in rows])))
        batch[name] = tensor.to(device) if device is not None else tensor
    return batch
