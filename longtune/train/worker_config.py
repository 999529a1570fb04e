"""What the driver hands to every training worker: one typed, frozen record, built once."""

from __future__ import annotations

from dataclasses import dataclass, field

from longtune.config import Config, TrackingConfig
from longtune.data.shards import PreparedSplit
from longtune.train.probes import StepProbe


@dataclass(frozen=True)
class WorkerConfig:
    config: Config  # the run's resolved config
    model_path: str  # local directory (or hub id) of the base model
    has_eval: bool  # an "eval" dataset is attached: rank 0 scores held-out blocks at checkpoints
    threads_per_worker: int = 1  # torch threads of a CPU worker
    tracking: TrackingConfig | None = None  # the driver's resolved MLflow store; None = no tracking
    run_id: str | None = None  # the MLflow run rank 0 logs to (the driver starts and ends it)
    probes: tuple[StepProbe, ...] = ()  # called after every optimizer step (tests, debugging)
    # datasets the workers read themselves (data.prepared_reader: workers), by name; the
    # others come through Ray Train's get_dataset_shard
    prepared: dict[str, PreparedSplit] = field(default_factory=dict)
    # the pid of the driver that started this local Ray, when its own processes go to idle
    # CPU priority while the workers train (scaling.local_ray_idle_priority, train/background.py)
    local_ray_driver: int | None = None
