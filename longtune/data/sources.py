"""Finding and reading documents: local paths, globs and s3:// / gs:// URIs of text files,
.jsonl/.json records and .parquet columns.

Two halves. ``discover`` runs on the driver: it lists the files each source names, in one
sorted order, and raises ``DataError`` for a source that is missing or holds nothing
readable (a typo must not cost a day of compute). ``read_documents`` runs in Ray tasks: it
turns files into one row per record and never raises for a bad file or record; it emits a
row of kind ``error`` (or ``short``/``long``) naming the file and the reason instead, which
the packer counts and the manifest lists.

Each document is assigned to the train or eval split by a hash of its key (its path below
the source root, plus the record's line or index), so the split is stable across runs,
machines and batch orders.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from longtune.config import STDLIB_CORPUS
from longtune.data.errors import DataError
from longtune.data.pack import DOC, ERROR, LONG, SHORT
from longtune.data.sft import RecordError, SftFields, record_messages
from longtune.data.stdlib_qa import STDLIB_QA
from longtune.storage import REMOTE as _REMOTE
from longtune.storage import is_remote  # noqa: F401 (part of this module's interface: pipeline.py)

# stdlib-qa excerpts: a median 780 seed-tokenizer tokens with the question and template (90% under
# 1,024), so most prompts fit the embedded default's 1024-token context and none the seed's 256
QA_CONTEXT_CHARS = 2400

# Files in a directory are read when their suffix says text; an explicitly named file is
# read as text whatever its suffix.
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .tex .org .adoc .html .htm .xml .py .pyi .pyx .c .h .cc "
    ".cpp .cxx .hpp .hh .cu .cuh .java .kt .scala .go .rs .rb .php .js .jsx .mjs .ts .tsx "
    ".swift .m .mm .cs .fs .hs .ml .lua .pl .r .jl .sh .bash .zsh .sql .yaml .yml .toml .ini "
    ".cfg .css .scss .vue .el .clj .ex .exs .erl .dart .zig .nim .f90 .asm .s .cmake .proto "
    ".ipynb".split()
)
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
COMPRESSION_SUFFIXES = frozenset({".gz", ".bz2", ".zst", ".lz4"})
_GLOB_CHARS = re.compile(r"[*?\[]")
# Skip reasons listed per record stop after this many per file; the rest are one row.
_ERRORS_LISTED_PER_FILE = 3
_SFT_ERRORS_LISTED_PER_FILE = 1000  # the manifest's own limit (MAX_LISTED_SKIPS)
# A read task hands on its rows in chunks of about this many characters.
_CHUNK_CHARS = 16 * 2**20

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileEntry:
    uri: str  # local absolute path or scheme://bucket/key
    kind: str  # text | jsonl | json | parquet
    size: int  # bytes on storage (compressed size for compressed files)
    key: str  # path below its source root: the stable part of a document's split key
    compressed: bool


@dataclass
class Discovery:
    files: list[FileEntry]
    too_small: int  # text files shorter in bytes than min_doc_chars: never read


# ------------------------------------------------------------------ filesystems


def resolve(uri: str):
    """``(pyarrow filesystem, path on it)`` for a local path or an s3://, gs://, hdfs:// URI."""
    import pyarrow.fs as pafs

    if _REMOTE.match(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise DataError(f"cannot open {uri!r}: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _scheme(uri: str) -> str:
    m = _REMOTE.match(uri)
    return m.group(0) if m else ""


# ------------------------------------------------------------------ discovery


def _kind_of(name: str, *, named: bool) -> tuple[str | None, bool]:
    suffixes = [s.lower() for s in PurePosixPath(name).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in COMPRESSION_SUFFIXES
    if compressed:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".parquet" and not compressed:
        return "parquet", False
    if last in JSONL_SUFFIXES:
        return "jsonl", compressed
    if last == ".json":
        return "json", compressed
    if last in TEXT_SUFFIXES or named:
        return "text", compressed
    return None, compressed


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "__pycache__")) for part in rel.split("/"))


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A '/'-separated glob as a regex: ``*`` and ``?`` stay within a path component,
    ``**/`` spans any number of directories, ``[...]`` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _list_tree(fs, root: str) -> list:
    from pyarrow.fs import FileSelector, FileType

    infos = fs.get_file_info(FileSelector(root, recursive=True))
    return [i for i in infos if i.type == FileType.File]


