"""Packing tokenized documents end to end into blocks of exactly context_length tokens.

Pure numpy/pyarrow over one batch, no Ray: the pipeline runs these functions inside
``map_batches`` and the tests call them directly.

Positions. A block is a run of *segments*; a segment is the part of one document that lies
in the block. In ``document`` mode position_ids restart at 0 at every segment start, so a
block always begins at position 0 (a document continued from the previous block starts
again at 0: RoPE sees only relative positions inside the block, and the attention code
reads ``position_ids == 0`` as "a new document starts here"). In ``continuous`` mode every
block is one range 0..L-1.

Packing across batch edges: two passes of the same packer.
  pass 1 (``pack_documents``), over each batch of tokenized documents: per split, the
    documents are laid end to end and cut into full blocks; the tokens after the last full
    block (< L per split) leave the batch as one ``piece`` row, with their positions.
  pass 2 (``merge_pieces``), over much larger batches of pass-1 rows: full blocks pass
    through; the pieces of many pass-1 batches are laid end to end (each piece starts a
    new segment) and cut into full blocks again. What is left after that (< L per split
    per pass-2 batch) is the only remainder: dropped, or padded to one block whose padding
    is masked out of the loss (``loss_mask`` 0) and forms a segment of its own.
So every token is in exactly one block or in the counted remainder; nothing is lost or
duplicated at a batch edge, and the output depends only on the batch contents (no state
carried between calls, hence deterministic). Every pass emits one ``stats`` row with its
counts; the writer sums them into the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

# Row kinds: read/tokenize rows are documents or skipped records; pack rows are blocks,
# pieces (pass 1 -> pass 2 only) or per-batch counts.
DOC, SHORT, LONG, ERROR = "doc", "short", "long", "error"
BLOCK, PIECE, STATS = "block", "piece", "stats"
EXAMPLE = "example"  # data.format sft: one tokenized conversation with its targets

_IDS = pa.list_(pa.int32())


@dataclass(frozen=True)
class PackOptions:
    context_length: int
    position_ids: str  # "document" | "continuous"
    remainder: str  # "drop" | "pad"
    pad_id: int
    format: str = "text"  # "text" | "sft"

    @property
    def masked(self) -> bool:
        """Blocks carry a loss_mask when padding can occur, and always for SFT (its targets)."""
        return self.remainder == "pad" or self.format == "sft"


@dataclass
class Packed:
    ids: np.ndarray  # (n, L) int32: full blocks
    positions: np.ndarray  # (n, L) int32: restart at block and segment starts
    rest_ids: np.ndarray  # (r,) int32, r < L: tokens after the last full block
    rest_positions: np.ndarray  # (r,) int32


def pack(ids: np.ndarray, segment_starts: np.ndarray, context_length: int) -> Packed:
    """Cut ``ids`` (N,) into full blocks of ``context_length``; ``segment_starts`` (N,) bool
    marks where a document (or piece) begins. Positions restart at 0 at each segment start
    and at each block start (document-mode positions)."""
    L = context_length
    n_tokens = len(ids)
    idx = np.arange(n_tokens, dtype=np.int64)
    restart = np.asarray(segment_starts, dtype=bool).copy()
    restart[::L] = True  # every block begins a segment
    last_restart = np.maximum.accumulate(np.where(restart, idx, 0))
    positions = (idx - last_restart).astype(np.int32)
    n_full = n_tokens // L
    cut = n_full * L
    ids = np.asarray(ids, dtype=np.int32)
    return Packed(
        ids=ids[:cut].reshape(n_full, L),
        positions=positions[:cut].reshape(n_full, L),
        rest_ids=ids[cut:],
        rest_positions=positions[cut:],
    )


def final_positions(doc_positions: np.ndarray, mode: str) -> np.ndarray:
    """(n, L) document-mode positions -> the configured mode's."""
    if mode == "document":
        return doc_positions
    n, L = doc_positions.shape
    return np.broadcast_to(np.arange(L, dtype=np.int32), (n, L))


