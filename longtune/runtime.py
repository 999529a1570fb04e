"""Joining or starting Ray, sized so that every stage of a job can run at once."""

from __future__ import annotations

import math
import os

from longtune.config import Config


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
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
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
