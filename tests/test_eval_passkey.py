"""Passkey retrieval: deterministic prompts within the length, a model that copies the key
passes every trial, a random model passes none, the scoring rule."""

from __future__ import annotations

import re

import pytest
import torch

from longtune.eval import EvalError
from longtune.eval.passkey import first_number, passkey_retrieval, prompt_ids, retrieved


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


class CopyingModel:
    """Reads the key out of its prompt and 'generates' it: what a perfect model does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls: list[dict] = []

    def generate(self, input_ids, max_new_tokens, **kwargs):
        self.calls.append({"max_new_tokens": max_new_tokens, **kwargs})
        prompt = self.tokenizer.decode(input_ids[0].tolist())
        key = re.search(r"The pass key is (\d+)\.", prompt).group(1)
        answer = self.tokenizer.encode(f" {key}. Done.", add_special_tokens=False)[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)


def test_prompts_are_deterministic_and_fit(tokenizer):
    model = CopyingModel(tokenizer)
    first = passkey_retrieval(model, tokenizer, [256, 512], trials=3, seed=7, progress=False)
    again = passkey_retrieval(model, tokenizer, [256, 512], trials=3, seed=7, progress=False)
    assert first.trials == again.trials
    keys = {n: [t.key for t in first.trials if t.length == n] for n in (256, 512)}
    assert keys[256] == keys[512] and len(set(keys[256])) == 3  # seed i: the same key at every length
    assert all(n - 8 <= t.prompt_tokens <= n for t in first.trials for n in [t.length])
    other = passkey_retrieval(model, tokenizer, [256], trials=3, seed=8, progress=False)
    assert [t.key for t in other.trials] == keys[256][1:] + [other.trials[-1].key]


def test_a_model_that_copies_the_key_scores_one(tokenizer):
    model = CopyingModel(tokenizer)
    report = passkey_retrieval(model, tokenizer, [256, 512], trials=4, progress=False)
    assert report.metrics() == {"passkey_acc_256": 1.0, "passkey_acc_512": 1.0}
    assert all(call["do_sample"] is False for call in model.calls)
    assert all(t.passed and t.generated.strip().startswith(t.key) for t in report.trials)


def test_a_random_model_scores_about_zero(tokenizer):
    from conftest import tiny_lm

    torch.set_num_threads(1)
    model = tiny_lm("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.eos_token_id)
    model.train()
    report = passkey_retrieval(model, tokenizer, [256], trials=3, progress=False)
    assert report.scores[256].trials == 3
    assert report.scores[256].accuracy == 0.0
    assert model.training  # generated in eval mode, then handed back as it came


def test_the_first_number_must_be_the_key():
    assert first_number(" 31415. Remember it.") == "31415"
    assert first_number("no digits") is None
    assert retrieved(" 31415.", "31415") and retrieved("is 31415 indeed", "31415")
    assert not retrieved(" 3 and then 31415", "31415")
    assert not retrieved(" 314150", "31415") and not retrieved(" 3141", "31415")


def test_bos_is_counted_in_the_length(tokenizer):
    from longtune.data.passkey import passkey_document

    class WithBos:  # the tiny tokenizer, as if it added a BOS token like Llama's
        bos_token_id = tokenizer.eos_token_id

        def encode(self, text, add_special_tokens=True):
            ids = tokenizer.encode(text, add_special_tokens=False)
            return [self.bos_token_id, *ids] if add_special_tokens else ids

    doc = passkey_document(100, seed=0)
    assert prompt_ids(WithBos(), doc) == [tokenizer.eos_token_id, *tokenizer.encode(doc.prompt)]
    assert prompt_ids(tokenizer, doc) == tokenizer.encode(doc.prompt, add_special_tokens=False)


def test_a_length_too_short_for_a_prompt_is_one_clear_error(tokenizer):
    with pytest.raises(EvalError, match="eval.passkey_lengths: 16 is too short"):
        passkey_retrieval(CopyingModel(tokenizer), tokenizer, [16], trials=1, progress=False)
