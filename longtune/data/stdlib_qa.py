"""A synthetic long-context question-answering (instruction tuning) dataset, built from the
Python standard library's own source files, for longtune's embedded supervised-fine-tuning
demo.

Every record is a prompt made of a fixed task sentence, a long excerpt of one module and a
question at the end; the fact the question asks about sits near the *start* of the excerpt,
so the answer is only findable far back in the prompt. Two kinds of fact:

- ``constant``: a module-level ``NAME = <literal>`` (an int, float or str written in at most
  24 characters on one line, NAME in UPPER_CASE and bound only once at module level). The
  answer is the literal's source text exactly as written (``0x1F``, ``'utf-8'``, ``4096``);
  NAME appears nowhere else in the excerpt.
- ``function``: the excerpt starts at a top-level ``def``; the question asks for the name of
  the first function the excerpt defines. At most one per module.

Deterministic: the records are a pure function of the Python version's stdlib and
``context_chars`` (no randomness). Stdlib only, so anything can import it.
"""

from __future__ import annotations

import ast
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from longtune.data.stdlib import stdlib_files, stdlib_root

STDLIB_QA = "stdlib-qa"  # the source name users write in data.sources
INSTRUCTION = (
    "Below is an excerpt of a Python module. Read it, then answer the question after it "
    "with the value only."
)
CONSTANT = "constant"
FUNCTION = "function"
KINDS = (CONSTANT, FUNCTION)

MAX_CONSTANTS_PER_FILE = 4  # so no single module dominates
MAX_FUNCTIONS_PER_FILE = 1
MAX_LITERAL_CHARS = 24
LEAD_LINES = 3  # lines of context kept before the fact's definition line
# The lead lines together take at most this share of the excerpt (earlier ones are dropped
# first), so a fact is always near the start even after long lines.
LEAD_SHARE = 8

_CONSTANT_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_DEF_LINE = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+(\w+)", re.MULTILINE)
_LAMBDA = re.compile(r"\blambda\b")


def constant_question(name: str) -> str:
    return f"Question: what value does the excerpt assign to {name}?"


FUNCTION_QUESTION = "Question: what is the name of the first function the excerpt defines?"


@dataclass(frozen=True)
class QaRecord:
    id: str  # "<module path relative to stdlib root>:<kind>:<name>", unique
    instruction: str  # the whole prompt: task sentence, the excerpt, the question
    output: str  # the short reference answer
    kind: str  # "constant" | "function"

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "instruction": self.instruction,
            "input": "",
            "output": self.output,
            "kind": self.kind,
        }


def _prompt(excerpt: str, question: str) -> str:
    return f"{INSTRUCTION}\n\n{excerpt}\n\n{question}"


def _line_starts(text: str) -> list[int]:
    """Offset of the start of each line (index 0 is line 1), split on "\\n" only, as the
    parser counts lines (str.splitlines would also split on form feeds)."""
    starts = [0]
    at = text.find("\n")
    while at != -1:
        starts.append(at + 1)
        at = text.find("\n", at + 1)
    return starts


def _line_end(text: str, starts: list[int], lineno: int) -> int:
    """Offset just past the last character of line ``lineno`` (before its newline)."""
    return starts[lineno] - 1 if lineno < len(starts) else len(text)


def _excerpt(
    text: str, starts: list[int], lineno: int, context_chars: int
) -> tuple[str, int] | None:
    """(excerpt, offset of the definition line within it) for a fact defined on line
    ``lineno``, or None when the file is too short from there or the line does not fit."""
    def_start = starts[lineno - 1]
    first = max(1, lineno - LEAD_LINES)
    while first < lineno and def_start - starts[first - 1] > context_chars // LEAD_SHARE:
        first += 1
    start = starts[first - 1]
    end = start + context_chars
    if end > len(text):
        return None  # not long enough from the start of the excerpt
    if end < len(text) and text[end - 1] != "\n":
        cut = text.rfind("\n", start, end)
        if cut == -1:
            return None
        end = cut  # back to the last full line
    excerpt = text[start:end].rstrip()
    if start + len(excerpt) < _line_end(text, starts, lineno):
        return None  # the definition line itself does not fit
    return excerpt, def_start - start


def _module_bindings(tree: ast.Module) -> Counter:
    """How often each name is bound at module scope: assignments (also inside top-level
    if/try/for/with blocks), imports, defs and classes; function and class bodies are not
    walked (a ``global`` declaration there is looked for in the text, see below)."""
    bound: Counter = Counter()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound[node.name] += 1
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bound[node.id] += 1
        elif isinstance(node, ast.alias):
            bound[(node.asname or node.name).split(".")[0]] += 1
        todo.extend(ast.iter_child_nodes(node))
    return bound


def _declared_global(text: str, name: str) -> bool:
    """Whether some ``global`` statement names ``name`` (then a function may rebind it)."""
    pattern = rf"^[ \t]*global[ \t][^\n]*\b{re.escape(name)}\b"
    return re.search(pattern, text, re.MULTILINE) is not None


