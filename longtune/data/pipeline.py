"""The Ray Data graph that turns a corpus into blocks of context_length tokens, and the
`longtune prepare` job that writes them with a manifest.

    files (driver: discover) -> read records (tasks) -> [limit max_documents]
      -> tokenize + pack pass 1 (actor pool, one tokenizer per actor)
      -> pack pass 2 (tasks) -> parquet + manifest (prepare) | Ray Train (stream_blocks)

Determinism: the file list is sorted and the graph runs with ``preserve_order``, so every
batch holds the same rows on every run and the packer (stateless) cuts the same blocks.

Atomic output: a local output is written to ``<out>.tmp-<id>`` and renamed into place when
complete (an older prepared dataset there is replaced, anything else is refused). On an
object store the old manifest is deleted first, data files carry the run id, and the
manifest that lists them is written last: a prefix without a manifest is unfinished, and
``load_prepared`` requires one.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
from ray.data import ActorPoolStrategy, Datasink

from longtune.atomic import swap_into_place
from longtune.config import Config, outputs_path
from longtune.data.errors import DataError
from longtune.data.manifest import (
    FORMAT,
    MANIFEST_NAME,
    MAX_LISTED_SKIPS,
    SPLITS,
    check_manifest,
    merge_counts,
    per_split,
    read_manifest,
    summary_table,
    write_manifest,
)
from longtune.data.pack import BLOCK, STATS, PackOptions, merge_pieces, pack_documents, pack_sft
from longtune.data.sft import SftFields, resolve_template
from longtune.data.sources import (
    Discovery,
    ReadOptions,
    discover,
    entry_dicts,
    is_remote,
    read_documents,
    resolve,
    split_of,
)
from longtune.data.tokenize import (
    TokenizeConversations,
    TokenizeDocuments,
    load_tokenizer,
    special_tokens,
    tokenizer_name,
    vocab_hash,
)

# Read tasks: enough to keep the tokenizers fed from the start, each some MiB of files.
_MIN_READ_TASKS = 64
_READ_TASK_BYTES = 8 * 2**20
_WARNINGS_SHOWN = 20


@dataclass(frozen=True)
class _Plan:
    """What the graph is built from; resolved on the driver before Ray runs anything."""

    discovery: Discovery
    read: ReadOptions
    pack: PackOptions
    tokenizer_json: str
    eos_id: int
    specials: dict[str, str]
    template: tuple[str, str] | None  # data.format sft: (name, Jinja text)


def read_options(config: Config) -> ReadOptions:
    d = config.data
    return ReadOptions(
        d.text_field, d.min_doc_chars, d.max_doc_chars, d.eval_fraction, format=d.format,
        sft_fields=sft_fields(config),
    )


def sft_fields(config: Config) -> SftFields:
    f = config.data.sft
    return SftFields(f.instruction_field, f.input_field, f.output_field, f.messages_field)


def sft_template(config: Config, tokenizer) -> tuple[str, str]:
    """(name, Jinja text) of the job's SFT template; DataError when it cannot be had."""
    try:
        return resolve_template(tokenizer, config.data.sft.template, config.data.sft.system_prompt)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _plan(config: Config, discovery: Discovery, tokenizer) -> _Plan:
    d = config.data
    return _Plan(
        discovery=discovery,
        read=read_options(config),
        pack=PackOptions(
            context_length=config.context_length,
            position_ids=d.position_ids,
            remainder=d.remainder,
            pad_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            format=d.format,
        ),
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        eos_id=tokenizer.eos_token_id,
        specials=special_tokens(tokenizer),
        template=sft_template(config, tokenizer) if d.format == "sft" else None,
    )


class _TokenizeAndPack(TokenizeDocuments):
    """The actor-pool step: tokenize a batch, then run packing pass 1 on it in the same
    actor, so pass 1 streams along with tokenization instead of queueing behind pass 2."""

    def __init__(self, tokenizer_json: str, eos_id: int, pack: PackOptions):
        super().__init__(tokenizer_json, eos_id)
        self.pack = pack

    def __call__(self, batch):
        return pack_documents(super().__call__(batch), self.pack)


