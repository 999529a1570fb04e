"""The manifest of a prepared dataset: what it was made from and with, and what it holds.

A prepared dataset is a directory (or object-store prefix) with ``train/`` and ``eval/``
parquet files and a ``manifest.json``. The manifest is written last and lists the data
files, so a directory without one is unfinished, and files it does not list are ignored.
Training reads the tokenizer hash and context length from it and refuses a mismatch.
"""

from __future__ import annotations

import json
from typing import Any

from longtune.data.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT = "longtune-prepared/1"
SPLITS = ("train", "eval")
# Skip reasons listed in the manifest; beyond this only the counts grow.
MAX_LISTED_SKIPS = 1000


def merge_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Add ``part`` into ``total``: numbers add, lists concatenate, dicts merge recursively."""
    for key, value in part.items():
        if isinstance(value, dict):
            merge_counts(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            total.setdefault(key, []).extend(value)
        else:
            total[key] = total.get(key, 0) + value
    return total


def per_split(counts: dict[str, int] | None) -> dict[str, int]:
    counts = counts or {}
    return {split: int(counts.get(split, 0)) for split in SPLITS}


def read_manifest(fs, root: str, where: str) -> dict[str, Any]:
    """The manifest under ``root`` on ``fs``; DataError naming ``where`` if there is none."""
    from pyarrow.fs import FileType

    path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
    if fs.get_file_info(path).type != FileType.File:
        raise DataError(
            f"{where} has no {MANIFEST_NAME}: it is not a prepared dataset, or its preparation "
            "did not finish (run `longtune prepare` again)"
        )
    with fs.open_input_stream(path) as stream:
        try:
            manifest = json.loads(stream.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{where}/{MANIFEST_NAME} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{where}/{MANIFEST_NAME} has format {found!r}; this longtune reads {FORMAT!r}")
    return manifest


def write_manifest(fs, root: str, manifest: dict[str, Any]) -> None:
    with fs.open_output_stream(f"{root.rstrip('/')}/{MANIFEST_NAME}") as stream:
        stream.write((json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def check_manifest(
    manifest: dict[str, Any],
    where: str,
    expect_tokenizer_hash: str | None,
    expect_context_length: int | None,
) -> None:
    """Refuse a dataset prepared for another tokenizer or block length."""
    tok = manifest["tokenizer"]
    if expect_tokenizer_hash is not None and tok["vocab_hash"] != expect_tokenizer_hash:
        raise DataError(
            f"{where} was prepared with tokenizer {tok['name']!r} (vocabulary {tok['vocab_hash'][:19]}), "
            f"not the one this job uses (vocabulary {expect_tokenizer_hash[:19]}); prepare it "
            "again with this job's tokenizer"
        )
    if expect_context_length is not None and manifest["context_length"] != expect_context_length:
        raise DataError(
            f"{where} holds blocks of {manifest['context_length']} tokens, but this job's "
            f"context length is {expect_context_length}; prepare it again with "
            f"--context-length {expect_context_length}"
        )


def summary_table(manifest: dict[str, Any]):
    """A rich table of what `longtune prepare` did."""
    from rich.table import Table

    docs, tokens, blocks = manifest["documents"], manifest["tokens"], manifest["blocks"]
    table = Table(title=f"longtune prepare: {manifest['output']}", show_header=True)
    table.add_column("")
    table.add_column("train", justify="right")
    table.add_column("eval", justify="right")

    def row(name: str, counts: dict[str, int]) -> None:
        table.add_row(name, f"{counts['train']:,}", f"{counts['eval']:,}")

    sft = manifest.get("sft")
    if sft:
        row("examples", docs["kept"])
        row("tokens", tokens["tokenized"])
        row("target tokens (responses)", sft["target_tokens"])
        row(f"blocks of {manifest['context_length']:,} tokens", blocks)
        row("padding tokens (masked)", tokens["padding"])
        eff = sft["packing_efficiency"]
        table.add_row("packing efficiency", f"{eff['train']:.1%}", f"{eff['eval']:.1%}")
        table.add_section()
        ex = sft["examples"]
        skipped = (
            f"{ex['invalid']:,} invalid, {ex['dropped_too_long']:,} too long; "
            f"{ex['truncated']:,} truncated ({ex['truncated_tokens']:,} prompt tokens cut)"
        )
        table.add_row("template", sft["template"], "")
    else:
        row("documents", docs["kept"])
        row("tokens (with EOS)", tokens["tokenized"])
        row(f"blocks of {manifest['context_length']:,} tokens", blocks)
        row("tokens dropped (remainder)", tokens["dropped"])
        if manifest["remainder"] == "pad":
            row("padding tokens (masked)", tokens["padding"])
        table.add_section()
        skipped = (
            f"{docs['too_short']:,} too short, {docs['too_long']:,} too long, "
            f"{docs['unreadable']:,} unreadable"
        )
    table.add_row("skipped", skipped, "")
    files = manifest["files"]
    table.add_row(
        "files", f"{files['found']:,} to read, {files['too_small']:,} too small to read", ""
    )
    table.add_row(
        "speed",
        f"{manifest['tokens_per_s']:,.0f} tokens/s",
        f"{manifest['elapsed_s']:.1f} s",
    )
    table.add_row("tokenizer", manifest["tokenizer"]["name"], manifest["tokenizer"]["vocab_hash"][:15])
    return table