def _entries_under(fs, scheme: str, root: str, infos, min_doc_chars: int, stats: dict) -> list[FileEntry]:
    entries = []
    for info in infos:
        rel = info.path[len(root) :].lstrip("/")
        if _hidden(rel):
            continue
        kind, compressed = _kind_of(info.base_name, named=False)
        if kind is None:
            continue
        if kind == "text" and not compressed and info.size < min_doc_chars:
            stats["too_small"] += 1  # UTF-8 has at least one byte per character
            continue
        entries.append(FileEntry(scheme + info.path, kind, info.size, rel, compressed))
    return entries


def stdlib_qa_path() -> Path:
    """Where the ``stdlib-qa`` records are cached: under $LONGTUNE_CACHE (else
    ~/.cache/longtune), one file per Python version (the records follow its stdlib)."""
    import sys

    from longtune.seed import cache_root

    version = f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
    return cache_root() / "stdlib-qa" / f"{version}-{QA_CONTEXT_CHARS}.jsonl"


def _stdlib_qa_entry() -> FileEntry:
    """The ``stdlib-qa`` source: the synthetic long-context Q&A records of
    longtune.data.stdlib_qa, generated (a few seconds) and cached on first use. The cache
    is on this machine: on a cluster of several nodes, use a copy on shared storage."""
    from longtune.data.stdlib_qa import write_qa_jsonl

    path = stdlib_qa_path()
    if not path.is_file():
        write_qa_jsonl(path, QA_CONTEXT_CHARS)  # atomic: concurrent builders write the same file
    return FileEntry(str(path), "jsonl", path.stat().st_size, STDLIB_QA, False)


def _stdlib_entries(min_doc_chars: int, stats: dict) -> list[FileEntry]:
    from longtune.data.stdlib import stdlib_files, stdlib_root

    root = stdlib_root()
    entries = []
    for path in stdlib_files(root):
        size = path.stat().st_size
        if size < min_doc_chars:
            stats["too_small"] += 1
            continue
        entries.append(FileEntry(str(path), "text", size, path.relative_to(root).as_posix(), False))
    return entries


def discover(sources: list[str], min_doc_chars: int) -> Discovery:
    """The files named by ``sources`` (paths, globs, URIs or ``stdlib``), sorted within each
    source, sources in the order given. Raises DataError for a missing or empty source."""
    stats = {"too_small": 0}
    files: list[FileEntry] = []
    seen: set[str] = set()
    for source in sources:
        before_small = stats["too_small"]
        try:
            found = _discover_one(source, min_doc_chars, stats)
        except OSError as exc:  # permission denied, no credentials, ...
            raise DataError(f"cannot list source {source!r}: {exc}") from None
        if not found and stats["too_small"] == before_small:
            raise DataError(
                f"source {source!r} holds no documents: no text, source-code, .jsonl, .json or "
                ".parquet files"
            )
        # A file named by two sources is read once, where it first appears.
        for entry in sorted(found, key=lambda e: e.key):
            if entry.uri not in seen:
                seen.add(entry.uri)
                files.append(entry)
    return Discovery(files=files, too_small=stats["too_small"])


def _discover_one(source: str, min_doc_chars: int, stats: dict) -> list[FileEntry]:
    from pyarrow.fs import FileType

    if source == STDLIB_CORPUS:
        return _stdlib_entries(min_doc_chars, stats)
    if source == STDLIB_QA:
        return [_stdlib_qa_entry()]
    scheme = _scheme(source)
    if _GLOB_CHARS.search(source):
        return _glob_entries(source, scheme, min_doc_chars, stats)
    fs, path = resolve(source)
    info = fs.get_file_info(path)
    if info.type == FileType.NotFound:
        raise DataError(f"source {source!r} does not exist")
    if info.type == FileType.Directory:
        return _entries_under(fs, scheme, path, _list_tree(fs, path), min_doc_chars, stats)
    kind, compressed = _kind_of(info.base_name, named=True)
    return [FileEntry(scheme + path, kind, info.size, info.base_name, compressed)]


