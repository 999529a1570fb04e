"""`longtune evaluate`: load the model as configured, score perplexity by context length and
passkey retrieval with full attention, print a table, log everything to MLflow.

Reads top to bottom: check paths (fail fast, one line) -> tokenizer and held-out documents
-> base model with position interpolation to model.target_context, plus the adapter in
model.adapter_path -> perplexity and passkey (``run_evaluation``) -> MLflow run tagged
``longtune.job=evaluate``: the config and the resolved model facts as params; metrics
``ppl_<L>``, ``passkey_acc_<L>`` (step 0; in MLflow ``eval/ppl_<L>``, ``eval/passkey_<L>``)
and the curves ``ppl_vs_length`` / ``passkey_acc_vs_length`` (step = length); artifacts
``plots/perplexity_vs_length.png``, ``plots/passkey_vs_length.png``,
``eval/results.json`` (every length's scores and every passkey trial) and the table
artifact ``eval_table.json`` (one row per length); the description: the model and the
table -> the table.

``evaluate_model`` is the same evaluation for a model already in memory (the finetune
pipeline calls it before and after training).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from longtune.config import SEED_MODEL, Config, default_run_name
from longtune.errors import one_line
from longtune.eval.errors import EvalError
from longtune.eval.passkey import PasskeyReport, passkey_retrieval
from longtune.eval.perplexity import PerplexityReport, load_eval_documents, perplexity

PPL_PLOT = "perplexity_vs_length.png"
PASSKEY_PLOT = "passkey_vs_length.png"
EVAL_TABLE = "eval_table.json"


@dataclass
class EvalReport:
    perplexity: PerplexityReport | None
    passkey: PasskeyReport
    model_info: dict[str, Any] = field(default_factory=dict)  # original/target context, factor, ...
    sft: dict[str, float] | None = None  # response_loss, exact_match (data.format sft)

    def metrics(self) -> dict[str, float]:
        """``ppl_<L>``, ``eval_nll_<L>``, ``eval_tokens_<L>``, ``passkey_acc_<L>``; for SFT
        data ``response_loss``, ``exact_match``, ``exact_match_trials`` instead of perplexity."""
        out = self.perplexity.metrics() if self.perplexity else {}
        out.update(self.sft or {})
        out.update(self.passkey.metrics())
        return out

    def to_dict(self) -> dict[str, Any]:
        ppl = self.perplexity
        return {
            "model": self.model_info,
            "perplexity": None
            if ppl is None
            else {
                "stride": ppl.stride,
                "documents": ppl.documents,
                "documents_used": ppl.documents_used,
                "documents_too_short": ppl.documents_too_short,
                "spans": ppl.spans,
                "spans_available": ppl.spans_available,
                "lengths": [asdict(s) for s in ppl.scores.values()],
            },
            "sft": self.sft,
            "passkey": {
                "lengths": [
                    {**asdict(s), "accuracy": s.accuracy} for s in self.passkey.scores.values()
                ],
                "trials": [asdict(t) for t in self.passkey.trials],
            },
        }


# ---------------------------------------------------------------- evaluation


def run_evaluation(
    model,
    tokenizer,
    config: Config,
    *,
    documents: list[list[int]] | None = None,
    examples=None,
    console=None,
    progress: bool = True,
) -> EvalReport:
    """Perplexity at ``eval.lengths`` (for SFT data: response loss and exact match on
    held-out examples instead, ``longtune.eval.sft``) and passkey retrieval at
    ``eval.passkey_lengths`` for a model in memory, full attention, in eval mode (its mode
    and attention are restored after). ``documents`` (token ids from
    ``load_eval_documents``) and ``examples`` (``load_eval_examples``) are read when not given."""
    e = config.eval
    ppl = None
    sft = None
    if config.data.format == "sft":
        from longtune.eval.sft import load_eval_examples, sft_scores

        if examples is None:
            examples = load_eval_examples(config, tokenizer)
        if examples:
            sft = sft_scores(model, tokenizer, examples, answer_tokens=e.sft_answer_tokens,
                             console=console, progress=progress)
    elif e.lengths:
        if documents is None:
            documents = load_eval_documents(config, tokenizer)
        ppl = perplexity(
            model,
            documents,
            e.lengths,
            stride=e.stride,
            max_eval_tokens=e.max_eval_tokens,
            batch_size=e.batch_size,
            console=console,
            progress=progress,
        )
    passkey = passkey_retrieval(
        model,
        tokenizer,
        e.passkey_lengths,
        e.passkey_trials,
        seed=e.passkey_seed,
        console=console,
        progress=progress,
    )
    return EvalReport(ppl, passkey, sft=sft)


def evaluate_model(
    model,
    tokenizer,
    config: Config,
    *,
    documents: list[list[int]] | None = None,
    examples=None,
    console=None,
    progress: bool = True,
) -> dict[str, float]:
    """``run_evaluation(...).metrics()``: {"ppl_256": ..., "eval_nll_256": ...,
    "eval_tokens_256": ..., "passkey_acc_256": ..., ...}."""
    return run_evaluation(
        model, tokenizer, config, documents=documents, examples=examples, console=console,
        progress=progress,
    ).metrics()


# ---------------------------------------------------------------- presenting


def results_table(report: EvalReport, title: str = "longtune evaluate"):
    """A rich table: one row per length, perplexity and passkey accuracy side by side."""
    from rich.table import Table

    ppl = report.perplexity.scores if report.perplexity else {}
    keys = report.passkey.scores
    info = report.model_info
    caption = None
    if info.get("original_context"):
        caption = (
            f"trained context {info['original_context']:,}, read at up to "
            f"{info['target_context']:,} (linear position interpolation x{info['rope_factor']:g})"
        )
    table = Table(title=title, caption=caption)
    table.add_column("length", justify="right")
    table.add_column("scored tokens", justify="right")
    table.add_column("NLL", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("passkey", justify="right")
    for n in sorted(set(ppl) | set(keys)):
        s, k = ppl.get(n), keys.get(n)
        table.add_row(
            f"{n:,}",
            f"{s.tokens:,}" if s else "-",
            f"{s.nll:.4f}" if s else "-",
            f"{s.ppl:.2f}" if s else "-",
            f"{k.passed}/{k.trials} ({k.accuracy:.0%})" if k else "-",
        )
    if report.sft:  # SFT data: scored by response, not by length
        sft = Table(title=f"{title}: held-out SFT examples, full attention", caption=caption)
        sft.add_column("response loss", justify="right")
        sft.add_column("exact match", justify="right")
        trials = int(report.sft["exact_match_trials"])
        match = report.sft.get("exact_match")
        sft.add_row(f"{report.sft['response_loss']:.4f}",
                    f"{round(match * trials)}/{trials} ({match:.0%})" if match is not None else "-")
        if not (ppl or keys):
            return sft
        from rich.console import Group

        return Group(sft, table)
    return table


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _mark_contexts(ax, info: dict[str, Any]) -> None:
    for key, label, style in (("original_context", "trained", ":"), ("target_context", "target", "--")):
        if info.get(key):
            ax.axvline(info[key], color="grey", linestyle=style, linewidth=1, label=f"{label} context")


def _save(fig, ax, path: str | os.PathLike[str]) -> Path:
    ax.set_xscale("log", base=2)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_perplexity(report: EvalReport, path: str | os.PathLike[str]) -> Path | None:
    """PNG of perplexity against context length (log2 axis); None without scores."""
    scores = report.perplexity.scores if report.perplexity else {}
    points = [(n, s.ppl) for n, s in sorted(scores.items()) if math.isfinite(s.ppl)]
    if not points:
        return None
    fig, ax = _figure()
    ax.plot([n for n, _ in points], [p for _, p in points], marker="o", label="perplexity")
    _mark_contexts(ax, report.model_info)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    scored = report.perplexity.spans * report.perplexity.stride
    ax.set_title(f"perplexity vs context length (the same {scored:,} tokens)")
    return _save(fig, ax, path)


def plot_passkey(report: EvalReport, path: str | os.PathLike[str]) -> Path | None:
    """PNG of passkey accuracy against prompt length (log2 axis); None without trials."""
    scores = sorted(report.passkey.scores.items())
    if not scores:
        return None
    fig, ax = _figure()
    ax.plot([n for n, _ in scores], [s.accuracy for _, s in scores], marker="o", label="accuracy")
    _mark_contexts(ax, report.model_info)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("passkey accuracy")
    ax.set_title(f"passkey retrieval ({scores[0][1].trials} trials per length)")
    return _save(fig, ax, path)


def log_report(tracker, report: EvalReport) -> None:
    """Metrics, length curves, plots and results.json into the tracker's run."""
    tracker.log_metrics(report.metrics(), step=0)
    if report.perplexity:
        for n, s in report.perplexity.scores.items():
            tracker.log_metrics({"ppl_vs_length": s.ppl}, step=n)
    for n, s in report.passkey.scores.items():
        tracker.log_metrics({"passkey_acc_vs_length": s.accuracy}, step=n)
    with tempfile.TemporaryDirectory(prefix="longtune-eval-") as tmp:
        for png in (plot_perplexity(report, Path(tmp) / PPL_PLOT), plot_passkey(report, Path(tmp) / PASSKEY_PLOT)):
            if png is not None:
                tracker.log_artifact(png, "plots")
        results = Path(tmp) / "results.json"
        results.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        tracker.log_artifact(results, "eval")
    tracker.log_table(length_columns(report), EVAL_TABLE)