def _blocks(config: Config, plan: _Plan, *, split: str | None, with_stats: bool):
    """The lazy Ray Data graph: all splits with kind/split/stats columns (``with_stats``, for
    the writer), or training-ready blocks of one ``split``."""
    d = config.data
    files = plan.discovery.files
    if split is not None:
        # A text file is one document whose split key is its own: skip the other split's.
        files = [f for f in files if f.kind != "text" or split_of(f.key, d.eval_fraction) == split]
    if not files:
        raise DataError(f"no documents for the {split} split (data.eval_fraction={d.eval_fraction})")
    total_bytes = sum(f.size for f in files)
    n_read = min(len(files), max(_MIN_READ_TASKS, total_bytes // _READ_TASK_BYTES))

    ds = ray.data.from_items(entry_dicts(files), override_num_blocks=n_read)
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        read_documents,
        # Streaming has no manifest: the read tasks log skipped files (train stream only).
        fn_kwargs={"opts": plan.read, "keep_split": split, "log_skips": split == "train"},
        batch_size=None,
        batch_format="pyarrow",
        udf_modifying_row_count=True,
    )
    if d.max_documents is not None:
        ds = ds.limit(d.max_documents)
    if d.format == "sft":
        # conversations -> examples with their targets (actor pool) -> padded blocks; the
        # packing batch is in examples: about pack_batch_tokens of them at the longest
        tokenize, packer = TokenizeConversations, pack_sft
        kwargs = {
            "tokenizer_json": plan.tokenizer_json, "specials": plan.specials,
            "template": plan.template[1], "max_tokens": config.context_length,
            "overlong": d.sft.overlong, "train_on_prompt": d.sft.train_on_prompt,
            "log_skips": not with_stats and split == "train",  # streaming: no manifest lists them
        }
    else:
        tokenize, packer = _TokenizeAndPack, merge_pieces
        kwargs = {"tokenizer_json": plan.tokenizer_json, "eos_id": plan.eos_id, "pack": plan.pack}
    ds = ds.map_batches(
        tokenize,
        fn_constructor_kwargs=kwargs,
        compute=ActorPoolStrategy(size=d.tokenize_concurrency),
        num_cpus=1,
        batch_size=d.tokenize_batch_size,
        batch_format="pyarrow",
        udf_modifying_row_count=True,
    )
    return ds.map_batches(
        packer,
        fn_kwargs={"opts": plan.pack, "with_stats": with_stats},
        batch_size=max(1, d.pack_batch_tokens // plan.pack.context_length),
        batch_format="pyarrow",
        udf_modifying_row_count=True,
    )


# ------------------------------------------------------------------ streaming


def stream_blocks(config: Config, split: str = "train"):
    """A lazy ``ray.data.Dataset`` of one split's blocks, straight from ``data.sources``
    into Ray Train without writing: columns input_ids and position_ids (and loss_mask with
    ``data.remainder: pad``), each ``fixed_size_list<int32>[context_length]``. Skipped files
    are logged by the read tasks; no manifest is kept."""
    from longtune.runtime import init_ray

    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    discovery = discover(config.data.sources, config.data.min_doc_chars)
    plan = _plan(config, discovery, load_tokenizer(config))
    init_ray(config)
    return _blocks(config, plan, split=split, with_stats=False)


@dataclass
class PreparedData:
    """A prepared dataset: its manifest and, per split, a Ray dataset of its blocks."""

    path: str
    manifest: dict[str, Any]

    def files(self, name: str = "train") -> list[str]:
        files = self.manifest["splits"].get(name, {}).get("files", [])
        if not files:
            raise DataError(f"{self.path} has no {name} blocks")
        return files

    def split(self, name: str = "train"):
        root = self.path.rstrip("/")
        ds = ray.data.read_parquet([f"{root}/{f}" for f in self.files(name)])
        ds.context.execution_options.preserve_order = True
        return ds

    def worker_split(self, name: str = "train"):
        """The split as the workers read it themselves (longtune/data/shards.py)."""
        from longtune.data.shards import open_split

        return open_split(self.path, self.files(name))


def load_prepared(
    path: str,
    expect_tokenizer_hash: str | None = None,
    expect_context_length: int | None = None,
) -> PreparedData:
    """Open a dataset written by `longtune prepare`; raises DataError if it has no manifest
    (unfinished) or was prepared for another tokenizer or context length."""
    fs, root = resolve(path)
    manifest = read_manifest(fs, root, path)
    check_manifest(manifest, path, expect_tokenizer_hash, expect_context_length)
    return PreparedData(path=path if is_remote(path) else root, manifest=manifest)


def open_blocks(config: Config, split: str = "train"):
    """Training's one call for data: the prepared dataset in ``data.prepared_path``
    (checked against this job's tokenizer and context length) -- with
    ``data.prepared_reader: workers`` a ``PreparedSplit`` the workers read themselves, else a
    Ray dataset of it -- or, without one, ``stream_blocks``."""
    if config.data.prepared_path:
        tokenizer = load_tokenizer(config)
        prepared = load_prepared(
            config.data.prepared_path,
            expect_tokenizer_hash=vocab_hash(tokenizer),
            expect_context_length=config.context_length,
        )
        if config.data.prepared_reader == "workers":
            return prepared.worker_split(split)
        return prepared.split(split)
    return stream_blocks(config, split)


# ------------------------------------------------------------------ writing


class PreparedSink(Datasink):
    """Writes block rows as parquet, one file per split per write task, and returns the
    counts carried by the stats rows (gathered on the driver in ``results``)."""

    def __init__(self, root: str, run_id: str, masked: bool, context_length: int):
        self.root, self.run_id = root, run_id
        self.masked, self.context_length = masked, context_length
        self.results: list[dict[str, Any]] = []

    def write(self, blocks, ctx) -> dict[str, Any]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        from ray.data.block import BlockAccessor

        fs, root = resolve(self.root)
        columns = ["input_ids", "position_ids"] + (["loss_mask"] if self.masked else [])
        writers: dict[str, Any] = {}
        counts: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        try:
            for block in blocks:
                table = BlockAccessor.for_block(block).to_arrow()
                kind = table.column("kind")
                for text in table.filter(pc.equal(kind, STATS)).column("stats").to_pylist():
                    merge_counts(stats, json.loads(text))
                rows = table.filter(pc.equal(kind, BLOCK))
                for split in sorted(set(rows.column("split").to_pylist())):
                    part = rows.filter(pc.equal(rows.column("split"), split)).select(columns)
                    if split not in writers:
                        fs.create_dir(f"{root}/{split}", recursive=True)
                        name = f"{split}/part-{self.run_id}-{ctx.task_idx:05d}.parquet"
                        stream = fs.open_output_stream(f"{root}/{name}")
                        writers[split] = (name, stream, pq.ParquetWriter(stream, part.schema))
                    writers[split][2].write_table(part)
                    real = (
                        pc.sum(part.column("loss_mask").combine_chunks().flatten()).as_py()
                        if self.masked
                        else part.num_rows * self.context_length
                    )
                    merge_counts(counts, {"blocks": {split: part.num_rows}, "real_tokens": {split: real}})
        finally:
            for _, stream, writer in writers.values():
                writer.close()
                stream.close()
        return {
            "stats": stats,
            "counts": counts,
            "files": {split: name for split, (name, _, _) in writers.items()},
        }

    def on_write_complete(self, write_result) -> None:
        self.results = list(write_result.write_returns)


def default_output(config: Config) -> str:
    """outputs/prepared/<tokenizer>-<context_length>, where data.prepared_path is unset."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", tokenizer_name(config)).strip("-")
    return str(outputs_path("prepared", f"{slug}-{config.context_length}"))


_OURS = re.compile(r"(manifest\.json|(train|eval)(/part-[0-9a-f]+-\d+\.parquet)?)")


def _refuse_foreign_output(out: str) -> None:
    """Only a prepared dataset (or the parts of an unfinished one) may be replaced."""
    from pyarrow.fs import FileSelector, FileType

    fs, root = resolve(out)
    root = root.rstrip("/")
    info = fs.get_file_info(root)
    if info.type == FileType.File:
        raise DataError(f"output {out!r} is a file, not a directory")
    if info.type == FileType.NotFound:
        return
    for entry in fs.get_file_info(FileSelector(root, recursive=True)):
        rel = entry.path[len(root) :].lstrip("/")
        if not _OURS.fullmatch(rel):
            raise DataError(
                f"output {out!r} exists and is not a prepared dataset (it holds {rel!r}); "
                "not overwriting it"
            )


def prepare(config: Config, *, console=None) -> dict[str, Any]:
    """Tokenize and pack ``data.sources`` into ``data.prepared_path`` (parquet + manifest).
    Returns the manifest. Raises DataError for problems with the input or output."""
    from rich.console import Console

    from longtune.runtime import init_ray
    from longtune.storage import check_stores, job_stores

    console = console or Console()
    check_stores(job_stores(config, "prepare"))  # a bad bucket, endpoint or credentials: one line now
    out = config.data.prepared_path or default_output(config)
    _refuse_foreign_output(out)
    # Input problems surface here, before a tokenizer download or Ray start.
    discovery = discover(config.data.sources, config.data.min_doc_chars)
    if not discovery.files:
        raise DataError(
            f"nothing to read: all {discovery.too_small:,} files of {config.data.sources} "
            f"are shorter than data.min_doc_chars={config.data.min_doc_chars:,}"
        )
    tokenizer = load_tokenizer(config)
    plan = _plan(config, discovery, tokenizer)
    init_ray(config)

    run_id = uuid.uuid4().hex[:12]
    remote = is_remote(out)
    fs, out_root = resolve(out)
    if remote:
        staging = out.rstrip("/")
        # A stale manifest would make a half-written prefix look complete.
        if _exists(fs, f"{out_root}/{MANIFEST_NAME}"):
            fs.delete_file(f"{out_root}/{MANIFEST_NAME}")
    else:
        staging = f"{out_root}.tmp-{run_id}"
        Path(staging).mkdir(parents=True)
    console.print(
        f"longtune prepare: {len(plan.discovery.files):,} files from {config.data.sources} -> "
        f"{out} (context {config.context_length:,}, tokenizer {tokenizer_name(config)})"
    )
    try:
        sink = PreparedSink(staging, run_id, plan.pack.masked, config.context_length)
        start = time.perf_counter()
        _blocks(config, plan, split=None, with_stats=True).write_datasink(sink)
        elapsed = time.perf_counter() - start
        manifest = _manifest(config, tokenizer, plan, sink.results, elapsed, out)
        _check_not_empty(config, manifest)
        _, staging_root = resolve(staging)
        write_manifest(fs, staging_root, manifest)
    except BaseException:
        if not remote:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if not remote:
        swap_into_place(staging, out_root)  # an older prepared dataset there goes
    else:
        _remove_stale(fs, out_root, manifest)
    _report(manifest, console)
    return manifest


def _exists(fs, path: str) -> bool:
    from pyarrow.fs import FileType

    return fs.get_file_info(path).type != FileType.NotFound


def _remove_stale(fs, root: str, manifest: dict[str, Any]) -> None:
    """Object stores: drop data files of earlier runs that the new manifest does not list."""
    from pyarrow.fs import FileSelector

    keep = {f for s in manifest["splits"].values() for f in s["files"]}
    for split in SPLITS:
        for info in fs.get_file_info(FileSelector(f"{root}/{split}", allow_not_found=True)):
            if f"{split}/{info.base_name}" not in keep:
                fs.delete_file(info.path)


def _manifest(config, tokenizer, plan: _Plan, results, elapsed: float, out: str) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    files: dict[str, list[str]] = {split: [] for split in SPLITS}
    for result in results:
        merge_counts(stats, result["stats"])
        merge_counts(counts, result["counts"])
        for split, name in result["files"].items():
            files[split].append(name)
    tokenized = per_split(stats.get("tokens"))
    in_blocks = per_split(counts.get("real_tokens"))
    dropped = per_split(stats.get("dropped_tokens"))
    sft = config.data.format == "sft"
    if sft:  # the sink's masked count is the targets; every other non-padding token is a prompt's
        targets = in_blocks
        padding = per_split(stats.get("pad_tokens"))
        n_blocks = per_split(counts.get("blocks"))
        in_blocks = {s: n_blocks[s] * config.context_length - padding[s] for s in SPLITS}
    for split in SPLITS:
        # Every tokenized token is in exactly one block or in the counted remainder.
        if tokenized[split] != in_blocks[split] + dropped[split]:
            raise RuntimeError(
                f"longtune bug: {split} split lost tokens in packing ({tokenized[split]} "
                f"tokenized, {in_blocks[split]} in blocks, {dropped[split]} dropped)"
            )
    skipped = [{"source": s, "reason": r} for s, r in stats.get("skipped", [])]
    total_tokens = sum(tokenized.values())
    manifest = {
        "format": FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output": out,
        "tokenizer": {
            "name": tokenizer_name(config),
            "vocab_hash": vocab_hash(tokenizer),
            "vocab_size": len(tokenizer.get_vocab()),
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": plan.pack.pad_id,
        },
        "context_length": config.context_length,
        "position_ids": config.data.position_ids,
        "remainder": config.data.remainder,
        "sources": list(config.data.sources),
        "files": {"found": len(plan.discovery.files), "too_small": plan.discovery.too_small},
        "documents": {
            "kept": per_split(stats.get("documents")),
            "too_short": int(stats.get("short", 0)) + plan.discovery.too_small,
            "too_long": int(stats.get("long", 0)),
            "unreadable": int(stats.get("errors", 0)),
        },
        "tokens": {
            "tokenized": tokenized,
            "in_blocks": in_blocks,
            "dropped": dropped,
            "padding": per_split(stats.get("pad_tokens")),
        },
        "blocks": per_split(counts.get("blocks")),
        "splits": {split: {"files": sorted(files[split])} for split in SPLITS},
        "skipped": skipped[:MAX_LISTED_SKIPS],
        "skipped_not_listed": max(0, len(skipped) - MAX_LISTED_SKIPS),
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(total_tokens / elapsed, 1) if elapsed > 0 else 0.0,
        "data_config": config.data.model_dump(mode="json"),
    }
    manifest["data_format"] = config.data.format
    if sft:
        manifest["sft"] = {
            "template": plan.template[0],
            "chat_template": plan.template[1],
            "train_on_prompt": config.data.sft.train_on_prompt,
            "overlong": config.data.sft.overlong,
            "examples": {
                "kept": per_split(stats.get("documents")),
                "truncated": int(stats.get("truncated", 0)),
                "truncated_tokens": int(stats.get("truncated_tokens", 0)),
                "dropped_too_long": int(stats.get("long", 0)),
                "invalid": int(stats.get("errors", 0)),
            },
            "target_tokens": targets,
            "packing_efficiency": {
                s: round(in_blocks[s] / (n_blocks[s] * config.context_length), 4) if n_blocks[s] else 0.0
                for s in SPLITS
            },
        }
    return manifest


def _check_not_empty(config: Config, manifest: dict[str, Any]) -> None:
    docs, tokens = manifest["documents"], manifest["tokens"]
    where = ", ".join(config.data.sources)
    if "sft" in manifest and not manifest["sft"]["examples"]["kept"]["train"]:
        ex = manifest["sft"]["examples"]
        first = f"; the first: {manifest['skipped'][0]['reason']}" if manifest["skipped"] else ""
        raise DataError(
            f"no training examples left in {where}: {ex['invalid']:,} records invalid or unreadable, "
            f"{ex['dropped_too_long']:,} longer than a block of {config.context_length:,} tokens "
            f"(each is listed in {MANIFEST_NAME}){first}"
        )
    if not any(docs["kept"].values()):
        raise DataError(
            f"nothing left after filtering {where}: {docs['too_short']:,} documents shorter than "
            f"data.min_doc_chars={config.data.min_doc_chars:,}, {docs['too_long']:,} longer than "
            f"data.max_doc_chars={config.data.max_doc_chars:,}, {docs['unreadable']:,} unreadable"
        )
    if manifest["blocks"]["train"] == 0:
        raise DataError(
            f"{where} gives {tokens['tokenized']['train']:,} training tokens, less than one block "
            f"of context_length={config.context_length:,}; add documents, shorten the context "
            "or set data.remainder=pad"
        )


def _report(manifest: dict[str, Any], console) -> None:
    skipped = manifest["skipped"]
    for item in skipped[:_WARNINGS_SHOWN]:
        console.print(f"[yellow]warning[/yellow]: skipped {item['source']}: {item['reason']}", highlight=False)
    more = len(skipped) - _WARNINGS_SHOWN + manifest["skipped_not_listed"]
    if more > 0:
        console.print(f"[yellow]warning[/yellow]: {more:,} more skipped (see {MANIFEST_NAME})")
    console.print(summary_table(manifest))


def prepare_command(config: Config) -> int:
    """`longtune prepare` (a DataError reaches the command line: one line, exit code 1)."""
    prepare(config)
    return 0
