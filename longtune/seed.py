"""longtune's own seed: the tokenizer and the small Llama of `model.name_or_path:
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

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from longtune.atomic import publish_dir
from longtune.config import SEED_MODEL

if TYPE_CHECKING:  # torch is imported lazily: the tokenizer alone does not need it
    import torch

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


def _seed_documents() -> list[tuple[str, str]]:
    """(text, key) of the stdlib's .py files of at least SEED_MIN_DOC_CHARS characters, in
    sorted order; the key (path below the stdlib root) decides the eval split."""
    from longtune.data.stdlib import stdlib_files, stdlib_root

    root = stdlib_root()
    documents = []
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test modules are deliberately not UTF-8
        if len(text) >= SEED_MIN_DOC_CHARS:
            documents.append((text, path.relative_to(root).as_posix()))
    return documents


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
    tokenizer = train_seed_tokenizer([text for text, _ in _seed_documents()])
    # concurrent builders make the same tokenizer: the first one to finish stands
    publish_dir(target, lambda tmp: tokenizer.save_pretrained(str(tmp)), replace=False)


# ------------------------------------------------------------------ the seed model

SEED_CONTEXT = 256  # the seed model's original context; the default recipe extends it 4x
SEED_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8)
SEED_STEPS = 300
SEED_BATCH = 16
SEED_LR = 2e-3
SEED_EVAL_WINDOWS = 64


def seed_model_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return seed_dir(cache_dir) / "model"


def ensure_seed_model(cache_dir: str | os.PathLike[str] | None = None, *, console=None) -> Path:
    """The seed model's directory (weights, config, tokenizer, build report), built and
    pretrained on first use (a few minutes on a 2-core CPU, progress shown)."""
    target = seed_model_dir(cache_dir)
    if (target / "seed.json").is_file():
        return target
    tokenizer = seed_tokenizer(cache_dir)
    model, report = pretrain_seed_model(tokenizer, console=console)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "seed.json").write_text(json.dumps(report, indent=2))  # last: complete

    publish_dir(target, write, replace=False)
    return target


def seed_corpus_tokens(tokenizer) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(train, held-out) token streams of the stdlib corpus, documents joined by EOS. The
    held-out documents are the ones the default data config holds out for evaluation, so
    the seed model never trains on text that fine-tuning evaluates on."""
    import torch

    from longtune.config import DataConfig
    from longtune.data.sources import split_of

    eval_fraction = DataConfig().eval_fraction
    documents = _seed_documents()
    encoded = tokenizer([text for text, _ in documents], add_special_tokens=False)["input_ids"]
    streams: dict[str, list[int]] = {"train": [], "eval": []}
    for (_, key), ids in zip(documents, encoded):
        stream = streams[split_of(key, eval_fraction)]
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(streams["train"]), torch.tensor(streams["eval"])


def seed_model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=SEED_CONTEXT,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,  # like Llama-2: LoRA+ trains the input embedding only
        **SEED_SHAPE,
    )


def heldout_perplexity(model, stream: "torch.Tensor", context: int, windows: int) -> float:
    """exp(mean loss) over ``windows`` evenly spaced, non-overlapping windows of ``context``
    tokens from a held-out stream (every predicted token scored once)."""
    import math

    import torch

    n = min(windows, (len(stream) - 1) // context)
    step = (len(stream) - 1) // n
    starts = torch.arange(n) * step
    batch = torch.stack([stream[s : s + context] for s in starts.tolist()])
    model.eval()
    losses = []
    with torch.no_grad():
        for chunk in batch.split(16):
            losses.append(model(chunk, labels=chunk).loss.item() * len(chunk))
    return math.exp(sum(losses) / n)


def seed_optimizer(model, steps: int, lr: float = SEED_LR):
    """The seed recipe's AdamW and its schedule: linear warm-up over the first 5% of
    ``steps`` (at least one), then cosine decay to a tenth of ``lr``. Returns (opt, sched)."""
    import math

    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    return opt, sched


def seed_step(model, batch: "torch.Tensor", opt, sched, *, bf16: bool) -> float:
    """One seed-recipe step on ``batch`` (rows, context) of token ids, every token a target;
    bf16 autocast where the CPU has it (``precision.cpu_has_bf16``). Returns the loss."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def pretrain_seed_model(tokenizer, *, steps: int = SEED_STEPS, console=None):
    """A small Llama pretrained from scratch on the stdlib corpus at SEED_CONTEXT tokens.
    Deterministic for a given stdlib and torch build. Returns (model, report)."""
    import time

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from transformers import LlamaForCausalLM

    from longtune.precision import cpu_has_bf16

    console = console or Console(stderr=True)
    train, heldout = seed_corpus_tokens(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM(seed_model_config(tokenizer))
    random_ppl = heldout_perplexity(model, heldout, SEED_CONTEXT, SEED_EVAL_WINDOWS)
    opt, sched = seed_optimizer(model, steps)
    gen = torch.Generator().manual_seed(0)
    bf16 = cpu_has_bf16()
    console.print(
        f"[bold]Building the seed model[/] (once; cached): Llama {SEED_SHAPE['num_hidden_layers']} "
        f"layers, hidden {SEED_SHAPE['hidden_size']}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters, context {SEED_CONTEXT}, {len(train) / 1e6:.1f}M training tokens"
    )
    model.train()
    start = time.perf_counter()
    columns = (TextColumn("seed pretraining"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("seed", total=steps, loss=float("nan"))
        for step in range(steps):
            starts = torch.randint(0, len(train) - SEED_CONTEXT - 1, (SEED_BATCH,), generator=gen)
            batch = torch.stack([train[s : s + SEED_CONTEXT] for s in starts.tolist()])
            loss = seed_step(model, batch, opt, sched, bf16=bf16)
            progress.update(task, advance=1, loss=loss)
    seconds = time.perf_counter() - start
    ppl = heldout_perplexity(model, heldout, SEED_CONTEXT, SEED_EVAL_WINDOWS)
    report = {
        "steps": steps, "batch": SEED_BATCH, "context": SEED_CONTEXT, "lr": SEED_LR,
        "train_tokens": int(len(train)), "heldout_tokens": int(len(heldout)),
        "tokens_seen": steps * SEED_BATCH * SEED_CONTEXT, "seconds": round(seconds, 1),
        "bf16_autocast": bf16, "heldout_ppl": round(ppl, 2), "random_init_ppl": round(random_ppl, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
        # what the numbers depend on besides the recipe: another CPU type sums in another
        # order, and bf16 autocast is used only where the CPU has it
        "machine": machine_fingerprint(),
    }
    console.print(f"seed model: held-out perplexity {ppl:.1f} at {SEED_CONTEXT} tokens "
                  f"(random init: {random_ppl:.0f}), {seconds:.0f} s")
    return model, report


def machine_fingerprint() -> dict[str, object]:
    """What a seed's (and any CPU run's) exact numbers depend on besides its recipe: the CPU
    (its kernels), whether it computes bf16, torch's threads and version."""
    import platform

    import torch

    from longtune.precision import cpu_has_bf16

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_bf16": cpu_has_bf16(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
