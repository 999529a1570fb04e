"""The stdlib long-context QA dataset (longtune.data.stdlib_qa): deterministic, every answer
sits only at the start of a long excerpt, the question is the last line, JSON lines
round-trip. Kept fast: the real stdlib is read through ``max_records``, and the record rules
are checked on a small fake stdlib."""

from __future__ import annotations

import json
import re

import pytest

import longtune.data.stdlib_qa as qa
from longtune.data.stdlib_qa import (
    FUNCTION_QUESTION,
    INSTRUCTION,
    STDLIB_QA,
    QaRecord,
    qa_records,
    write_qa_jsonl,
)

N = 60  # records read from the real stdlib (its first modules in sorted order)


@pytest.fixture(scope="module")
def records() -> list[QaRecord]:
    return qa_records(max_records=N)


def _excerpt(record: QaRecord) -> str:
    head = INSTRUCTION + "\n\n"
    assert record.instruction.startswith(head)
    body, sep, question = record.instruction[len(head) :].rpartition("\n\n")
    assert sep
    return body


def test_names():
    assert STDLIB_QA == "stdlib-qa"
    assert INSTRUCTION == (
        "Below is an excerpt of a Python module. Read it, then answer the question after it "
        "with the value only."
    )


def test_deterministic(records):
    assert qa_records(max_records=N) == records


def test_max_records_limits(records):
    assert len(records) == N
    assert qa_records(max_records=7) == records[:7]
    assert qa_records(max_records=0) == []


def test_ids_unique_and_both_kinds(records):
    assert len({r.id for r in records}) == len(records)
    assert {r.kind for r in records} == {"constant", "function"}
    for r in records:
        module, kind, name = r.id.rsplit(":", 2)
        assert module.endswith(".py") and kind == r.kind
        if kind == "function":
            assert name == r.output


def test_question_is_last_line(records):
    for r in records:
        last = r.instruction.splitlines()[-1]
        if r.kind == "constant":
            name = r.id.rsplit(":", 1)[1]
            assert last == f"Question: what value does the excerpt assign to {name}?"
        else:
            assert last == FUNCTION_QUESTION
        assert r.instruction.endswith("\n\n" + last)


def test_excerpts_are_long(records):
    for r in records:
        excerpt = _excerpt(r)
        assert 3000 - 200 <= len(excerpt) <= 3000


def test_constant_answer_only_at_the_start(records):
    constants = [r for r in records if r.kind == "constant"]
    assert constants
    for r in constants:
        name = r.id.rsplit(":", 1)[1]
        assert re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", name)
        excerpt = _excerpt(r)
        lines = excerpt.split("\n")
        defs = [i for i, line in enumerate(lines) if line.startswith(f"{name} = {r.output}")]
        assert len(defs) == 1 and defs[0] <= 3
        rest = lines[defs[0]][len(f"{name} = {r.output}") :].strip()
        assert rest == "" or rest.startswith("#")
        at = r.instruction.index(f"\n{name} = {r.output}")
        assert at < 0.25 * len(r.instruction)
        assert len(re.findall(rf"\b{name}\b", excerpt)) == 1  # nowhere else in the excerpt
        assert len(r.output) <= 24
        assert type(eval(r.output)) in (int, float, str)  # noqa: S307 - a stdlib literal


def test_function_answer_is_the_first_def(records):
    functions = [r for r in records if r.kind == "function"]
    assert functions
    for r in functions:
        excerpt = _excerpt(r)
        first = re.search(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)", excerpt, re.MULTILINE)
        assert first is not None and first.group(1) == r.output
        assert excerpt[first.start()] == "d"  # top-level: at the start of its line
        assert excerpt[: first.start()].count("\n") <= 3
        assert first.start() < 0.25 * len(r.instruction)
    assert len({r.id.rsplit(":", 2)[0] for r in functions}) == len(functions)  # one a file


def test_write_jsonl_round_trips(tmp_path, records):
    path = tmp_path / "nested" / "dir" / "qa.jsonl"
    assert write_qa_jsonl(path, max_records=12) == 12
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [r.to_json() for r in records[:12]]
    assert set(json.loads(lines[0])) == {"id", "instruction", "input", "output", "kind"}
    assert json.loads(lines[0])["input"] == ""
    assert sorted(p.name for p in path.parent.iterdir()) == ["qa.jsonl"]  # no temp file left
    assert write_qa_jsonl(path, max_records=3) == 3  # replaces the file
    assert len(path.read_text(encoding="utf-8").splitlines()) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == ["qa.jsonl"]