def _glob_entries(source: str, scheme: str, min_doc_chars: int, stats: dict) -> list[FileEntry]:
    from pyarrow.fs import FileType

    first = _GLOB_CHARS.search(source).start()
    prefix = source[: source.rfind("/", 0, first) + 1]  # the directory part without globs
    base = prefix or "."
    fs, root = resolve(base)
    root = root.rstrip("/")
    pattern = glob_regex(source[len(prefix) :])
    if fs.get_file_info(root).type != FileType.Directory:
        raise DataError(f"source {source!r}: directory {base!r} does not exist")
    infos = []
    for info in _list_tree(fs, root):
        rel = info.path[len(root) :].lstrip("/")
        parts = rel.split("/")
        # A pattern that names a directory takes the files below it.
        if any(pattern.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            infos.append(info)
    if not infos:
        raise DataError(f"source {source!r} matched no files")
    return _entries_under(fs, scheme, root, infos, min_doc_chars, stats)


# ------------------------------------------------------------------ reading (in Ray tasks)


def split_of(key: str, eval_fraction: float) -> str:
    """'eval' for a stable ``eval_fraction`` of keys, else 'train' (sha256, not hash())."""
    if eval_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


@dataclass(frozen=True)
class ReadOptions:
    text_field: str
    min_doc_chars: int
    max_doc_chars: int
    eval_fraction: float
    # data.format sft: a record becomes a conversation, a document row whose text is the
    # conversation's messages as JSON (longtune.data.sft); min_doc_chars does not apply
    format: str = "text"
    sft_fields: SftFields = SftFields()


def _record(kind: str, source: str, key: str, opts: ReadOptions, *, text: str = "",
            reason: str = "", count: int = 1) -> dict[str, Any]:
    return {
        "kind": kind,
        "source": source,
        "split": split_of(key, opts.eval_fraction) if kind == DOC else "",
        "reason": reason,
        "count": count,
        "text": text,
    }


def _judge(text: str, source: str, key: str, opts: ReadOptions) -> dict[str, Any]:
    n = len(text)
    if n < opts.min_doc_chars:
        return _record(SHORT, source, key, opts)
    if n > opts.max_doc_chars:
        return _record(
            LONG, source, key, opts,
            reason=f"document has {n:,} characters, more than data.max_doc_chars={opts.max_doc_chars:,}",
        )
    return _record(DOC, source, key, opts, text=text)


def _decode(data: bytes) -> str:
    text = data.decode("utf-8")  # strict: raises UnicodeDecodeError
    if "\x00" in text:
        raise ValueError("contains NUL bytes (a binary file?)")
    return text.removeprefix("\ufeff")


def _bad_utf8(exc: UnicodeDecodeError) -> str:
    byte = exc.object[exc.start : exc.start + 1].hex()
    return f"not valid UTF-8 (byte 0x{byte} at offset {exc.start})"


def _open(entry: FileEntry):
    fs, path = resolve(entry.uri)
    return fs.open_input_stream(path, compression="detect" if entry.compressed else None)


def _read_text(entry: FileEntry, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    if opts.format == "sft":
        yield _record(
            ERROR, entry.uri, entry.key, opts,
            reason="a text file, not SFT records (data.format=sft reads .jsonl, .json or .parquet)",
        )
        return
    if not entry.compressed and entry.size > 4 * opts.max_doc_chars:
        # Even at 4 bytes a character it is too long; do not load it.
        yield _record(
            LONG, entry.uri, entry.key, opts,
            reason=f"file has {entry.size:,} bytes, more than data.max_doc_chars="
            f"{opts.max_doc_chars:,} characters",
        )
        return
    with _open(entry) as stream:
        data = stream.read()
    try:
        text = _decode(data)
    except UnicodeDecodeError as exc:
        yield _record(ERROR, entry.uri, entry.key, opts, reason=_bad_utf8(exc))
        return
    except ValueError as exc:
        yield _record(ERROR, entry.uri, entry.key, opts, reason=str(exc))
        return
    yield _judge(text, entry.uri, entry.key, opts)


class _RecordErrors:
    """Lists the first few bad records of a file one by one, then counts the rest."""

    def __init__(self, entry: FileEntry, opts: ReadOptions):
        self.entry, self.opts = entry, opts
        self.seen, self.more, self.first_more = 0, 0, ""
        # an SFT record's fault is its own (a dataset's few bad records, each worth naming);
        # a text file's bad records are usually all alike
        self.listed = _SFT_ERRORS_LISTED_PER_FILE if opts.format == "sft" else _ERRORS_LISTED_PER_FILE

    def add(self, where: str, reason: str) -> Iterator[dict[str, Any]]:
        self.seen += 1
        if self.seen <= self.listed:
            yield _record(ERROR, f"{self.entry.uri}:{where}", self.entry.key, self.opts, reason=reason)
        else:
            self.more += 1
            self.first_more = self.first_more or where

    def flush(self) -> Iterator[dict[str, Any]]:
        if self.more:
            yield _record(
                ERROR, self.entry.uri, self.entry.key, self.opts, count=self.more,
                reason=f"{self.more:,} more bad records from {self.first_more} on (like the ones above)",
            )


def _conversation_from(value: Any, where: str, entry: FileEntry, opts: ReadOptions,
                       errors: _RecordErrors) -> Iterator[dict[str, Any]]:
    try:
        messages = record_messages(value, opts.sft_fields)
    except RecordError as exc:
        yield from errors.add(where, exc.reason)
        return
    chars = sum(len(m["content"]) for m in messages)
    source, key = f"{entry.uri}:{where}", f"{entry.key}:{where}"
    if chars > opts.max_doc_chars:
        yield _record(
            LONG, source, key, opts,
            reason=f"record has {chars:,} characters, more than data.max_doc_chars={opts.max_doc_chars:,}",
        )
    else:
        yield _record(DOC, source, key, opts, text=json.dumps(messages, ensure_ascii=False))


def _document_from(value: Any, where: str, entry: FileEntry, opts: ReadOptions,
                   errors: _RecordErrors) -> Iterator[dict[str, Any]]:
    if opts.format == "sft":
        yield from _conversation_from(value, where, entry, opts, errors)
        return
    field = opts.text_field
    key = f"{entry.key}:{where}"
    if isinstance(value, str):
        yield _judge(value, f"{entry.uri}:{where}", key, opts)
    elif not isinstance(value, dict):
        yield from errors.add(where, f"a JSON {type(value).__name__}, not an object with a {field!r} field")
    elif field not in value:
        fields = ", ".join(list(value)[:8])
        yield from errors.add(where, f"no field {field!r} (data.text_field); fields: {fields}")
    elif not isinstance(value[field], str):
        yield from errors.add(where, f"field {field!r} is {type(value[field]).__name__}, not a string")
    else:
        yield _judge(value[field], f"{entry.uri}:{where}", key, opts)


def _read_jsonl(entry: FileEntry, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    errors = _RecordErrors(entry, opts)
    with _open(entry) as stream:
        for lineno, raw in enumerate(io.BufferedReader(stream, 1 << 20), start=1):
            where = f"line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield from errors.add(where, _bad_utf8(exc))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                yield from errors.add(where, f"not valid JSON ({exc.msg})")
                continue
            yield from _document_from(value, where, entry, opts, errors)
    yield from errors.flush()


def _read_json(entry: FileEntry, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    with _open(entry) as stream:
        data = stream.read()
    try:
        value = json.loads(_decode(data))
    except UnicodeDecodeError as exc:
        yield _record(ERROR, entry.uri, entry.key, opts, reason=_bad_utf8(exc))
        return
    except ValueError as exc:  # JSONDecodeError is a ValueError
        yield _record(ERROR, entry.uri, entry.key, opts, reason=f"not valid JSON ({exc})")
        return
    errors = _RecordErrors(entry, opts)
    records = value if isinstance(value, list) else [value]
    for index, record in enumerate(records):
        yield from _document_from(record, f"record {index}", entry, opts, errors)
    yield from errors.flush()


def _read_parquet(entry: FileEntry, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    fs, path = resolve(entry.uri)
    field = opts.text_field
    index = 0
    try:
        pfile = pq.ParquetFile(fs.open_input_file(path))
        schema = pfile.schema_arrow
        if opts.format == "sft":
            yield from _parquet_conversations(pfile, entry, opts)
            return
        if field not in schema.names:
            columns = ", ".join(schema.names[:8])
            yield _record(
                ERROR, entry.uri, entry.key, opts,
                reason=f"no column {field!r} (data.text_field); columns: {columns}",
            )
            return
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            yield _record(
                ERROR, entry.uri, entry.key, opts,
                reason=f"column {field!r} is {schema.field(field).type}, not a string column",
            )
            return
        errors = _RecordErrors(entry, opts)
        for batch in pfile.iter_batches(batch_size=256, columns=[field]):
            for text in batch.column(0).to_pylist():
                where = f"row {index}"
                if text is None:
                    yield from errors.add(where, f"column {field!r} is null")
                else:
                    yield _judge(text, f"{entry.uri}:{where}", f"{entry.key}:{where}", opts)
                index += 1
        yield from errors.flush()
    except (OSError, pa.ArrowException) as exc:
        after = f" after {index:,} rows" if index else ""
        yield _record(ERROR, entry.uri, entry.key, opts, reason=f"unreadable parquet{after}: {exc}")


def _parquet_conversations(pfile, entry: FileEntry, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    """SFT records from a parquet file (a Hugging Face dataset saved with ``to_parquet``):
    the instruction/input/output or messages columns, one record per row."""
    f = opts.sft_fields
    names = pfile.schema_arrow.names
    columns = [c for c in (f.messages, f.instruction, f.input, f.output) if c in names]
    if f.messages not in names and f.instruction not in names:
        yield _record(
            ERROR, entry.uri, entry.key, opts,
            reason=f"neither column {f.messages!r} nor {f.instruction!r} (data.sft fields); "
            f"columns: {', '.join(names[:8])}",
        )
        return
    errors = _RecordErrors(entry, opts)
    index = 0
    for batch in pfile.iter_batches(batch_size=256, columns=columns):
        for record in batch.to_pylist():
            yield from _conversation_from(record, f"row {index}", entry, opts, errors)
            index += 1
    yield from errors.flush()


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}

RECORD_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),
        ("count", pa.int64()),
        ("text", pa.large_string()),
    ]
)


def read_file(entry: FileEntry, opts: ReadOptions) -> Iterator[dict[str, Any]]:
    """One row per record of ``entry``; a file that cannot be read at all is one error row."""
    try:
        yield from _READERS[entry.kind](entry, opts)
    except (OSError, pa.ArrowException) as exc:
        yield _record(ERROR, entry.uri, entry.key, opts, reason=f"unreadable: {exc}")


def read_documents(
    batch: pa.Table, opts: ReadOptions, keep_split: str | None = None, log_skips: bool = False
) -> Iterator[pa.Table]:
    """Ray ``map_batches`` UDF: a batch of file entries -> tables of records (RECORD_SCHEMA).
    ``keep_split`` drops the other split's documents; ``log_skips`` logs each unreadable or
    too-long record (for streaming, which keeps no manifest)."""
    rows: list[dict[str, Any]] = []
    chars = 0
    for item in batch.to_pylist():
        for row in read_file(FileEntry(**item), opts):
            if keep_split is not None and row["kind"] == DOC and row["split"] != keep_split:
                continue
            if log_skips and row["kind"] in (LONG, ERROR):
                logger.warning("longtune data: skipped %s: %s", row["source"], row["reason"])
            rows.append(row)
            chars += len(row["text"])
            if chars >= _CHUNK_CHARS:
                yield pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)
                rows, chars = [], 0
    if rows:
        yield pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def entry_dicts(files: list[FileEntry]) -> list[dict[str, Any]]:
    return [asdict(f) for f in files]
