"""Passkey-retrieval documents: LongLoRA's construction, deterministic, sized in tokens."""

from __future__ import annotations

import sys

import pytest

from longtune.data.passkey import (
    FILLER,
    QUESTION,
    TASK,
    key_line,
    passkey_document,
    passkey_documents,
    passkey_for_tokens,
)


def test_layout_follows_longlora():
    doc = passkey_document(2000, seed=3)
    lines = doc.prompt.split("\n")
    assert lines[0] == TASK and lines[2] == key_line(doc.key) and lines[-1] == QUESTION
    assert f"The pass key is {doc.key}. Remember it. {doc.key} is the pass key." in doc.prompt
    assert 1 <= doc.key <= 50_000 and doc.answer == str(doc.key)
    assert len(lines[1]) + len(lines[3]) == 2000
    assert FILLER[:40] in lines[1] + lines[3]
    assert str(doc.key) not in doc.prompt.split(key_line(doc.key))[1]  # only the key line has it


def test_same_seed_same_document_and_key_at_every_length():
    assert passkey_document(5000, seed=11) == passkey_document(5000, seed=11)
    assert passkey_document(5000, seed=11).key == passkey_document(900, seed=11).key
    assert len({passkey_document(1000, seed=s).key for s in range(20)}) > 15


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_fixed_depth_places_the_key(depth):
    doc = passkey_document(1000, seed=0, depth=depth)
    before = doc.prompt.split(key_line(doc.key))[0]
    assert len(before) == len(TASK) + 1 + round(depth * 1000) + 1
    assert doc.depth == depth


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="depth must be in"):
        passkey_document(100, seed=0, depth=1.5)
    with pytest.raises(ValueError, match="filler_chars must be"):
        passkey_document(-1, seed=0)


def test_sized_to_a_token_budget(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    for n in (256, 1024):
        doc = passkey_for_tokens(tok, n, seed=5)
        length = len(tok.encode(doc.prompt, add_special_tokens=False))
        assert n - 8 <= length <= n
    docs = passkey_documents(tok, 256, trials=3, seed=1)
    assert [d.key for d in docs] == [passkey_for_tokens(tok, 256, seed=s).key for s in (1, 2, 3)]
    with pytest.raises(ValueError, match="even without filler"):
        passkey_for_tokens(tok, 5, seed=0)


def test_importing_passkey_does_not_import_ray():
    import subprocess

    code = "import sys, longtune.data.passkey; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
