"""`longtune finetune`: extend a model's context on Ray Train, then show what it gained.

Reads top to bottom: set up the driver (model, Ray, resources, storage: longtune.train) ->
check the eval settings it would reject after training -> open the data -> start the MLflow
run (its description: model, context, adapter, attention) -> fit -> score the interpolated
base and the tuned model on the same held-out text (the before/after table: in the run's
description and as its table artifact ``before_after.json``) -> log the adapter and curves
-> say where everything is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtune.config import Config, default_run_name
from longtune.errors import root_cause
from longtune.train.trainer import TrainingSetupError, build_trainer, fit, open_datasets, setup_driver


@dataclass
class FinetuneResult:
    run_name: str
    checkpoint_path: str  # the final checkpoint (adapter/, optimizer.pt, state.json, ...)
    adapter_path: str
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None
    mlflow_experiment_id: str | None = None


def finetune(config: Config, *, console=None, probes: tuple = ()) -> FinetuneResult:
    from rich.console import Console

    from longtune.storage import check_stores, job_stores
    from longtune.tracking import loss_curves, start_job_run

    console = console or Console(stderr=True)
    s, t = config.scaling, config.train

    # ---------------------------------------------------------------- stores, model, Ray, resources
    check_stores(job_stores(config, "finetune"))  # a bad bucket, endpoint or credentials: one line now
    setup = setup_driver(config)
    run_name = t.run_name or default_run_name("longtune")

    if config.eval.before_after:  # fail now, not after training, on settings it would reject
        _check_eval_settings(config)

    # ---------------------------------------------------------------- data
    datasets, has_eval = open_datasets(config)

    # ---------------------------------------------------------------- tracking
    tracker = start_job_run(config, run_name, job="finetune")
    if tracker:
        description = run_description(config, run_name, _original_context(config, setup.model_path))
        tracker.set_description(description)

    # ---------------------------------------------------------------- fit
    trainer = build_trainer(
        config, setup, run_name=run_name, datasets=datasets, has_eval=has_eval, tracker=tracker,
        probes=probes,
    )
    console.print(
        f"[bold]longtune finetune[/] run [cyan]{run_name}[/]: {config.model.name_or_path} -> "
        f"{config.model.target_context} tokens, {config.adapter.type} r={config.adapter.rank}, "
        f"attention={config.attention.type}, {s.num_workers} worker(s){' on GPU' if setup.use_gpu else ''}, "
        f"{t.max_steps} steps; checkpoints in {setup.storage}/{run_name}"
    )
    result = fit(trainer, run_name, tracker)

    # ---------------------------------------------------------------- before / after
    comparison = None
    if config.eval.before_after:
        comparison = _before_and_after(config, setup.model_path, result.checkpoint, setup.use_gpu, setup.ray)
        console.print(_comparison_table(config, comparison))
        if tracker:
            tracker.log_metrics(comparison["before training"], 0)
            tracker.log_metrics(comparison["after training"], t.max_steps)
            tracker.set_description(description + "\n\n" + _comparison_markdown(config, comparison))
            from longtune.eval.compare import comparison_columns

            tracker.log_table(comparison_columns(comparison), BEFORE_AFTER_TABLE)

    # ---------------------------------------------------------------- artifacts
    checkpoint_path = result.checkpoint.path
    metrics = dict(result.metrics or {})
    if comparison:
        metrics.update({f"{k}_before": v for k, v in comparison["before training"].items()})
        metrics.update(comparison["after training"])
    if tracker:
        with result.checkpoint.as_directory() as local:
            tracker.log_artifact(Path(local) / "adapter", "adapter")
        tracker.log_loss_curve(loss_curves(tracker))
        tracker.end_run("FINISHED")
    return FinetuneResult(
        run_name=run_name,
        checkpoint_path=checkpoint_path,
        adapter_path=f"{checkpoint_path.rstrip('/')}/adapter",
        metrics=metrics,
        mlflow_run_id=tracker.run_id if tracker else None,
        tracking_uri=tracker.tracking_uri if tracker else None,
        mlflow_experiment_id=tracker.experiment_id if tracker else None,
    )


def finetune_command(config: Config) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    _print_summary(finetune(config, console=console), console)
    return 0


# -------------------------------------------------------------------- the run's description

BEFORE_AFTER_TABLE = "before_after.json"


def run_description(config: Config, run_name: str, original_context: int | None = None) -> str:
    """The MLflow run's description (markdown): what was trained, in a few lines."""
    m, a, at, t, s = config.model, config.adapter, config.attention, config.train, config.scaling
    context = f"{m.target_context:,} tokens"
    if original_context and original_context != m.target_context:
        context = (f"{original_context:,} -> {context} (position interpolation "
                   f"x{m.target_context / original_context:g})")
    adapter = f"{a.type} r={a.rank}, alpha={a.alpha:g}"
    if a.target_modules:
        adapter += f" on {', '.join(a.target_modules)}"
    if a.trainable_modules:
        adapter += f"; also trained: {', '.join(a.trainable_modules)}"
    if at.type == "s2":
        group = f"{at.group_size} tokens" if at.group_size else f"{at.group_size_ratio:g} of the context"
        attention = f"S2-Attn (groups of {group}, shift {at.shift}); evaluated with full attention"
    else:
        attention = "full"
    rows = [("model", m.name_or_path), ("context", context), ("adapter", adapter), ("attention", attention),
            ("training", f"{t.max_steps:,} steps, {s.num_workers} worker(s) x {t.batch_size_per_worker} "
                         f"block(s) x {t.grad_accum_steps} micro-batch(es), lr {t.lr:g}")]
    if config.data.format == "sft":
        sft = config.data.sft
        rows.insert(1, ("data", f"SFT: {', '.join(config.data.sources)}, template {sft.template}, loss on "
                                f"{'every token' if sft.train_on_prompt else 'responses only'}, overlong "
                                f"examples {'truncated' if sft.overlong == 'truncate' else 'dropped'}"))
    lines = [f"**longtune finetune** `{run_name}`", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a markdown table cell's own bars, escaped


def _original_context(config: Config, model_path: str) -> int | None:
    """The base's trained context, for the description (None when its config says nothing)."""
    from transformers import AutoConfig

    from longtune.models import ModelError, original_context

    try:
        return original_context(AutoConfig.from_pretrained(model_path), config.model)
    except ModelError:
        return None


def _comparison_markdown(config: Config, comparison: dict[str, dict[str, float]]) -> str:
    from longtune.eval.compare import comparison_markdown

    what = ("response loss and exact match on held-out examples" if config.data.format == "sft"
            else "held-out perplexity and passkey retrieval")
    return (f"**Before / after training** ({what}, full attention)\n\n"
            + comparison_markdown(comparison, config.eval.lengths))


# -------------------------------------------------------------------- before / after


def _before_and_after(config: Config, model_path: str, checkpoint, use_gpu: bool, ray):
    """Score base and tuned model in a Ray task on the job's kind of device, not on the
    driver (which, on a cluster, may have no GPU)."""
    from longtune.eval.compare import before_and_after

    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(before_and_after)
    try:
        return ray.get(task.remote(config, model_path, checkpoint))
    except Exception as exc:  # training succeeded; say why scoring did not
        raise TrainingSetupError(f"scoring the tuned model failed: {root_cause(exc)}") from exc


def _check_eval_settings(config: Config) -> None:
    from longtune.eval import EvalError
    from longtune.eval.compare import check_eval_settings
    from longtune.models import load_tokenizer_for

    try:
        check_eval_settings(config, load_tokenizer_for(config.model))
    except EvalError as err:
        raise TrainingSetupError(f"{err} (or set eval.before_after=false)") from None


def _comparison_table(config: Config, comparison: dict[str, dict[str, float]]):
    from longtune.eval.compare import comparison_table

    title = ("held-out SFT examples, full attention" if config.data.format == "sft"
             else "held-out perplexity, full attention")
    return comparison_table(comparison, config.eval.lengths, title)


def _print_summary(result: FinetuneResult, console) -> None:
    from rich.table import Table

    table = Table(title=f"longtune finetune: {result.run_name}", show_header=False)
    for key in ("step", "loss", "eval_loss", "eval_ppl", "tokens_per_s", "peak_memory_mb"):
        if key in result.metrics:
            table.add_row(key, f"{result.metrics[key]:.4g}")
    console.print(table)
    # paths and commands in full, outside the table, so they can be copied
    console.print(f"adapter:    {result.adapter_path}", soft_wrap=True)
    console.print(f"checkpoint: {result.checkpoint_path}", soft_wrap=True)
    if result.mlflow_run_id:
        from longtune.tracking import redact_uri, ui_hint

        console.print(f"MLflow run: {result.mlflow_run_id} in {redact_uri(result.tracking_uri)}", soft_wrap=True)

        console.print(ui_hint(result.tracking_uri, result.mlflow_experiment_id, result.mlflow_run_id),
                      soft_wrap=True)
    console.print(f"Relaunch with train.run_name={result.run_name} to resume this run.", soft_wrap=True)
