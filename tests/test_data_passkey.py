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
    passkey_training_ids,
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


def test_training_documents_fit_end_with_the_answer_and_never_repeat_an_eval_trial(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    docs = [passkey_training_ids(tok, 1024, i, min_tokens=300) for i in range(40)]
    assert all(len(ids) <= 1024 for ids in docs)
    assert max(len(ids) for ids in docs) > 900 and min(len(ids) for ids in docs) < 500  # spread
    assert docs[7] == passkey_training_ids(tok, 1024, 7, min_tokens=300)  # a pure function of i
    for ids in docs[:5]:
        text = tok.decode(ids[:-1])
        assert ids[-1] == tok.eos_token_id and text.startswith(TASK)
        key = text.rsplit(QUESTION, 1)[1].strip()
        assert key_line(int(key)) in text  # the answer is the document's own key
    # no training document is an evaluation trial (seeds 0..19) cut shorter or longer
    eval_keys = {d.key for d in passkey_documents(tok, 1024, trials=20)}
    train_keys = {int(tok.decode(ids[:-1]).rsplit(QUESTION, 1)[1]) for ids in docs}
    assert len(train_keys) >= 38 and len(train_keys & eval_keys) <= 1  # keys drawn from 50,000


def test_importing_passkey_does_not_import_ray():
    import subprocess

    code = "import sys, longtune.data.passkey; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