def length_columns(report: EvalReport) -> dict[str, list]:
    """One row per length: ``length``, ``ppl``, ``nll``, ``tokens`` (scored), ``passkey``
    (accuracy); None where a length has no such score."""
    ppl = report.perplexity.scores if report.perplexity else {}
    keys = report.passkey.scores
    lengths = sorted(set(ppl) | set(keys))
    return {
        "length": lengths,
        "ppl": [ppl[n].ppl if n in ppl else None for n in lengths],
        "nll": [ppl[n].nll if n in ppl else None for n in lengths],
        "tokens": [ppl[n].tokens if n in ppl else None for n in lengths],
        "passkey": [keys[n].accuracy if n in keys else None for n in lengths],
    }


def description(config: Config, report: EvalReport) -> str:
    """The evaluate run's description (markdown): the model as read, and its scores."""
    m, info = config.model, report.model_info
    model = m.name_or_path + (f" + adapter `{m.adapter_path}`" if m.adapter_path else "")
    lines = [f"**longtune evaluate** {model}", ""]
    if info.get("original_context"):
        lines += [f"trained context {info['original_context']:,}, positions interpolated to "
                  f"{info['target_context']:,} (x{info['rope_factor']:g}); full attention", ""]
    if report.sft:
        match = report.sft.get("exact_match")
        lines += ["| held-out SFT examples | |", "| --- | ---: |",
                  f"| response loss | {report.sft['response_loss']:.4f} |",
                  f"| exact match | {'-' if match is None else f'{match:.0%}'} of "
                  f"{int(report.sft['exact_match_trials'])} |", ""]
    columns = length_columns(report)
    if not columns["length"]:
        return "\n".join(lines)
    lines += ["| length | perplexity | passkey |", "| ---: | ---: | ---: |"]
    for n, p, k in zip(columns["length"], columns["ppl"], columns["passkey"]):
        lines.append(f"| {n:,} | {'-' if p is None else f'{p:.2f}'} | {'-' if k is None else f'{k:.0%}'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the job


def evaluate_command(config: Config) -> int:
    from rich.console import Console

    evaluate(config, console=Console(stderr=True), out=Console())
    return 0


def evaluate(config: Config, *, console=None, out=None) -> tuple[EvalReport, str | None]:
    """The job: returns the report and the MLflow run id (None with tracking off)."""
    import torch
    from rich.console import Console

    from longtune.attention import use_full_attention
    from longtune.models import load_model, load_tokenizer_for
    from longtune.precision import resolve_precision

    console = console or Console(stderr=True)
    out = out or Console()
    m = config.model

    # ---------------------------------------------------------------- paths, data
    _check_paths(config)
    tokenizer = load_tokenizer_for(m, config.data.tokenizer)
    documents = None  # SFT data is scored by response (longtune.eval.sft), read in run_evaluation
    if config.eval.lengths and config.data.format != "sft":
        documents = load_eval_documents(config, tokenizer)

    # ---------------------------------------------------------------- model
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    # the weights training would load (train.precision=fp32: fp32 on a GPU too); scored
    # without autocast, as before
    weights = resolve_precision(m, config.train, device).weights
    model, info = load_model(m, on_gpu=on_gpu, for_training=False, dtype=weights)
    if m.adapter_path:
        model = _with_adapter(model, m.adapter_path)
    model = use_full_attention(model).to(device).eval()
    info = {**info, "adapter_path": m.adapter_path, "device": device}
    console.print(
        f"[bold]longtune evaluate[/] {m.name_or_path}{' + ' + m.adapter_path if m.adapter_path else ''}: "
        f"trained context {info['original_context']:,}, positions interpolated to "
        f"{info['target_context']:,} (x{info['rope_factor']:g}); lengths {config.eval.lengths}, "
        f"passkey {config.eval.passkey_lengths} x {config.eval.passkey_trials}"
    )

    # ---------------------------------------------------------------- tracking
    tracker = _start_tracking(config, info)

    # ---------------------------------------------------------------- evaluate
    try:
        report = run_evaluation(model, tokenizer, config, documents=documents, console=console)
        report.model_info = info
        if tracker:
            log_report(tracker, report)
            tracker.set_description(description(config, report))
    except BaseException as exc:
        if tracker:
            tracker.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    if tracker:
        tracker.end_run("FINISHED")

    # ---------------------------------------------------------------- summary
    title = f"longtune evaluate: {m.name_or_path}" + (" + adapter" if m.adapter_path else "")
    out.print(results_table(report, title))
    if report.perplexity:
        out.print(report.perplexity.summary(), soft_wrap=True)
    run_id = tracker.run_id if tracker else None
    if tracker:
        from longtune.tracking import redact_uri, ui_hint

        out.print(f"MLflow run: {run_id} in {redact_uri(tracker.tracking_uri)}", soft_wrap=True)
        out.print(ui_hint(tracker.tracking_uri, tracker.experiment_id, run_id), soft_wrap=True)
    return report, run_id


def _check_paths(config: Config) -> None:
    """A local model or adapter path that does not exist fails here, in one line, before
    anything is loaded (and a typo never becomes a hub lookup)."""
    name = config.model.name_or_path
    if name != SEED_MODEL and name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise EvalError(f"model path {name!r} does not exist (model.name_or_path)")
    adapter = config.model.adapter_path
    if adapter and not Path(adapter).expanduser().exists():
        raise EvalError(f"adapter path {adapter!r} does not exist (model.adapter_path)")


def _with_adapter(model, path: str):
    from longtune.adapters import load_adapter

    try:
        return load_adapter(model, Path(path).expanduser(), trainable=False)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalError(f"cannot load the adapter in {path!r}: {one_line(exc)}") from None


def _start_tracking(config: Config, info: dict[str, Any]):
    from longtune.tracking import start_job_run

    tracker = start_job_run(config, default_run_name("evaluate"), job="evaluate")
    if tracker is None:
        return None
    tracker.log_params({f"resolved.{k}": v for k, v in info.items()})
    return tracker