def pad_block(
    rest_ids: np.ndarray, rest_positions: np.ndarray, opts: PackOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The remainder (r < L tokens) padded to one block: ids, doc-mode positions, loss mask,
    each (1, L). The padding is a segment of its own, so no real token attends to it."""
    L, r = opts.context_length, len(rest_ids)
    ids = np.concatenate([rest_ids, np.full(L - r, opts.pad_id, np.int32)])
    positions = np.concatenate([rest_positions, np.arange(L - r, dtype=np.int32)])
    mask = np.concatenate([np.ones(r, np.int8), np.zeros(L - r, np.int8)])
    return ids[None], positions[None], mask[None]


# ------------------------------------------------------------------ SFT examples



@dataclass
class PackedExamples:
    ids: np.ndarray  # (n_blocks, L) int32
    positions: np.ndarray  # (n_blocks, L) int32: restart at every example and at the padding
    loss_mask: np.ndarray  # (n_blocks, L) int8: 1 = target
    padding: int  # padding tokens in all blocks


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], context_length: int, pad_id: int) -> PackedExamples:
    """``examples`` (ids, targets) of at most ``context_length`` tokens each, placed
    first-fit in order into blocks (an example goes into the first open block with room),
    each block padded to ``context_length``."""
    L = context_length
    blocks: list[list[int]] = []  # example indices per block
    room: list[int] = []
    for i, (ids, _) in enumerate(examples):
        n = len(ids)
        if n > L:
            raise ValueError(f"an example of {n} tokens does not fit a block of {L}")
        for b, free in enumerate(room):
            if free >= n:
                blocks[b].append(i)
                room[b] -= n
                break
        else:
            blocks.append([i])
            room.append(L - n)
    out_ids = np.full((len(blocks), L), pad_id, dtype=np.int32)
    out_pos = np.zeros((len(blocks), L), dtype=np.int32)
    out_mask = np.zeros((len(blocks), L), dtype=np.int8)
    for b, members in enumerate(blocks):
        at = 0
        for i in members:
            ids, targets = examples[i]
            n = len(ids)
            out_ids[b, at : at + n] = ids
            out_pos[b, at : at + n] = np.arange(n, dtype=np.int32)
            out_mask[b, at : at + n] = targets
            at += n
        out_pos[b, at:] = np.arange(L - at, dtype=np.int32)  # the padding: a segment of its own
    return PackedExamples(out_ids, out_pos, out_mask, padding=int(sum(room)))


def unpack_examples(ids: np.ndarray, positions: np.ndarray, loss_mask: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The examples of packed blocks ((n, L) each) back as (ids, targets), padding left out
    (a segment with no targets)."""
    out = []
    for row_ids, row_pos, row_mask in zip(ids, positions, loss_mask):
        starts = np.flatnonzero(row_pos == 0).tolist() + [len(row_ids)]
        for a, b in zip(starts[:-1], starts[1:]):
            if row_mask[a:b].any():
                out.append((np.asarray(row_ids[a:b], np.int32), np.asarray(row_mask[a:b], np.int8)))
    return out


# ------------------------------------------------------------------ batch adaptors


def list_column(table: pa.Table, name: str) -> list[np.ndarray]:
    """A list<int> column as one int32 array per row (views, not copies)."""
    col = table.column(name).combine_chunks()
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    lengths = col.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _lists(arrays: list[np.ndarray]) -> pa.Array:
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=_IDS)


def _fixed(rows: np.ndarray, n_null: int, L: int, dtype: Any) -> pa.Array:
    """(n, L) rows followed by ``n_null`` null rows as fixed_size_list<dtype>[L]."""
    values = np.concatenate([rows.reshape(-1), np.zeros(n_null * L, rows.dtype)])
    mask = pa.array(np.arange(len(rows) + n_null) >= len(rows))
    return pa.FixedSizeListArray.from_arrays(pa.array(values, type=dtype), L, mask=mask)


def _add(counter: dict[str, int], key: str, value: int) -> None:
    counter[key] = counter.get(key, 0) + int(value)


