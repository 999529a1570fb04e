"""Joining or starting Ray, sized so that every stage of a job can run at once."""

from __future__ import annotations

import logging
import math
import os
import sys

from longtune.config import Config

LOG_LEVEL_ENV = "LONGTUNE_LOG_LEVEL"
"""``info`` (or ``debug``; the CLI's ``--verbose``) shows what the libraries longtune drives
print; unset or ``warning``, a job shows longtune's own lines and real warnings."""

# What those libraries print by default that tells a longtune user nothing: transformers'
# progress bars for every weight load and save and its advisory notices (the "friendly
# reminder" that generation passed the base's original length, which position interpolation
# extended on purpose), MLflow's INFO lines about its database tables and system metrics.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING"}


def verbose() -> bool:
    return os.environ.get(LOG_LEVEL_ENV, "").strip().lower() in ("info", "debug")


def quiet_env() -> dict[str, str]:
    """The environment variables that quiet the libraries (none when verbose)."""
    return {} if verbose() else dict(_QUIET_ENV)


def quiet_libraries() -> None:
    """Quiet transformers, huggingface_hub and MLflow in this process (see ``_QUIET_ENV``),
    whether or not they are imported yet; nothing when ``LONGTUNE_LOG_LEVEL`` asks for more.
    Their warnings and errors still show. A variable the user set wins."""
    if verbose():
        return
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":  # ours, or the user's own choice
            hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(logging.WARNING)


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
    drops the one Ray Train warning above (every other message stays) and quiets the
    libraries as the driver does (``quiet_libraries``)."""
    quiet_libraries()
    logger = logging.getLogger(_CLEANER_LOGGER)
    if _drop_cleaner_noise not in logger.filters:
        logger.addFilter(_drop_cleaner_noise)


def job_runtime_env() -> dict:
    """The runtime environment of every Ray a longtune job starts or joins."""
    env = {"TOKENIZERS_PARALLELISM": "false", **quiet_env()}
    if verbose():
        env[LOG_LEVEL_ENV] = os.environ[LOG_LEVEL_ENV]
    return {"env_vars": env, "worker_process_setup_hook": "longtune.runtime.quiet_ray_workers"}


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
