"""Directories that appear whole or not at all."""

from __future__ import annotations

import pytest

from longtune.atomic import publish_dir, swap_into_place


def writer(text):
    def write(tmp):
        tmp.mkdir()
        (tmp / "f.txt").write_text(text)
    return write


def test_publish_creates_and_replaces(tmp_path):
    target = tmp_path / "out"
    publish_dir(target, writer("one"))
    publish_dir(target, writer("two"))
    assert (target / "f.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it


def test_a_failed_write_leaves_the_old_directory_and_no_debris(tmp_path):
    target = tmp_path / "out"
    publish_dir(target, writer("old"))

    def broken(tmp):
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_dir(target, broken)
    assert (target / "f.txt").read_text() == "old" and not (target / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_first_writer_wins_without_replace(tmp_path):
    target = tmp_path / "cache"
    publish_dir(target, writer("first"), replace=False)
    publish_dir(target, writer("second"), replace=False)
    assert (target / "f.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_swap_into_place_replaces_a_staged_directory(tmp_path):
    staged, target = tmp_path / "staged", tmp_path / "target"
    writer("new")(staged)
    writer("old")(target)
    swap_into_place(staged, target)
    assert (target / "f.txt").read_text() == "new" and not staged.exists()
