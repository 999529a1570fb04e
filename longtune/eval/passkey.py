"""Passkey retrieval (LongLoRA's test, after Mohtashami & Jaggi): a pass key hidden at a
random depth in filler text of a given length; the model must continue the closing
question with the key.

Per length, ``trials`` prompts with seeds ``seed .. seed+trials-1`` (the same keys and
depths on every run and, key-wise, at every length), each the longest that fits in
``length`` tokens including a BOS token when the tokenizer adds one
(``longtune.data.passkey``). Greedy decoding (``do_sample=False``) of enough new tokens for
the key; a trial passes when the first number in the generated text is the key's digits.
Accuracy = passed / trials. Any object with a Hugging Face-compatible ``generate`` works.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from longtune.data.passkey import PasskeyDocument, passkey_documents
from longtune.eval.errors import EvalError
from longtune.eval.perplexity import _device_of, _progress, full_attention_eval

_NUMBER = re.compile(r"\d+")


@dataclass(frozen=True)
class PasskeyTrial:
    length: int
    seed: int
    key: str
    depth: float
    prompt_tokens: int
    generated: str  # the decoded new tokens
    passed: bool


@dataclass(frozen=True)
class PasskeyScore:
    length: int
    trials: int
    passed: int

    @property
    def accuracy(self) -> float:
        return self.passed / self.trials if self.trials else 0.0


@dataclass
class PasskeyReport:
    scores: dict[int, PasskeyScore] = field(default_factory=dict)
    trials: list[PasskeyTrial] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        return {f"passkey_acc_{n}": s.accuracy for n, s in self.scores.items()}


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (None when there is none)."""
    match = _NUMBER.search(text)
    return match.group(0) if match else None


def retrieved(generated: str, key: str) -> bool:
    """A trial passes when the first number the model wrote is the key."""
    return first_number(generated) == key


def prompt_ids(tokenizer, doc: PasskeyDocument) -> list[int]:
    """The prompt's token ids, BOS first when the tokenizer adds one (never a trailing EOS)."""
    ids = tokenizer.encode(doc.prompt, add_special_tokens=False)
    return ([tokenizer.bos_token_id] if _adds_bos(tokenizer) else []) + list(ids)


def passkey_retrieval(
    model,
    tokenizer,
    lengths: Sequence[int],
    trials: int,
    *,
    seed: int = 0,
    console=None,
    progress: bool = True,
) -> PasskeyReport:
    """Run ``trials`` passkey trials at each of ``lengths`` tokens with greedy decoding."""
    report = PasskeyReport()
    lengths = sorted(set(int(n) for n in lengths))
    if trials <= 0 or not lengths:
        return report
    device = _device_of(model)
    bos = 1 if _adds_bos(tokenizer) else 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with full_attention_eval(model), torch.inference_mode(), _progress(console, progress, "trials") as bar:
        tasks = {n: bar.add_task(f"passkey @ {n:,}", total=trials) for n in lengths}
        for n in lengths:
            passed = 0
            try:
                docs = passkey_documents(tokenizer, n - bos, trials, seed=seed)
            except ValueError as exc:
                raise EvalError(f"eval.passkey_lengths: {n} is too short ({exc})") from None
            for i, doc in enumerate(docs):
                ids = torch.tensor([prompt_ids(tokenizer, doc)], device=device)
                # room for the key with its leading space, and a little more
                new = len(tokenizer.encode(" " + doc.answer, add_special_tokens=False)) + 2
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=new,
                    pad_token_id=pad_id,
                )
                text = tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
                ok = retrieved(text, doc.answer)
                passed += ok
                report.trials.append(
                    PasskeyTrial(n, seed + i, doc.answer, doc.depth, ids.shape[1], text, ok)
                )
                bar.advance(tasks[n])
            report.scores[n] = PasskeyScore(n, trials, passed)
    return report


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer.encode("1", add_special_tokens=True)
    return bool(ids) and ids[0] == bos
