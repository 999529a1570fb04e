"""Joining or starting Ray, sized so that every stage of a job can run at once."""

from __future__ import annotations

import logging
import math
import os

from longtune.config import Config


# Ray Train 2.60's detached PlacementGroupCleaner asks the state API, served by the dashboard,
# whether the controller lives; a local Ray started without the dashboard makes every ask fail
# and the cleaner logs this warning at every check, hundreds of lines in a short run (its
# clean-up of a crashed controller's placement group cannot run there either way).
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_CLEANER_NOISE = "Failed to query Ray Train Controller actor state"


def _drop_cleaner_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_CLEANER_NOISE)


def quiet_ray_workers() -> None:
    """Every worker process of a longtune job runs this first (``worker_process_setup_hook``):
    drops the one Ray Train warning above; every other message stays."""
    logger = logging.getLogger(_CLEANER_LOGGER)
    if _drop_cleaner_noise not in logger.filters:
        logger.addFilter(_drop_cleaner_noise)


def job_runtime_env() -> dict:
    """The runtime environment of every Ray a longtune job starts or joins."""
    return {"env_vars": {"TOKENIZERS_PARALLELISM": "false"},
            "worker_process_setup_hook": "longtune.runtime.quiet_ray_workers"}


def local_cpus_needed(config: Config) -> int:
    """Logical CPUs a local Ray needs so training workers, tokenizer actors and Ray Data's
    read tasks all fit together. Sized too small, a Ray Data + Ray Train job waits forever:
    the read tasks queue behind the CPUs that actors and workers hold."""
    s = config.scaling
    if s.local_num_cpus is not None:
        return s.local_num_cpus
    workers = math.ceil(s.num_workers * s.cpus_per_worker)
    # one CPU per tokenizer actor, two for read/pack tasks and the trainer's coordinator
    return max(os.cpu_count() or 1, workers + config.data.tokenize_concurrency + 2)


def use_gpu(config: Config, ray) -> bool:
    """scaling.use_gpu, with "auto" meaning: when the cluster has GPUs."""
    if config.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(config.scaling.use_gpu)


def init_ray(config: Config, *, log_to_driver: bool = True):
    """Join the cluster named by scaling.ray_address or $RAY_ADDRESS (`ray job submit` sets
    it; `RAY_ADDRESS=auto` joins a `ray start` cluster on this machine), else start a local
    Ray sized by ``local_cpus_needed``. Never joins an unnamed cluster: Ray cannot tell a
    `ray start` head from another program's `ray.init()`, whose workers may run other code.
    Returns the ray module."""
    import ray

    if ray.is_initialized():
        return ray
    address = config.scaling.ray_address or os.environ.get("RAY_ADDRESS")
    runtime_env = job_runtime_env()
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(
            num_cpus=local_cpus_needed(config),
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
            include_dashboard=False,
        )
    return ray
