"""Shared fixtures."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def environment(values: dict[str, str], drop: tuple[str, ...] = ()):
    """os.environ with the variables starting with any of ``drop`` removed and ``values``
    set, restored afterwards (for what a library reads from the environment on each call)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if drop and k.startswith(drop)]:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_script(relative: str):
    """A script of the repository (not a package module), e.g. ``clusters/rehearse.py``,
    loaded by path once and registered in sys.modules (which its dataclasses need)."""
    name = relative.removesuffix(".py").replace("/", "_")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def loopback_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo rendezvous (MASTER_PORT) of ranks a test
    spawns right after: picked by binding port 0, then released."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# ------------------------------------------------------------------ Ray and data (issue #4)


@pytest.fixture(scope="session")
def ray_local():
    """One real local Ray for the session. Four logical CPUs on this two-core machine, so
    tokenizer actors, read and pack tasks can all be scheduled at once."""
    import ray

    from longtune.runtime import job_runtime_env

    ray.init(num_cpus=4, include_dashboard=False, runtime_env=job_runtime_env())
    yield ray
    ray.shutdown()


def make_words(seed: int, n_words: int) -> str:
    """Deterministic text from a small pseudo-vocabulary (a tokenizer learns it quickly)."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "nu", "pe", "ra", "so", "ti", "vu", "ze", "qua", "ix"]
    vocab = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(150)]
    words = rng.choices(vocab, k=n_words)
    return " ".join(words).replace(" ka ", " ka.\n")


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory) -> str:
    """A byte-level BPE (vocab 300, EOS <|endoftext|>) trained on make_words text, saved as
    a transformers PreTrainedTokenizerFast directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([make_words(s, 2000) for s in range(20)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def make_text():
    """make_words(seed, n_words) -> deterministic text."""
    return make_words


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """30 make_words documents of 400-1125 words: a corpus for small training runs."""
    path = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (path / f"doc{i:02d}.txt").write_text(make_words(i, 400 + 25 * i))
    return str(path)


# ------------------------------------------------------------------ tiny models


TINY_FAMILIES = {  # name -> (transformers config class, model class, extra config)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
}


def tiny_lm(family: str = "llama", *, seed: int = 0, **config):
    """A random causal LM of ``family`` built from config, no download: 2 layers, hidden 64,
    4 heads over 2 KV heads, vocabulary 97, 512 positions, unless ``config`` says otherwise.
    The same model for the same arguments (so a test can rebuild its "fresh base"). The one
    builder every test's tiny model comes from."""
    import torch
    import transformers

    config_name, model_name, extra = TINY_FAMILIES[family]
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    kwargs.update(extra)
    kwargs.update(config)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs))


def varlen_attention_reference(q, k, v, cu_seqlens, scale=None, left_window: int = -1):
    """What a varlen flash kernel computes, on the CPU: causal attention of [T, H, D] tokens
    within each sequence cu_seqlens cuts, GQA by repetition, a left window when >= 0."""
    import torch

    out = torch.zeros_like(q)
    n_rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
        n = e - s
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if left_window >= 0:
            mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-left_window - 1)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out = out.index_copy(0, torch.arange(s, e), o.transpose(0, 1))  # out of place: autograd
    return out


def largest_bool_tensor(fn) -> int:
    """The most elements of any bool tensor (a mask) an op produced while ``fn()`` ran."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.bool:
                    Watch.largest = max(Watch.largest, t.numel())
            return out

    with Watch():
        fn()
    return Watch.largest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_path) -> str:
    """A tiny random Llama (original context 64) saved with its tokenizer, like a hub model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    model = tiny_lm("llama", vocab_size=len(tokenizer), max_position_embeddings=64,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, corpus_dir):
    """The small training run the end-to-end tests share (2 workers, 128 tokens, checkpoints
    and logs every 2 steps, MLflow in tmp_path): ``run_config(*overrides) -> Config``."""
    from longtune.config import load_config

    def make(*extra: str):
        return load_config(None, [
            f"model.name_or_path={tiny_model_dir}", "model.target_context=128",
            f"data.sources=[{corpus_dir}]", "data.min_doc_chars=100", "data.eval_fraction=0.2",
            "train.lr=1e-3", "train.warmup_steps=0", "train.log_every=2", "train.checkpoint_every=2",
            "train.batch_size_per_worker=1", f"train.storage_path={tmp_path / 'ray'}",
            f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false",
            "eval.loss_blocks=2", "eval.lengths=[64, 128]", "eval.stride=32", "eval.max_eval_tokens=2000",
            "eval.passkey_trials=0", "eval.before_after=false",
            "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
            *extra,
        ])

    return make