def _segment(text: str, starts: list[int], node: ast.expr | ast.stmt) -> str | None:
    """ast.get_source_segment for a node on a single line, without splitting the whole
    text into lines on every call (the columns are UTF-8 byte offsets)."""
    if node.end_lineno != node.lineno or node.end_col_offset is None:
        return None
    line = text[starts[node.lineno - 1] : _line_end(text, starts, node.lineno)]
    return line.encode("utf-8")[node.col_offset : node.end_col_offset].decode("utf-8")


def _constant_literal(node: ast.stmt, text: str, starts: list[int]) -> tuple[str, str] | None:
    """(NAME, literal source) when ``node`` is a qualifying ``NAME = <literal>`` statement."""
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
        return None
    target, value = node.targets[0], node.value
    if not (isinstance(target, ast.Name) and len(target.id) >= 3):
        return None
    if not _CONSTANT_NAME.fullmatch(target.id):
        return None
    if not isinstance(value, ast.Constant) or isinstance(value.value, bool):
        return None
    if not isinstance(value.value, (int, float, str)):
        return None
    # Single-line statement at the start of its line that reads exactly "NAME = <literal>"
    # (no parentheses, no annotation); what may follow on the line is checked by the caller.
    if node.col_offset != 0 or node.lineno != node.end_lineno:
        return None
    literal = _segment(text, starts, value)
    if literal is None or len(literal) > MAX_LITERAL_CHARS or "\r" in literal:
        return None
    if _segment(text, starts, node) != f"{target.id} = {literal}":
        return None
    return target.id, literal


def _parse(path: Path) -> tuple[str, ast.Module] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarnings (invalid escapes) and the like
            tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    return text, tree


def _file_records(path: Path, key: str, context_chars: int) -> Iterator[QaRecord]:
    """The qualifying facts of one module, in source order."""
    try:
        if path.stat().st_size < context_chars:  # bytes >= characters: too short anyway
            return
    except OSError:
        return
    parsed = _parse(path)
    if parsed is None:
        return
    text, tree = parsed
    if len(text) < context_chars:
        return
    starts = _line_starts(text)
    bound: Counter | None = None  # walked on the first candidate constant only
    constants = functions = 0
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            if functions >= MAX_FUNCTIONS_PER_FILE or node.col_offset != 0:
                continue
            cut = _excerpt(text, starts, node.lineno, context_chars)
            if cut is None:
                continue
            excerpt, def_at = cut
            # The first def in the excerpt (at any indentation) must be this one, and no
            # lambda comes before it.
            first_def = _DEF_LINE.search(excerpt)
            if first_def is None or first_def.start() != def_at or first_def.group(1) != node.name:
                continue
            if _LAMBDA.search(excerpt, 0, def_at):
                continue
            functions += 1
            yield QaRecord(
                id=f"{key}:{FUNCTION}:{node.name}",
                instruction=_prompt(excerpt, FUNCTION_QUESTION),
                output=node.name,
                kind=FUNCTION,
            )
        elif constants < MAX_CONSTANTS_PER_FILE:
            fact = _constant_literal(node, text, starts)
            if fact is None:
                continue
            name, literal = fact
            if bound is None:
                bound = _module_bindings(tree)
            if bound[name] != 1 or _declared_global(text, name):
                continue
            cut = _excerpt(text, starts, node.lineno, context_chars)
            if cut is None:
                continue
            excerpt, def_at = cut
            line = excerpt[def_at:].split("\n", 1)[0]
            rest = line[len(f"{name} = {literal}") :].strip()
            if rest and not rest.startswith("#"):
                continue  # e.g. "A = 1; B = 2"
            if len(re.findall(rf"\b{re.escape(name)}\b", excerpt)) != 1:
                continue  # the name must appear only at its definition
            constants += 1
            yield QaRecord(
                id=f"{key}:{CONSTANT}:{name}",
                instruction=_prompt(excerpt, constant_question(name)),
                output=literal,
                kind=CONSTANT,
            )


def qa_records(context_chars: int = 3000, *, max_records: int | None = None) -> list[QaRecord]:
    """The dataset: for each stdlib module in sorted order, its qualifying facts in source
    order (at most 4 constants and 1 function per module), each an excerpt of
    ``context_chars`` characters (cut back to the last full line) starting up to 3 lines
    before the fact. ``max_records`` stops after that many records."""
    if context_chars < 1:
        raise ValueError(f"context_chars must be >= 1, got {context_chars}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    records: list[QaRecord] = []
    if max_records == 0:
        return records
    root = stdlib_root()
    for path in stdlib_files(root):
        key = path.relative_to(root).as_posix()
        for record in _file_records(path, key, context_chars):
            records.append(record)
            if max_records is not None and len(records) >= max_records:
                return records
    return records


def write_qa_jsonl(
    path: str | os.PathLike, context_chars: int = 3000, *, max_records: int | None = None
) -> int:
    """Write the records to ``path`` as JSON lines (atomically: a temporary file in the same
    directory, then os.replace); returns how many were written."""
    path = Path(path)
    records = qa_records(context_chars, max_records=max_records)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(records)
