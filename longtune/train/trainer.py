"""The driver side of `longtune finetune`: check, set up and run a Ray Train TorchTrainer.

Reads top to bottom: resolve the model (building the seed model once) -> join or start Ray
-> check resources and storage (fail fast, never hang) -> open the data -> start the MLflow
run -> fit -> log the adapter and curves -> say where everything is.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtune.config import Config


class TrainingSetupError(RuntimeError):
    """The run cannot start as configured; the message says why and what to change."""


@dataclass
class FinetuneResult:
    run_name: str
    checkpoint_path: str  # the final checkpoint (adapter/, optimizer.pt, state.json, ...)
    adapter_path: str
    metrics: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None


@dataclass
class DriverSetup:
    """What a job's driver resolves once before any training run starts."""

    model_path: str  # local directory of the base model (the seed model is built here)
    ray: Any  # the ray module, initialised
    use_gpu: bool
    storage: str  # where Ray Train (and Ray Tune) persist runs: absolute local path or URI


def setup_driver(config: Config) -> DriverSetup:
    """Model, Ray, resources and storage, checked in that order: fail fast, never hang."""
    from longtune.models import model_path
    from longtune.runtime import init_ray
    from longtune.runtime import use_gpu as use_gpu_for

    # Ray Train V2 routes workers' print() to its logger *and* to stdout, which the driver
    # then shows twice; the workers' progress lines are plain prints (Ray forwards them once).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    path = model_path(config.model)  # builds the seed model here, once, not in every worker
    ray = init_ray(config)
    use_gpu = use_gpu_for(config, ray)
    if config.train.strategy == "fsdp":
        # Ray Train's default FSDP wrapping puts frozen base weights and trainable adapter
        # weights in one flat parameter, which FSDP refuses ("Must flatten tensors with
        # uniform requires_grad"), and rank 0 alone would gather the state to save it
        raise TrainingSetupError(
            "train.strategy=fsdp is not supported yet with adapters (FSDP needs "
            "use_orig_params, per-layer wrapping and a collective save); use train.strategy=ddp"
        )
    _check_resources(config, ray, use_gpu)
    return DriverSetup(path, ray, use_gpu, _storage_path(config.train.storage_path, ray))


def open_datasets(config: Config) -> tuple[dict[str, Any], bool]:
    """The run's Ray datasets ("train", and "eval" when held-out blocks are scored) and
    whether there is an eval set."""
    from longtune.data.pipeline import open_blocks

    datasets = {"train": open_blocks(config, "train")}
    has_eval = config.data.eval_fraction > 0 and config.eval.loss_blocks > 0
    if has_eval:
        datasets["eval"] = open_blocks(config, "eval")
    return datasets, has_eval


def build_trainer(
    config: Config,
    setup: DriverSetup,
    *,
    run_name: str,
    datasets: dict[str, Any],
    has_eval: bool,
    tracker=None,
    storage: str | None = None,
    callbacks: list | None = None,
    probes: tuple = (),
):
    """The TorchTrainer of one training run: ``train_loop`` on scaling.num_workers workers,
    rank 0 logging to ``tracker``'s MLflow run. Relaunching the same ``run_name`` in the same
    ``storage`` resumes it from its last checkpoint. ``probes`` (longtune.train.probes) are
    called on every worker after every step."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from longtune.train.loop import train_loop
    from longtune.train.worker_config import WorkerConfig

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # also in Tune's trial actors
    s, t = config.scaling, config.train
    worker = WorkerConfig(
        config=config,
        model_path=setup.model_path,
        has_eval=has_eval,
        threads_per_worker=max(1, math.floor(s.cpus_per_worker)),
        tracking=tracker.cfg if tracker else None,
        run_id=tracker.run_id if tracker else None,
        probes=tuple(probes),
    )
    return TorchTrainer(
        train_loop,
        train_loop_config=worker,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=setup.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage or setup.storage,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=ingest_config(),
    )


def ingest_config():
    """How Ray Train hands the datasets to the workers: "train" split between them, in the
    same order on every run; "eval" whole to each (rank 0 reads it).

    Ray Train replaces a dataset's own execution options with these, and without
    preserve_order its split hands each bundle of blocks to whichever worker needs one as
    the bundles arrive: a resumed run, skipping the batches its checkpoint counts, would
    skip other blocks than the ones it had trained on."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options=options)