def pack_documents(batch: pa.Table, opts: PackOptions) -> pa.Table:
    """Pass 1: tokenized documents -> full blocks + one piece per split + one stats row.

    Input columns: kind, source, split, reason, count, input_ids (a document's tokens with
    its EOS). Output columns: kind, split, input_ids, position_ids (list<int32>, document
    mode), stats (JSON, only on the stats row)."""
    kinds = batch.column("kind").to_pylist()
    splits = batch.column("split").to_pylist()
    counts = batch.column("count").to_pylist()
    ids = list_column(batch, "input_ids")
    stats: dict[str, Any] = {
        "documents": {}, "tokens": {}, "short": 0, "long": 0, "errors": 0, "skipped": []
    }
    by_split: dict[str, list[np.ndarray]] = {}
    for i, kind in enumerate(kinds):
        if kind == DOC:
            by_split.setdefault(splits[i], []).append(ids[i])
            _add(stats["documents"], splits[i], 1)
            _add(stats["tokens"], splits[i], len(ids[i]))
        elif kind == SHORT:
            stats["short"] += counts[i]
        elif kind in (LONG, ERROR):
            stats["long" if kind == LONG else "errors"] += counts[i]
            source = batch.column("source")[i].as_py()
            stats["skipped"].append([source, batch.column("reason")[i].as_py()])
        else:
            raise ValueError(f"pack_documents got a {kind!r} row; it packs tokenized documents")

    rows: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # kind, split, ids, positions
    for split in sorted(by_split):
        docs = by_split[split]
        flat = np.concatenate(docs)
        starts = np.zeros(len(flat), dtype=bool)
        starts[np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
        packed = pack(flat, starts, opts.context_length)
        rows += [(BLOCK, split, i, p) for i, p in zip(packed.ids, packed.positions)]
        if len(packed.rest_ids):
            rows.append((PIECE, split, packed.rest_ids, packed.rest_positions))
    empty = np.zeros(0, np.int32)
    rows.append((STATS, "", empty, empty))
    return pa.table(
        {
            "kind": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "input_ids": _lists([r[2] for r in rows]),
            "position_ids": _lists([r[3] for r in rows]),
            "stats": [""] * (len(rows) - 1) + [json.dumps(stats)],
        }
    )


def merge_pieces(batch: pa.Table, opts: PackOptions, *, with_stats: bool = True) -> pa.Table:
    """Pass 2: pass-1 rows -> final blocks (fixed_size_list<int32>[L] columns, plus loss_mask
    in pad mode) and, ``with_stats``, the incoming stats rows and one of its own.

    Without stats the output is training-ready: input_ids, position_ids[, loss_mask]."""
    L = opts.context_length
    kinds = batch.column("kind").to_pylist()
    splits = batch.column("split").to_pylist()
    ids = list_column(batch, "input_ids")
    positions = list_column(batch, "position_ids")
    stats_in = batch.column("stats").to_pylist()
    stats: dict[str, Any] = {"dropped_tokens": {}, "pad_tokens": {}}

    blocks: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
    pieces: dict[str, list[int]] = {}
    passed_stats: list[str] = []
    for i, kind in enumerate(kinds):
        if kind == BLOCK:
            blocks.setdefault(splits[i], []).append((ids[i][None], positions[i][None], None))
        elif kind == PIECE:
            pieces.setdefault(splits[i], []).append(i)
        elif kind == STATS:
            passed_stats.append(stats_in[i])
        else:
            raise ValueError(f"merge_pieces got a {kind!r} row; it merges pass-1 output")

    for split, rows in sorted(pieces.items()):
        flat = np.concatenate([ids[i] for i in rows])
        # A piece begins a segment, and so does every document start inside it.
        starts = np.concatenate([positions[i] == 0 for i in rows])
        packed = pack(flat, starts, L)
        out = blocks.setdefault(split, [])
        if len(packed.ids):
            out.append((packed.ids, packed.positions, None))
        rest = len(packed.rest_ids)
        if rest and opts.remainder == "pad":
            b_ids, b_pos, b_mask = pad_block(packed.rest_ids, packed.rest_positions, opts)
            out.append((b_ids, b_pos, b_mask))
            _add(stats["pad_tokens"], split, L - rest)
        elif rest:
            _add(stats["dropped_tokens"], split, rest)

    out_split: list[str] = []
    parts_ids, parts_pos, parts_mask = [], [], []
    for split in sorted(blocks):
        for b_ids, b_pos, b_mask in blocks[split]:
            out_split += [split] * len(b_ids)
            parts_ids.append(b_ids)
            parts_pos.append(final_positions(b_pos, opts.position_ids))
            parts_mask.append(b_mask if b_mask is not None else np.ones(b_ids.shape, np.int8))
    return block_table(out_split, parts_ids, parts_pos, parts_mask, L, masked=opts.masked,
                       stats_rows=passed_stats + [json.dumps(stats)] if with_stats else None)


def block_table(splits: list[str], ids: list[np.ndarray], positions: list[np.ndarray],
                masks: list[np.ndarray], L: int, *, masked: bool, stats_rows: list[str] | None) -> pa.Table:
    """A packing pass's output from its blocks (``ids``, ``positions``, ``masks``: (n_i, L)
    arrays, ``splits`` one name per block row): training-ready input_ids, position_ids
    [, loss_mask] columns (fixed_size_list[L]) when ``stats_rows`` is None, else with kind,
    split and stats columns and the stats rows after the blocks (for the writer)."""
    n = len(splits)
    all_ids = np.concatenate(ids) if n else np.zeros((0, L), np.int32)
    all_pos = np.concatenate(positions) if n else np.zeros((0, L), np.int32)
    all_mask = np.concatenate(masks) if n else np.zeros((0, L), np.int8)
    k = 0 if stats_rows is None else len(stats_rows)
    columns: dict[str, Any] = {}
    if stats_rows is not None:
        columns["kind"] = [BLOCK] * n + [STATS] * k
        columns["split"] = list(splits) + [""] * k
    columns["input_ids"] = _fixed(all_ids, k, L, pa.int32())
    columns["position_ids"] = _fixed(all_pos, k, L, pa.int32())
    if masked:
        columns["loss_mask"] = _fixed(all_mask, k, L, pa.int8())
    if stats_rows is not None:
        columns["stats"] = [""] * n + stats_rows
    return pa.table(columns)


def pack_sft(batch: pa.Table, opts: PackOptions, *, with_stats: bool = True) -> pa.Table:
    """data.format sft, the one packing pass: tokenized examples (kind ``example``, columns
    input_ids and loss_mask as lists) and stats rows -> padded blocks per split
    (``pack_examples``), as ``merge_pieces`` writes them: input_ids, position_ids, loss_mask
    (fixed_size_list[L]) and, ``with_stats``, kind/split/stats with the incoming stats rows
    and one of its own (padding tokens per split)."""
    L = opts.context_length
    kinds = batch.column("kind").to_pylist()
    splits = batch.column("split").to_pylist()
    ids = list_column(batch, "input_ids")
    targets = list_column(batch, "loss_mask")
    stats_in = batch.column("stats").to_pylist()
    by_split: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    passed_stats: list[str] = []
    for i, kind in enumerate(kinds):
        if kind == EXAMPLE:
            by_split.setdefault(splits[i], []).append((ids[i], targets[i]))
        elif kind == STATS:
            passed_stats.append(stats_in[i])
        else:
            raise ValueError(f"pack_sft got a {kind!r} row; it packs tokenized SFT examples")
    stats: dict[str, Any] = {"pad_tokens": {}}
    out_split: list[str] = []
    parts: list[PackedExamples] = []
    for split in sorted(by_split):
        packed = pack_examples(by_split[split], L, opts.pad_id)
        parts.append(packed)
        out_split += [split] * len(packed.ids)
        _add(stats["pad_tokens"], split, packed.padding)
    return block_table(out_split, [p.ids for p in parts], [p.positions for p in parts],
                       [p.loss_mask for p in parts], L, masked=True,
                       stats_rows=passed_stats + [json.dumps(stats)] if with_stats else None)
