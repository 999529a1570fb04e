"""Passkey-retrieval documents, built the way LongLoRA builds them (Mohtashami & Jaggi's
landmark-attention test): a task line, filler sentences, the pass key line at some depth,
more filler, and the question at the end. The model must continue with the key.

Deterministic: a document is a pure function of its seed (and length and depth); no global
random state is touched. Ray-free, so evaluation can import it anywhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
MAX_KEY = 50_000


def key_line(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


@dataclass(frozen=True)
class PasskeyDocument:
    prompt: str  # ends with the question; the answer is not in it
    answer: str  # the key, e.g. "31415" (the model should continue with " 31415")
    key: int
    filler_chars: int  # characters of filler, before and after the key together
    depth: float  # where the key sits in the filler: 0 = start, 1 = end


def passkey_document(filler_chars: int, seed: int, depth: float | None = None) -> PasskeyDocument:
    """One document with ``filler_chars`` characters of filler. The key (1..50000) and, when
    ``depth`` is None, the key's depth are drawn from ``seed`` (uniform, as in LongLoRA);
    the same seed gives the same key and depth at every length."""
    if filler_chars < 0:
        raise ValueError(f"filler_chars must be >= 0, got {filler_chars}")
    if depth is not None and not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = rng.randint(1, MAX_KEY)
    drawn = rng.random()
    prefix = round((drawn if depth is None else depth) * filler_chars)
    filler = (FILLER + " ") * (filler_chars // (len(FILLER) + 1) + 1)
    # LongLoRA cuts both parts from the start of the same filler, mid-sentence if need be.
    lines = [TASK, filler[:prefix], key_line(key), filler[: filler_chars - prefix], QUESTION]
    return PasskeyDocument(
        prompt="\n".join(lines),
        answer=str(key),
        key=key,
        filler_chars=filler_chars,
        depth=prefix / filler_chars if filler_chars else 0.0,
    )


def passkey_for_tokens(
    tokenizer, n_tokens: int, seed: int, depth: float | None = None
) -> PasskeyDocument:
    """The longest document whose prompt is at most ``n_tokens`` tokens with ``tokenizer``
    (anything with ``encode(text, add_special_tokens=False)``)."""

    def length(chars: int) -> int:
        doc = passkey_document(chars, seed, depth)
        return len(tokenizer.encode(doc.prompt, add_special_tokens=False))

    if length(0) > n_tokens:
        raise ValueError(f"a passkey prompt needs more than {n_tokens} tokens even without filler")
    low, high = 0, max(1, n_tokens)
    while length(high) <= n_tokens:  # grow until too long (filler is >= 1 char a token)
        low, high = high, high * 2
    while high - low > 1:  # largest filler that fits
        mid = (low + high) // 2
        low, high = (mid, high) if length(mid) <= n_tokens else (low, mid)
    return passkey_document(low, seed, depth)


def passkey_documents(
    tokenizer, n_tokens: int, trials: int, seed: int = 0
) -> list[PasskeyDocument]:
    """``trials`` documents of at most ``n_tokens`` tokens, seeds seed..seed+trials-1."""
    return [passkey_for_tokens(tokenizer, n_tokens, seed + i) for i in range(trials)]


# Training documents use seeds from here on, so no trial of the evaluation (seeds
# eval.passkey_seed + i, small numbers) is ever a training document.
TRAINING_SEED_BASE = 1 << 40


def passkey_training_ids(tokenizer, max_tokens: int, index: int, min_tokens: int = 0) -> list[int]:
    """Document ``index`` of an endless set of passkey *training* documents: the prompt, the
    answer (" <key>") and EOS, as token ids, at most ``max_tokens`` long. Its length is drawn
    uniformly between ``min_tokens`` and ``max_tokens`` from the index (so the model sees the
    key at every distance up to ``max_tokens``), its key and depth as for evaluation, from
    seed TRAINING_SEED_BASE + index. Deterministic and independent of any global state."""
    rng = random.Random(TRAINING_SEED_BASE + index)
    target = rng.randint(min_tokens, max_tokens)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    key = passkey_document(0, TRAINING_SEED_BASE + index).answer  # the same key at every length
    # the prompt's last token and the answer's first can merge: one token of slack
    answer_tokens = len(tokenizer.encode(" " + key, add_special_tokens=False)) + len(eos) + 1
    try:
        doc = passkey_for_tokens(tokenizer, target - answer_tokens, TRAINING_SEED_BASE + index)
    except ValueError:  # shorter than the prompt without filler: the shortest document
        doc = passkey_document(0, TRAINING_SEED_BASE + index)
    ids = tokenizer.encode(doc.prompt + " " + doc.answer, add_special_tokens=False) + eos
    if len(ids) > max_tokens:
        raise ValueError(f"a passkey training document needs {len(ids)} tokens, more than {max_tokens}")
    return ids