def finetune(config: Config, *, console=None, probes: tuple = ()) -> FinetuneResult:
    from rich.console import Console

    console = console or Console(stderr=True)
    s, t = config.scaling, config.train

    # ---------------------------------------------------------------- model, Ray, resources
    setup = setup_driver(config)
    run_name = t.run_name or f"longtune-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = setup.storage

    if config.eval.before_after:  # fail now, not after training, on settings it would reject
        _check_eval_settings(config)

    # ---------------------------------------------------------------- data
    datasets, has_eval = open_datasets(config)

    # ---------------------------------------------------------------- tracking
    tracker = start_tracking(config, run_name)
    run_id = tracker.run_id if tracker else None

    # ---------------------------------------------------------------- fit
    trainer = build_trainer(
        config, setup, run_name=run_name, datasets=datasets, has_eval=has_eval, tracker=tracker,
        probes=probes,
    )
    console.print(
        f"[bold]longtune finetune[/] run [cyan]{run_name}[/]: {config.model.name_or_path} -> "
        f"{config.model.target_context} tokens, {config.adapter.type} r={config.adapter.rank}, "
        f"attention={config.attention.type}, {s.num_workers} worker(s){' on GPU' if setup.use_gpu else ''}, "
        f"{t.max_steps} steps; checkpoints in {storage}/{run_name}"
    )
    try:
        result = trainer.fit()
    except BaseException as exc:
        if tracker:
            tracker.end_run("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise TrainingSetupError(f"training run {run_name} failed: {root_cause(exc)}") from exc
    if result.checkpoint is None:
        if tracker:
            tracker.end_run("FAILED")
        raise TrainingSetupError(f"training run {run_name} ended without a checkpoint")

    # ---------------------------------------------------------------- before / after
    comparison = None
    if config.eval.before_after:
        comparison = _before_and_after(config, setup.model_path, result.checkpoint, setup.use_gpu, setup.ray)
        console.print(_comparison_table(config, comparison))
        if tracker:
            tracker.log_metrics(comparison["before training"], 0)
            tracker.log_metrics(comparison["after training"], t.max_steps)

    # ---------------------------------------------------------------- artifacts
    checkpoint_path = result.checkpoint.path
    adapter_path = f"{checkpoint_path.rstrip('/')}/adapter"
    metrics = dict(result.metrics or {})
    if comparison:
        metrics.update({f"{k}_before": v for k, v in comparison["before training"].items()})
        metrics.update(comparison["after training"])
    if tracker:
        with result.checkpoint.as_directory() as local:
            tracker.log_artifact(Path(local) / "adapter", "adapter")
        tracker.log_loss_curve(curves(tracker, run_id))
        tracker.end_run("FINISHED")
    return FinetuneResult(
        run_name=run_name,
        checkpoint_path=checkpoint_path,
        adapter_path=adapter_path,
        metrics=metrics,
        mlflow_run_id=run_id,
        tracking_uri=tracker.tracking_uri if tracker else None,
    )


def finetune_command(config: Config) -> int:
    from rich.console import Console

    from longtune.data.errors import DataError
    from longtune.models import ModelError

    console = Console(stderr=True)
    try:
        result = finetune(config, console=console)
    except (TrainingSetupError, DataError, ModelError) as err:
        print(f"longtune finetune: {err}", file=sys.stderr)
        return 1
    _print_summary(result, console)
    return 0


# -------------------------------------------------------------------- helpers


def _joined_cluster(config: Config) -> bool:
    return bool(config.scaling.ray_address or os.environ.get("RAY_ADDRESS"))


def _check_resources(config: Config, ray, use_gpu: bool) -> None:
    """Refuse a run whose workers cannot all be placed next to Ray Data, instead of letting
    it wait forever. A cluster we joined may autoscale, so there it only warns."""
    s = config.scaling
    have = ray.cluster_resources()
    need_cpu = s.num_workers * s.cpus_per_worker + 1  # + one CPU for Ray Data's tasks
    problems = []
    if have.get("CPU", 0) < need_cpu:
        problems.append(
            f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU + 1 CPU for Ray Data = {need_cpu:g} "
            f"logical CPUs, the cluster has {have.get('CPU', 0):g} (lower scaling.cpus_per_worker "
            "or scaling.num_workers, or raise scaling.local_num_cpus)"
        )
    if use_gpu and have.get("GPU", 0) < s.num_workers:
        problems.append(f"{s.num_workers} GPU workers, the cluster has {have.get('GPU', 0):g} GPUs")
    if not problems:
        return
    message = "not enough resources: " + "; ".join(problems)
    if _joined_cluster(config):
        print(f"[longtune] warning: {message} (waiting for the autoscaler)")
        return
    raise TrainingSetupError(message)


def _storage_path(configured: str | None, ray) -> str:
    """Where Ray Train persists checkpoints. A multi-node cluster needs shared storage."""
    if configured and "://" in configured:
        return configured
    local = Path(configured or "outputs/ray").expanduser().resolve()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and os.environ.get("LONGTUNE_STORAGE_IS_SHARED") != "1":
        raise TrainingSetupError(
            f"train.storage_path {str(local)!r} is local, but the cluster has {len(nodes)} nodes: "
            "checkpoints must go to shared storage (s3://..., gs://...), or set "
            "LONGTUNE_STORAGE_IS_SHARED=1 if that path is a shared file system on every node"
        )
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def start_tracking(
    config: Config,
    run_name: str,
    *,
    job: str = "finetune",
    parent_run_id: str | None = None,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    system_metrics: bool | None = None,
):
    """The job's MLflow run, started here on the driver (or resumed, with ``run_id``); rank 0
    attaches to it. The resolved tracking config (absolute SQLite path) lets workers write to
    the same store. ``parent_run_id`` nests it (a Tune trial under its search)."""
    if not config.tracking.enabled:
        return None
    from longtune.tracking import Tracker, resolved_config

    cfg = resolved_config(config.tracking)
    if system_metrics is not None:
        cfg = cfg.model_copy(update={"system_metrics": system_metrics})
    tracker = Tracker(cfg)
    tracker.start_run(
        run_name, parent_run_id=parent_run_id, run_id=run_id,
        tags={"longtune.run_name": run_name, "longtune.job": job, **(tags or {})},
    )
    tracker.log_config(config)
    return tracker


def curves(tracker, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of train and eval loss, from the run's MLflow history (Ray
    Train V2's Result keeps only the metrics reported with checkpoints)."""
    curves = {}
    for name, metric in (("train", "loss"), ("eval", "eval_loss")):
        history = tracker.client.get_metric_history(run_id, metric)
        if history:
            curves[name] = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    return curves


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

    return comparison_table(comparison, config.eval.lengths, "held-out perplexity, full attention")


def root_cause(exc: BaseException) -> str:
    while True:  # through `raise ... from` chains and Ray's task/actor error wrappers
        inner = exc.__cause__ or getattr(exc, "cause", None)
        if not isinstance(inner, BaseException) or inner is exc:
            break
        exc = inner
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


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
        console.print(f"MLflow run: {result.mlflow_run_id} in {result.tracking_uri}", soft_wrap=True)
        from longtune.tracking import ui_hint

        console.print(ui_hint(result.tracking_uri), soft_wrap=True)
    console.print(f"Relaunch with train.run_name={result.run_name} to resume this run.", soft_wrap=True)
