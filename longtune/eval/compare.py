"""Several models scored on the same held-out documents, side by side: the before/after
table of `longtune finetune` and the rows of `longtune replicate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from longtune.config import Config


def score_models(
    config: Config, model_path: str, variants: dict[str, dict[str, Any]], *, console=None
) -> dict[str, dict[str, float]]:
    """Metrics (``ppl_<L>``, ``passkey_acc_<L>``, ...) per variant. A variant names the
    context its base is extended to (``target_context``; the base's own context means no
    interpolation) and optionally an ``adapter`` directory. All variants read the same
    held-out documents, tokenized once."""
    from longtune.adapters import load_adapter
    from longtune.eval.perplexity import load_eval_documents
    from longtune.eval.report import evaluate_model
    from longtune.models import load_model, load_tokenizer_for
    from longtune.precision import resolve_precision

    on_gpu = torch.cuda.is_available()
    weights = resolve_precision(config.model, config.train, "cuda" if on_gpu else "cpu").weights
    tokenizer = load_tokenizer_for(config.model)
    documents, examples = None, None
    if config.data.format == "sft":
        from longtune.eval.sft import load_eval_examples

        examples = load_eval_examples(config, tokenizer)
    elif config.eval.lengths:
        documents = load_eval_documents(config, tokenizer)
    results = {}
    for name, variant in variants.items():
        model_cfg = config.model.model_copy(
            update={"target_context": variant.get("target_context", config.model.target_context)}
        )
        model, _ = load_model(model_cfg, on_gpu=on_gpu, for_training=False, path=model_path, dtype=weights)
        if variant.get("adapter"):
            model = load_adapter(model, variant["adapter"])
        model.to("cuda" if on_gpu else "cpu")
        if console is not None:
            console.print(f"[bold]scoring[/] {name}")
        results[name] = evaluate_model(
            model, tokenizer, config, documents=documents, examples=examples, console=console
        )
        del model
    return results


def comparison_table(results: dict[str, dict[str, float]], lengths: list[int], title: str):
    """A rich table: one row per variant, perplexity (and passkey accuracy) per length."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model")
    sft = [k for k, _ in _SFT if any(k in r for r in results.values())]
    lengths = [] if sft else lengths  # SFT data is scored by response, not by length
    for length in lengths:
        table.add_column(f"ppl @ {length}", justify="right")
    for key in sft:
        table.add_column(dict(_SFT)[key], justify="right")
    with_passkey = any(k.startswith("passkey_acc_") for r in results.values() for k in r)
    if with_passkey:
        table.add_column("passkey", justify="right")
    for name, metrics in results.items():
        cells = [f"{metrics[f'ppl_{n}']:.2f}" if f"ppl_{n}" in metrics else "-" for n in lengths]
        cells += [_sft_cell(metrics, key) for key in sft]
        if with_passkey:
            # by length, not by key: "passkey_acc_1024" sorts before "passkey_acc_256"
            keys = sorted((k for k in metrics if k.startswith("passkey_acc_")), key=lambda k: int(k.rsplit("_", 1)[1]))
            accs = [f"{metrics[k]:.0%}" for k in keys]
            cells.append(" / ".join(accs))
        table.add_row(name, *cells)
    return table


# data.format sft: the figures instead of perplexity by length, with their column titles
_SFT = (("response_loss", "response loss"), ("exact_match", "exact match"))


def _sft_cell(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return "-"
    if key == "exact_match":
        return f"{metrics[key]:.0%} of {int(metrics.get('exact_match_trials', 0))}"
    return f"{metrics[key]:.3f}"


# a length's figures, in the order the tables show them: (metric prefix, column prefix)
_BY_LENGTH = (("ppl_", "ppl_"), ("passkey_acc_", "passkey_"), ("eval_nll_", "nll_"), ("eval_tokens_", "tokens_"))


def comparison_columns(results: dict[str, dict[str, float]]) -> dict[str, list]:
    """The results as table columns (the MLflow table artifact): ``model`` (the row names),
    then per length ``ppl_<L>``, ``passkey_<L>`` (accuracy), ``nll_<L>``, ``tokens_<L>``
    (scored tokens), by length, then any other figure under its own name; None where a
    model has no such figure."""
    keys: list[str] = []
    for metrics in results.values():
        keys += [k for k in metrics if k not in keys]
    columns: dict[str, list] = {"model": list(results)}
    by_length = set()
    for prefix, column in _BY_LENGTH:
        found = sorted((k for k in keys if k.startswith(prefix) and k[len(prefix):].isdigit()),
                       key=lambda k: int(k[len(prefix):]))
        for key in found:
            columns[column + key[len(prefix):]] = [results[m].get(key) for m in results]
        by_length.update(found)
    for key in keys:
        if key not in by_length:
            columns[key] = [results[m].get(key) for m in results]
    return columns


def comparison_markdown(results: dict[str, dict[str, float]], lengths: list[int]) -> str:
    """The comparison table in markdown (a run's description in MLflow's UI): one row per
    model, perplexity at each of ``lengths``, then passkey accuracy at each length scored."""
    passkey = sorted({int(k.rsplit("_", 1)[1]) for r in results.values() for k in r
                      if k.startswith("passkey_acc_") and k.rsplit("_", 1)[1].isdigit()})
    sft = [k for k, _ in _SFT if any(k in r for r in results.values())]
    lengths = [] if sft else lengths
    header = ["model", *(f"ppl @ {n:,}" for n in lengths), *(dict(_SFT)[k] for k in sft),
              *(f"passkey @ {n:,}" for n in passkey)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|"]
    for name, metrics in results.items():
        cells = [f"{metrics[f'ppl_{n}']:.2f}" if f"ppl_{n}" in metrics else "-" for n in lengths]
        cells += [_sft_cell(metrics, k) for k in sft]
        cells += [f"{metrics[f'passkey_acc_{n}']:.0%}" if f"passkey_acc_{n}" in metrics else "-" for n in passkey]
        lines.append("| " + " | ".join([name.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines)


def check_eval_settings(config: Config, tokenizer) -> None:
    """Raise EvalError now for settings that would only fail once training is over: lengths
    against the stride, passkey prompts that cannot fit their length."""
    from longtune.data.passkey import passkey_for_tokens
    from longtune.eval.errors import EvalError
    from longtune.eval.perplexity import check_lengths

    e = config.eval
    check_lengths(e.lengths, e.stride, e.max_eval_tokens)
    if e.passkey_trials:
        for n in e.passkey_lengths:
            try:
                passkey_for_tokens(tokenizer, n, e.passkey_seed)
            except ValueError as exc:
                raise EvalError(f"eval.passkey_lengths: {n} is too short ({exc})") from None


def score_here(config: Config, model_path: str, variants: dict[str, dict[str, Any]]):
    """``score_models`` as the body of a Ray task run after training: on a CPU it takes
    every core (the training workers are done by then)."""
    if not torch.cuda.is_available():
        import os

        torch.set_num_threads(os.cpu_count() or 1)
    return score_models(config, model_path, variants)


def before_and_after(config: Config, model_path: str, checkpoint) -> dict[str, dict[str, float]]:
    """The interpolated base and base + the checkpoint's adapter (the trainer runs this as a
    Ray task on the job's kind of device; the checkpoint may live on remote storage)."""
    with checkpoint.as_directory() as directory:
        return score_here(config, model_path, {
            "before training": {},
            "after training": {"adapter": str(Path(directory) / "adapter")},
        })
