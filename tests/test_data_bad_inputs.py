"""Bad input: each problem gets a clear message naming the file, is counted in the manifest
(or stops the job before it starts), and never leaves an output that looks complete."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from longtune.config import from_dict
from longtune.cli import run_job
from longtune.data import DataError, prepare
from longtune.data.manifest import MANIFEST_NAME

L = 32


def config(tmp_path: Path, tokenizer: str, sources: list[str], **data):
    return from_dict(
        {
            "data": {
                "sources": sources,
                "tokenizer": tokenizer,
                "context_length": L,
                "prepared_path": str(tmp_path / "out"),
                "min_doc_chars": 50,
                "eval_fraction": 0.0,
                **data,
            }
        }
    )


def no_staging_left(tmp_path: Path) -> bool:
    return not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory, make_text):
    root = tmp_path_factory.mktemp("bad")
    d = root / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"good{i}.txt").write_text(make_text(i, 300))
    (d / "latin1.txt").write_bytes(("caf\xe9 " * 40).encode("latin-1"))
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 40)
    (d / "tiny.md").write_text("too short")
    (d / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet " * 10)
    pq.write_table(pa.table({"content": [make_text(5, 200)]}), d / "wrong_column.parquet")
    good = root / "good.parquet"
    pq.write_table(pa.table({"text": [make_text(6, 200), make_text(7, 200)]}), good)
    (d / "truncated.parquet").write_bytes(good.read_bytes()[:-40])
    with open(d / "records.jsonl", "w") as f:
        f.write(json.dumps({"text": make_text(8, 200)}) + "\n")
        f.write(json.dumps({"body": "no text field here"}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"text": 42}) + "\n")
    (d / "enormous.txt").write_text("x" * 50_000_000)
    return d


@pytest.fixture(scope="module")
def bad_run(bad_corpus, tiny_tokenizer_path, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("bad_out")
    cfg = config(out, tiny_tokenizer_path, [str(bad_corpus)])
    return out, cfg, prepare(cfg)


def reasons(manifest: dict) -> dict[str, str]:
    return {item["source"].split("/")[-1]: item["reason"] for item in manifest["skipped"]}


def test_bad_files_are_skipped_counted_and_named(bad_run):
    _, _, manifest = bad_run
    why = reasons(manifest)
    assert "not valid UTF-8 (byte 0xe9" in why["latin1.txt"]
    assert "NUL bytes" in why["binary.txt"]
    assert "unreadable parquet" in why["corrupt.parquet"]
    assert "unreadable parquet" in why["truncated.parquet"]
    assert "no column 'text' (data.text_field); columns: content" in why["wrong_column.parquet"]
    assert "no field 'text'" in why["records.jsonl:line 2"]
    assert "not valid JSON" in why["records.jsonl:line 3"]
    assert "field 'text' is int, not a string" in why["records.jsonl:line 4"]
    assert "50,000,000 characters, more than data.max_doc_chars=20,000,000" in why["enormous.txt"]
    docs = manifest["documents"]
    assert docs["kept"]["train"] == 4  # good0-2.txt and the first jsonl record
    assert docs["too_long"] == 1 and docs["too_short"] == 1  # enormous.txt, tiny.md
    assert docs["unreadable"] == 8


def test_the_output_of_a_job_with_bad_files_is_complete(bad_run):
    out, cfg, manifest = bad_run
    path = Path(cfg.data.prepared_path)
    assert (path / MANIFEST_NAME).is_file()
    assert manifest["blocks"]["train"] > 0
    assert all((path / f).is_file() for f in manifest["splits"]["train"]["files"])
    assert no_staging_left(out)


def test_warnings_and_the_summary_name_the_files(bad_corpus, tiny_tokenizer_path, tmp_path, ray_local, capsys):
    assert run_job("prepare", config(tmp_path, tiny_tokenizer_path, [str(bad_corpus)])) == 0
    shown = capsys.readouterr().out
    assert "warning" in shown and "latin1.txt" in shown and "enormous.txt" in shown


def test_a_missing_path_stops_before_ray_with_its_name(tmp_path, tiny_tokenizer_path, capsys):
    missing = tmp_path / "no-such-dir"
    assert run_job("prepare", config(tmp_path, tiny_tokenizer_path, [str(missing)])) == 1
    err = capsys.readouterr().err
    assert err.startswith("longtune prepare: ") and f"source '{missing}' does not exist" in err


def test_an_empty_source_is_an_error(tmp_path, tiny_tokenizer_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=f"source '{empty}' holds no documents"):
        prepare(config(tmp_path, tiny_tokenizer_path, [str(empty)]))
    with pytest.raises(DataError, match="matched no files"):
        prepare(config(tmp_path, tiny_tokenizer_path, [str(empty / "*.jsonl")]))


def test_nothing_left_after_filtering(tmp_path, tiny_tokenizer_path, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text(json.dumps({"text": "short"}) + "\n")
    with pytest.raises(DataError, match="nothing left after filtering .*1 documents shorter than data.min_doc_chars=50"):
        prepare(config(tmp_path, tiny_tokenizer_path, [str(src)]))
    assert not (tmp_path / "out").exists() and no_staging_left(tmp_path)


def test_a_failed_rerun_leaves_the_previous_dataset_whole(tmp_path, tiny_tokenizer_path, make_text, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(make_text(0, 400))
    cfg = config(tmp_path, tiny_tokenizer_path, [str(src)])
    first = prepare(cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}

    # The second run writes its blocks, then finds too few tokens for one block and stops.
    (src / "a.txt").write_text(make_text(0, 4))
    with pytest.raises(DataError, match="less than one block of context_length=32"):
        prepare(config(tmp_path, tiny_tokenizer_path, [str(src)], min_doc_chars=0))
    after = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert after == before and first["blocks"]["train"] > 0
    assert no_staging_left(tmp_path)


def test_a_directory_that_is_not_a_prepared_dataset_is_not_overwritten(tmp_path, tiny_tokenizer_path, make_text):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(make_text(0, 400))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not a prepared dataset"):
        prepare(config(tmp_path, tiny_tokenizer_path, [str(src)]))
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
