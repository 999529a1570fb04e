"""Sliding-window perplexity at several context lengths, with full attention, on held-out
documents; every length scores exactly the same tokens.

The rule. Let ``L_max = max(lengths)`` and ``S = eval.stride`` (``S <= min(lengths)``). A
held-out document is its token ids ``d[0..n-1]`` (no special tokens added). Its *spans*
end at ``e = L_max, L_max + S, L_max + 2S, ...`` while ``e <= n - 1``. For one span and a
length ``L``, the model reads the ``L`` tokens ``d[e-L : e]`` (``position_ids`` 0..L-1, one
window, no padding) and is scored on its next-token predictions at the window's last ``S``
positions: the targets ``d[e-S+1 : e+1]``. So

* the targets of every span are the same at every length; only the context before them
  changes. The target ``j`` tokens into a span (j = 0..S-1) is predicted from ``L - S + 1 + j``
  tokens of context: at least ``L - S + 1``, at most ``L``;
* a document's spans tile its tokens ``d[L_max-S+1 : ...]`` without gap or overlap; the
  first ``L_max - S + 1`` tokens are context only, and a tail of fewer than ``S`` tokens is
  not scored;
* a document of ``n`` tokens has ``(n - 1 - L_max) // S + 1`` spans when ``n >= L_max + 1``;
  a shorter document has none and is counted in ``documents_too_short`` (reported, not
  hidden). For example, with lengths up to 1024 and stride 256, a document of 1280 tokens
  has one span and one of 1281 tokens has two;
* spans are taken in document order, at most ``max_eval_tokens // S`` of them, so at most
  ``max_eval_tokens`` tokens are scored per length, the same ones for every length.

The window of ``L`` tokens is fed whole, the token after it is the last target: a length
equal to the stride (e.g. 256 with stride 256) is scored on all ``S`` predictions of its
window. The NLL is computed here from the logits (log-softmax in fp32, summed in fp64), not
by the model's loss; perplexity is ``exp(mean NLL)``.

Held-out documents (``load_eval_documents``) are the eval split of ``data.sources`` (the same
stable hash split that training holds out), read and tokenized in this process without Ray;
or, with ``data.prepared_path``, the eval blocks of a prepared dataset, each parquet file's
blocks concatenated in order into one stream (documents separated by EOS, as packed for
training, so a window may cross a document boundary there).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from longtune.config import Config
from longtune.eval.errors import EvalError


# ---------------------------------------------------------------- spans


def spans_in(n_tokens: int, max_length: int, stride: int) -> int:
    """How many spans a document of ``n_tokens`` tokens has (0 when shorter than max_length + 1)."""
    if n_tokens < max_length + 1:
        return 0
    return (n_tokens - 1 - max_length) // stride + 1


def plan_spans(
    doc_lengths: Sequence[int], max_length: int, stride: int, max_spans: int | None = None
) -> tuple[list[tuple[int, int]], int]:
    """The scored spans as ``(document index, end e)`` in document order, at most
    ``max_spans``, and how many documents are too short to have any."""
    spans: list[tuple[int, int]] = []
    too_short = 0
    for index, n in enumerate(doc_lengths):
        count = spans_in(n, max_length, stride)
        if count == 0:
            too_short += 1
            continue
        for k in range(count):
            if max_spans is not None and len(spans) >= max_spans:
                return spans, too_short
            spans.append((index, max_length + k * stride))
    return spans, too_short


def window(doc: torch.Tensor, end: int, length: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input ids d[end-length:end], targets d[end-stride+1:end+1])`` of one span."""
    return doc[end - length : end], doc[end - stride + 1 : end + 1]


def check_lengths(lengths: Sequence[int], stride: int, max_eval_tokens: int) -> None:
    if not lengths:
        raise EvalError("eval.lengths is empty: name at least one context length to score")
    if stride > min(lengths):
        raise EvalError(
            f"eval.stride={stride} is longer than the shortest of eval.lengths ({min(lengths)}): "
            "every length scores the same last-stride tokens of its window; lower eval.stride"
        )
    if max_eval_tokens < stride:
        raise EvalError(
            f"eval.max_eval_tokens={max_eval_tokens} is less than one span of eval.stride={stride} tokens"
        )


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class LengthScore:
    length: int
    tokens: int  # scored target tokens
    windows: int
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float


