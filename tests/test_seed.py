"""The seed tokenizer: trained on the stdlib corpus, deterministic, cached atomically."""

from __future__ import annotations

import pytest

from longtune.config import SEED_MODEL
from longtune.data.stdlib import stdlib_files, stdlib_root
from longtune.data.tokenize import vocab_hash
from longtune.seed import EOS_TOKEN, SEED_VOCAB_SIZE, seed_dir, seed_tokenizer, train_seed_tokenizer


def test_stdlib_corpus_is_the_standard_library_in_sorted_order():
    files = stdlib_files()
    rel = [p.relative_to(stdlib_root()).as_posix() for p in files]
    assert rel == sorted(rel) and "os.py" in rel and "json/decoder.py" in rel
    assert not any("site-packages" in r or "__pycache__" in r for r in rel)


def test_training_is_deterministic():
    texts = [p.read_text(encoding="utf-8") for p in stdlib_files()[:40] if p.stat().st_size > 8000]
    assert vocab_hash(train_seed_tokenizer(texts)) == vocab_hash(train_seed_tokenizer(texts))


@pytest.mark.slow
def test_seed_tokenizer_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTUNE_CACHE", str(tmp_path / "env-cache"))
    tok = seed_tokenizer(tmp_path / "cache")  # model.cache_dir wins over $LONGTUNE_CACHE
    assert (seed_dir(tmp_path / "cache") / "tokenizer" / "tokenizer.json").is_file()
    assert not (tmp_path / "env-cache").exists()
    assert len(tok.get_vocab()) == SEED_VOCAB_SIZE and tok.eos_token == EOS_TOKEN
    assert tok.name_or_path == SEED_MODEL and tok.is_fast
    assert [p.name for p in (tmp_path / "cache" / "seed").iterdir()] == ["tokenizer"]  # no temp dirs

    again = seed_tokenizer(tmp_path / "cache")  # from the cache: same vocabulary
    assert vocab_hash(again) == vocab_hash(tok)
    ids = tok.encode("def main():\n    return 0\n", add_special_tokens=False)
    assert tok.decode(ids) == "def main():\n    return 0\n"


def test_seed_and_models_do_not_import_each_other():
    """cpu_has_bf16 lives in longtune.precision: seed.py (which models.py imports to build
    the seed model) imports nothing from longtune.models, at module level or inside."""
    import ast

    import longtune.seed

    tree = ast.parse(open(longtune.seed.__file__, encoding="utf-8").read())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "longtune.models" not in imported and "longtune.precision" in imported
