"""The driver side of a training run (finetune, each Tune trial, replicate's models): set
up, build and fit a Ray Train TorchTrainer whose workers run ``train.loop.train_loop``.

    setup = setup_driver(config)        # model (the seed built once), Ray, resources, storage
    datasets, has_eval = open_datasets(config)
    trainer = build_trainer(config, setup, run_name=..., datasets=datasets, has_eval=has_eval)
    result = fit(trainer, run_name, tracker)   # a Ray Train Result with a final checkpoint

Every check fails fast with a TrainingSetupError that says what to change, never a hang.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longtune.config import Config, outputs_path
from longtune.errors import LongtuneError, root_cause


class TrainingSetupError(LongtuneError, RuntimeError):
    """The run cannot start as configured; the message says why and what to change."""


@dataclass
class DriverSetup:
    """What a job's driver resolves once before any training run starts."""

    model_path: str  # local directory of the base model (the seed model is built here)
    ray: Any  # the ray module, initialised
    use_gpu: bool
    storage: str  # where Ray Train (and Ray Tune) persist runs: absolute local path or URI
    # this driver's pid when it started the local Ray and its processes yield the CPU to the
    # workers while they train (scaling.local_ray_idle_priority; trials get it from the driver)
    local_ray_driver: int | None = None


def setup_driver(config: Config) -> DriverSetup:
    """Model, Ray, resources and storage, checked in that order: fail fast, never hang."""
    from longtune.models import model_path
    from longtune.runtime import init_ray
    from longtune.runtime import use_gpu as use_gpu_for

    # Ray Train V2 routes workers' print() to its logger *and* to stdout, which the driver
    # then shows twice; the workers' progress lines are plain prints (Ray forwards them once).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from longtune.train.parallel import fsdp_model_conflict

    path = model_path(config.model)  # builds the seed model here, once, not in every worker
    conflict = fsdp_model_conflict(config, path)
    if conflict:  # before Ray: the run cannot start as configured
        raise TrainingSetupError(conflict)
    ray = init_ray(config, idle_workers=tasks_while_training(config))
    use_gpu = use_gpu_for(config, ray)
    _check_resources(config, ray, use_gpu)
    return DriverSetup(path, ray, use_gpu, _storage_path(config.train.storage_path, ray), _local_ray_driver(config))


def tasks_while_training(config: Config) -> bool:
    """Whether Ray runs tasks while the run trains: Ray Data's, unless the workers read a
    prepared dataset themselves (data.prepared_reader: workers)."""
    return not (config.data.prepared_path and config.data.prepared_reader == "workers")


def open_datasets(config: Config) -> tuple[dict[str, Any], bool]:
    """The run's datasets ("train", and "eval" when held-out blocks are scored) and whether
    there is an eval set: Ray datasets, or the prepared splits the workers read themselves
    (``data.prepared_reader: workers``, longtune/data/shards.py)."""
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

    from longtune.train.host_memory import worker_env_vars
    from longtune.train.loop import train_loop
    from longtune.train.worker_config import WorkerConfig

    from longtune.data.shards import PreparedSplit

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # also in Tune's trial actors
    s, t = config.scaling, config.train
    prepared = {k: v for k, v in datasets.items() if isinstance(v, PreparedSplit)}
    ray_datasets = {k: v for k, v in datasets.items() if k not in prepared}
    worker = WorkerConfig(
        config=config,
        model_path=setup.model_path,
        has_eval=has_eval,
        threads_per_worker=max(1, math.floor(s.cpus_per_worker)),
        tracking=tracker.cfg if tracker else None,
        run_id=tracker.run_id if tracker else None,
        probes=tuple(probes),
        prepared=prepared,
        local_ray_driver=setup.local_ray_driver if s.local_ray_idle_priority else None,
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
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
            callbacks=callbacks,
            # one malloc arena in a CPU worker: its training thread's buffers stay in the heap
            # from step to step (train/host_memory.py)
            worker_runtime_env={"env_vars": worker_env_vars(t.retain_host_memory, setup.use_gpu)},
            **train_logging(),
        ),
        datasets=ray_datasets or None,
        dataset_config=ingest_config(s.sequence_parallel),
    )


def _local_ray_driver(config: Config) -> int | None:
    """This process's pid when it started the local Ray the run trains on and its processes
    are to yield the CPU to training (scaling.local_ray_idle_priority); else None."""
    from longtune.train import background

    if not (config.scaling.local_ray_idle_priority and background.supported()):
        return None
    return os.getpid() if background.started_local_ray() else None


def train_logging() -> dict:
    """RunConfig's logging_config: Ray Train's INFO lines on the console (the worker group
    requested, started and listed worker by worker, the process group set up, each
    checkpoint's path) only when ``LONGTUNE_LOG_LEVEL`` asks for them; longtune prints the
    run's checkpoint itself. Ray Train's own log files keep every level. Empty on a Ray
    Train older than its LoggingConfig."""
    try:
        from ray.train import LoggingConfig
    except ImportError:
        return {}
    from longtune.runtime import verbose

    return {"logging_config": LoggingConfig(log_level="INFO" if verbose() else "WARNING")}


def ingest_config(sequence_parallel: int = 1):
    """How Ray Train hands the datasets to the workers (longtune/train/ingest.py)."""
    from longtune.train.ingest import ingest_config as build

    return build(sequence_parallel)


def fit(trainer, run_name: str, tracker=None):
    """Run ``trainer`` to the end: its Ray Train Result, which has a final checkpoint. A
    failure ends the MLflow run FAILED (KILLED on Ctrl-C) and is raised as a
    TrainingSetupError naming the run and the error at its root."""
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
    return result


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
    local = Path(configured or outputs_path("ray")).expanduser().resolve()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and os.environ.get("LONGTUNE_STORAGE_IS_SHARED") != "1":
        raise TrainingSetupError(
            f"train.storage_path {str(local)!r} is local, but the cluster has {len(nodes)} nodes: "
            "checkpoints must go to shared storage (s3://..., gs://...), or set "
            "LONGTUNE_STORAGE_IS_SHARED=1 if that path is a shared file system on every node"
        )
    local.mkdir(parents=True, exist_ok=True)
    return str(local)