# ------------------------------------------------------------ the rules, on a fake stdlib


def _filler(n: int) -> str:
    return "".join(f"x_{i} = value_{i}  # filler line\n" for i in range(n))


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    monkeypatch.setattr(qa, "stdlib_root", lambda: tmp_path)
    return tmp_path


def test_rules_on_a_fake_stdlib(fake_stdlib):
    root = fake_stdlib
    (root / "a.py").write_text(
        '"""Doc."""\n'
        "import os\n"
        "ALPHA = 0x1F\n"
        "BETA = 'utf-8'  # comment\n"
        "FLAG = True\n"  # bool: no
        "NOTHING = None\n"  # None: no
        "AB = 3\n"  # too short a name: no
        "lower = 4\n"  # not upper case: no
        "TWICE = 1\n"
        "TWICE = 2\n"  # bound twice: no
        "NEG = -1\n"  # not a Constant: no
        "LONG = 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'\n"  # over 24 characters: no
        "REUSED = 5\n"
        "GAMMA = 1.5\n"
        "DELTA = 4096\n"
        "EPSILON = 'e'\n"  # the fifth that qualifies: over the cap of 4
        "def first(x):\n"
        "    return REUSED\n"  # REUSED appears again in its excerpt: no
        "def second():\n"
        "    pass\n" + _filler(200),
        encoding="utf-8",
    )
    (root / "b.py").write_bytes(b"GOOD = 1\n" + b"# \xff\xfe not utf-8\n" * 300)
    (root / "c.py").write_text("SHORT = 1\ndef f():\n    pass\n", encoding="utf-8")
    (root / "d.py").write_text("BROKEN = 1\ndef (:\n" + _filler(200), encoding="utf-8")

    records = qa_records(context_chars=400)
    assert [(r.id, r.output) for r in records] == [
        ("a.py:constant:ALPHA", "0x1F"),
        ("a.py:constant:BETA", "'utf-8'"),
        ("a.py:constant:GAMMA", "1.5"),
        ("a.py:constant:DELTA", "4096"),
        ("a.py:function:first", "first"),
    ]
    alpha = records[0]
    excerpt = _excerpt(alpha)
    assert excerpt.startswith('"""Doc."""\nimport os\nALPHA = 0x1F\n')  # the file's start
    assert len(excerpt) <= 400 and excerpt.endswith("# filler line")  # full lines only
    # Up to 3 lines before the definition, dropping the earliest while together they take
    # more than an eighth of the excerpt (50 characters here): for GAMMA and DELTA the long
    # LONG line (and NEG before it) goes.
    beta, gamma, delta = records[1:4]
    head = ['"""Doc."""', "import os", "ALPHA = 0x1F", "BETA = 'utf-8'  # comment"]
    assert _excerpt(beta).split("\n")[:4] == head
    assert _excerpt(gamma).split("\n")[:2] == ["REUSED = 5", "GAMMA = 1.5"]
    assert _excerpt(delta).split("\n")[:3] == ["REUSED = 5", "GAMMA = 1.5", "DELTA = 4096"]
    assert records == qa_records(context_chars=400)


def test_function_after_a_def_in_the_lead_lines_is_skipped(fake_stdlib):
    (fake_stdlib / "m.py").write_text(
        "def one(): pass\ndef two():\n    pass\n\n\ndef three():\n    pass\n\n\n\n"
        + _filler(100),
        encoding="utf-8",
    )
    records = qa_records(context_chars=300)
    # one: the first def. (two would have one in its lead lines, but one file gives one.)
    assert [r.id for r in records] == ["m.py:function:one"]
    (fake_stdlib / "m.py").write_text(
        "x = 1\n\n\nasync def coro():\n    pass\ndef nested():\n    pass\n" + _filler(100),
        encoding="utf-8",
    )
    # coro is async (no record); nested has coro's def in its lead lines: no record.
    assert qa_records(context_chars=300) == []


def test_too_short_from_the_fact_is_skipped(fake_stdlib):
    (fake_stdlib / "m.py").write_text(_filler(20) + "LATE = 7\n" + _filler(4), encoding="utf-8")
    assert qa_records(context_chars=300) == []
    assert [r.output for r in qa_records(context_chars=100)] == ["7"]


def test_bad_arguments():
    with pytest.raises(ValueError):
        qa_records(0)
    with pytest.raises(ValueError):
        qa_records(max_records=-1)
