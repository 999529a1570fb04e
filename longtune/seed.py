"""longtune's own seed: the tokenizer (and, later, the small Llama) of `model.name_or_path:
longtune/seed`, built on the machine from the embedded stdlib corpus, so the default
pipeline runs with no download.

The tokenizer is a byte-level BPE with a 4096-token vocabulary trained on the standard
library's ``.py`` files of at least 8000 characters (a few seconds). Training is
deterministic for a given Python version's stdlib; the vocabulary hash in every prepared
dataset's manifest catches a seed built from another stdlib. It is built once and cached
under ``<cache>/seed/tokenizer`` where <cache> is ``model.cache_dir``, else $LONGTUNE_CACHE,
else ~/.cache/longtune; concurrent builders each write a temporary directory and the first
rename wins.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from longtune.config import SEED_MODEL

SEED_VOCAB_SIZE = 4096
SEED_MIN_DOC_CHARS = 8000  # the recipe's corpus: stdlib modules at least this long
EOS_TOKEN = "<|endoftext|>"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """model.cache_dir, else $LONGTUNE_CACHE, else ~/.cache/longtune."""
    root = cache_dir or os.environ.get("LONGTUNE_CACHE") or Path.home() / ".cache" / "longtune"
    return Path(root).expanduser()


def seed_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the seed tokenizer (./tokenizer) and the seed model live."""
    return cache_root(cache_dir) / "seed"


def seed_tokenizer(cache_dir: str | os.PathLike[str] | None = None):
    """The seed tokenizer as a ``PreTrainedTokenizerFast``, trained on first use."""
    from transformers import PreTrainedTokenizerFast

    target = seed_dir(cache_dir) / "tokenizer"
    if not (target / "tokenizer.json").is_file():
        _build_tokenizer(target)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(target))
    # The manifest names the tokenizer; the cache path differs between machines.
    tokenizer.name_or_path = SEED_MODEL
    return tokenizer


def _seed_texts() -> list[str]:
    from longtune.data.stdlib import stdlib_files

    texts = []
    for path in stdlib_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test modules are deliberately not UTF-8
        if len(text) >= SEED_MIN_DOC_CHARS:
            texts.append(text)
    return texts


def train_seed_tokenizer(texts: list[str]):
    """A byte-level BPE (vocab 4096, EOS only) trained on ``texts`` in their order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SEED_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


def _build_tokenizer(target: Path) -> None:
    tokenizer = train_seed_tokenizer(_seed_texts())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tokenizer.tmp-{uuid.uuid4().hex}"
    try:
        tokenizer.save_pretrained(str(tmp))
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its tokenizer is the same one.
            if not (target / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# The seed model (a 4-layer Llama over this tokenizer, pretrained at context 256) is built
# by a later issue; it belongs here, next to its tokenizer, cached under seed_dir().