@dataclass
class PerplexityReport:
    stride: int
    max_length: int
    documents: int  # documents given
    documents_used: int  # documents with at least one scored span
    documents_too_short: int  # fewer than max_length + 1 tokens: nothing scored
    spans_available: int  # spans in all documents, before the max_eval_tokens cap
    scores: dict[int, LengthScore] = field(default_factory=dict)

    @property
    def spans(self) -> int:
        return next(iter(self.scores.values())).windows if self.scores else 0

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for length, s in self.scores.items():
            out[f"ppl_{length}"] = s.ppl
            out[f"eval_nll_{length}"] = s.nll
            out[f"eval_tokens_{length}"] = float(s.tokens)
        return out

    def summary(self) -> str:
        tokens = self.spans * self.stride
        text = (
            f"{tokens:,} tokens scored at every length ({self.spans:,} spans of {self.stride}) from "
            f"{self.documents_used:,} held-out documents"
        )
        if self.documents_too_short:
            text += (
                f"; {self.documents_too_short:,} document{'s' if self.documents_too_short > 1 else ''} "
                f"shorter than {self.max_length + 1:,} tokens skipped"
            )
        if self.spans_available > self.spans:
            text += f"; capped from {self.spans_available:,} spans by eval.max_eval_tokens"
        return text


# ---------------------------------------------------------------- scoring


def perplexity(
    model,
    documents: Sequence[Sequence[int]],
    lengths: Sequence[int],
    *,
    stride: int,
    max_eval_tokens: int,
    batch_size: int = 4,
    console=None,
    progress: bool = True,
) -> PerplexityReport:
    """Score ``model`` (a causal LM: base, base + adapter or merged) on ``documents`` at each
    of ``lengths`` by the rule in this module's docstring, ``batch_size`` windows per
    forward pass, with full attention. Raises EvalError when nothing can be scored."""
    lengths = sorted(set(int(n) for n in lengths))
    check_lengths(lengths, stride, max_eval_tokens)
    max_length = lengths[-1]
    docs = [torch.as_tensor(list(d) if not isinstance(d, torch.Tensor) else d, dtype=torch.long) for d in documents]
    n_available = sum(spans_in(len(d), max_length, stride) for d in docs)
    spans, too_short = plan_spans([len(d) for d in docs], max_length, stride, max_eval_tokens // stride)
    if not spans:
        raise EvalError(
            f"no held-out document has the {max_length + 1:,} tokens needed to score length "
            f"{max_length:,} ({len(docs):,} documents, all too short): add longer documents or "
            "lower eval.lengths"
        )
    report = PerplexityReport(
        stride=stride,
        max_length=max_length,
        documents=len(docs),
        documents_used=len({i for i, _ in spans}),
        documents_too_short=too_short,
        spans_available=n_available,
    )
    device = _device_of(model)
    keep = {"logits_to_keep": stride} if _accepts(model, "logits_to_keep") else {}
    with full_attention_eval(model), torch.inference_mode(), _progress(console, progress) as bar:
        tasks = {L: bar.add_task(f"perplexity @ {L:,}", total=len(spans)) for L in lengths}
        for L in lengths:
            positions = torch.arange(L, device=device)
            total, count = 0.0, 0
            for start in range(0, len(spans), batch_size):
                chunk = spans[start : start + batch_size]
                pairs = [window(docs[i], e, L, stride) for i, e in chunk]
                ids = torch.stack([p[0] for p in pairs]).to(device)  # (B, L)
                targets = torch.stack([p[1] for p in pairs]).to(device)  # (B, S)
                out = model(input_ids=ids, position_ids=positions.expand(len(chunk), L), **keep)
                logits = out.logits[:, -stride:, :].float()  # (B, S, V): predictions of the last S
                logp = torch.log_softmax(logits, dim=-1)
                nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, S)
                total += nll.double().sum().item()
                count += nll.numel()
                bar.advance(tasks[L], len(chunk))
            mean = total / count
            report.scores[L] = LengthScore(L, count, len(spans), mean, math.exp(mean))
    return report


@contextmanager
def full_attention_eval(model) -> Iterator:
    """Eval mode with the model's own (full) attention for the duration; a model training
    with S2-Attn gets it back afterwards, and its train/eval mode is restored."""
    from longtune.attention import ATTN_IMPLEMENTATION, use_full_attention

    config = getattr(model, "config", None)
    was_s2 = getattr(config, "_attn_implementation", None) == ATTN_IMPLEMENTATION
    was_training = bool(getattr(model, "training", False))
    if was_s2:
        use_full_attention(model)
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield model
    finally:
        if was_s2:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        if was_training:
            model.train()


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _accepts(model, name: str) -> bool:
    """Whether the underlying model's forward takes ``name`` (PEFT wrappers pass it on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _progress(console, enabled: bool, unit: str = "windows"):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        console=console or Console(stderr=True),
        disable=not enabled,
    )


# ---------------------------------------------------------------- held-out documents


def load_eval_documents(config: Config, tokenizer) -> list[list[int]]:
    """Held-out documents as token ids (no special tokens), read in this process without
    Ray, in source order, stopping once they hold the spans ``perplexity`` will score
    (``eval.max_eval_tokens // eval.stride``): the eval blocks of ``data.prepared_path`` when
    set (checked against ``tokenizer``), else the eval split of ``data.sources``
    (``data.max_documents`` does not apply). Raises EvalError when there is none."""
    e = config.eval
    check_lengths(e.lengths, e.stride, e.max_eval_tokens)
    budget = _Budget(max(e.lengths), e.stride, e.max_eval_tokens // e.stride)
    if config.data.prepared_path:
        documents = _prepared_documents(config.data.prepared_path, tokenizer, budget)
    else:
        documents = _source_documents(config, tokenizer, budget)
    if not documents:
        where = config.data.prepared_path or ", ".join(config.data.sources)
        raise EvalError(
            f"no held-out documents in {where} (data.eval_fraction={config.data.eval_fraction}, "
            f"data.min_doc_chars={config.data.min_doc_chars})"
        )
    return documents


@dataclass
class _Budget:
    max_length: int
    stride: int
    spans_wanted: int
    spans: int = 0

    def add(self, n_tokens: int) -> bool:
        """Count a document; True once the documents so far hold enough spans."""
        self.spans += spans_in(n_tokens, self.max_length, self.stride)
        return self.spans >= self.spans_wanted


def _encode(tokenizer, text: str) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the fast tokenizer itself: no max-length warning for long texts
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text, add_special_tokens=False)


def _source_documents(config: Config, tokenizer, budget: _Budget) -> list[list[int]]:
    from longtune.data.pack import DOC
    from longtune.data.sources import ReadOptions, discover, read_file, split_of

    d = config.data
    if d.eval_fraction <= 0:
        raise EvalError(
            "data.eval_fraction is 0: no documents are held out for evaluation; set "
            "data.eval_fraction > 0 or data.prepared_path"
        )
    opts = ReadOptions(d.text_field, d.min_doc_chars, d.max_doc_chars, d.eval_fraction)
    documents: list[list[int]] = []
    for entry in discover(d.sources, d.min_doc_chars).files:
        # a text file is one document whose split its key decides: skip training files unread
        if entry.kind == "text" and split_of(entry.key, d.eval_fraction) != "eval":
            continue
        for row in read_file(entry, opts):
            if row["kind"] != DOC or row["split"] != "eval":
                continue
            ids = _encode(tokenizer, row["text"])
            documents.append(ids)
            if budget.add(len(ids)):
                return documents
    return documents


def _prepared_documents(path: str, tokenizer, budget: _Budget) -> list[list[int]]:
    import numpy as np
    import pyarrow.parquet as pq

    from longtune.data.manifest import check_manifest, read_manifest
    from longtune.data.sources import resolve
    from longtune.data.tokenize import vocab_hash

    fs, root = resolve(path)
    manifest = read_manifest(fs, root, path)
    check_manifest(manifest, path, vocab_hash(tokenizer), None)
    files = manifest["splits"].get("eval", {}).get("files", [])
    if not files:
        raise EvalError(f"{path} has no eval blocks (was it prepared with data.eval_fraction=0?)")
    documents: list[list[int]] = []
    for name in files:
        with fs.open_input_file(f"{root.rstrip('/')}/{name}") as f:
            table = pq.read_table(f)
        ids = table["input_ids"].combine_chunks().flatten().to_numpy()
        if "loss_mask" in table.column_names:  # drop the padding of a padded remainder block
            ids = ids[table["loss_mask"].combine_chunks().flatten().to_numpy() != 0]
        documents.append(np.asarray(ids, dtype=np.int64).tolist())
        if budget.add(len(ids)):
            break
    return documents
