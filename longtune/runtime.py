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
# reminder" that generation passed max_position_embeddings: the passkey test at the target
# context fills it with the prompt, and the key's digits come after it, by design),
# MLflow's INFO lines about its database tables and system metrics,
# Ray Data's progress bars (a worker's are drawn by the driver: line after line when stdout
# is not a terminal; ``quiet_ray_data`` also turns off those of datasets the driver creates).
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "MLFLOW_LOGGING_LEVEL": "WARNING",
              "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


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
    if "ray.data" in sys.modules:
        quiet_ray_data()


# What Ray prints that a longtune user cannot act on, dropped by logger and opening words in
# the driver and in every worker of the job (``--verbose`` keeps them):
# - Ray Train's detached PlacementGroupCleaner asks the state API whether the controller
#   lives, and says so at every check (once a second) when it cannot ask: in a Ray longtune
#   starts without scaling.local_dashboard (``init_ray``), in a cluster it joins started
#   with ``ray start --include-dashboard=false`` or from a minimal Ray install.
# - Ray Data's notice that progress bars are off (longtune turns them off: ``quiet_env``),
#   and the line that closes each dataset's progress bar, logged too ("✔️  Dataset
#   train_... execution finished in 30.08 seconds"); a failed execution's line stays.
# - (Not Ray's:) bitsandbytes, imported on a CPU with AVX512-BF16, says it could not fetch
#   a faster kernel for 4-bit *inference* from the hub; longtune turns that path off
#   (``longtune.models.keep_4bit_layout``) and runs offline.
_NOISE: tuple[tuple[str, str], ...] = (
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Failed to query Ray Train Controller actor state"),
    ("ray.data._internal.progress", "Progress bars disabled."),
    ("ray.data._internal.execution.streaming_executor", "\N{HEAVY CHECK MARK}"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)
# Only in a local Ray:
# - Ray's warning, at every start, that it enabled token authentication for the local
#   cluster (its default since 2.59; RAY_AUTH_MODE set before the start opts out). Setting
#   RAY_AUTH_MODE=token in the job instead, once Ray is imported, makes Ray 2.60 skip making
#   a fresh home's token and its GCS dies at start.
# - Ray Train's ask of Ray Data's autoscaling coordinator for the workers' resources times
#   out (5 s) while the coordinator's actor is still starting on a busy machine, and the
#   warning carries a traceback. A local Ray has no autoscaler to read the request.
_LOCAL_NOISE: tuple[tuple[str, str], ...] = (
    ("ray._private.authentication.authentication_token_setup",
     "Token authentication is enabled for this Ray cluster"),
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     "Failed to send resource request"),
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     "Failed to cancel resource request"),
)
_LOCAL_RAY_ENV = "LONGTUNE_LOCAL_RAY"  # set in the runtime env of a Ray longtune started


class _DropNoise(logging.Filter):
    """Drops the records of one logger whose message opens with one of ``openings``."""

    def __init__(self, openings: tuple[str, ...]):
        super().__init__()
        self.openings = openings

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.openings)


def drop_ray_noise(*, local: bool) -> None:
    """Filter the Ray messages above (``_LOCAL_NOISE`` too when ``local``) out of this
    process's loggers; nothing when ``LONGTUNE_LOG_LEVEL`` asks for more. Every other
    message of those loggers stays. Idempotent."""
    if verbose():
        return
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, opening in _NOISE + (_LOCAL_NOISE if local else ()):
        by_logger[name] = by_logger.get(name, ()) + (opening,)
    for name, openings in by_logger.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(old)
        logger.addFilter(_DropNoise(openings))


def quiet_ray_data() -> None:
    """Ray Data in this process, and every dataset created here from now on (a dataset
    carries its creator's DataContext to the workers that run it): no progress bars (two
    hundred lines in a short run when stdout is not a terminal) and no "Starting execution
    of Dataset" lines with the dataset's execution plan. Nothing when verbose."""
    if verbose():
        return
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False


def quiet_ray_workers() -> None:
    """Every worker process of a longtune job runs this first (``worker_process_setup_hook``):
    its state-API calls go to its own cluster, the libraries are quieted as in the driver
    (``quiet_libraries``) and Ray's noise is dropped (``drop_ray_noise``)."""
    import ray

    # The state API (Ray Train's PlacementGroupCleaner asks it whether the controller lives)
    # finds its server from RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the newest
    # `ray start` cluster or the one GCS process on this machine: with another Ray running
    # here that is another cluster (the cleaner cannot find the controller there, takes it
    # for dead and removes the run's placement group) or an error. A worker's own cluster
    # is the one its GCS knows.
    os.environ["RAY_API_SERVER_ADDRESS"] = ray.get_runtime_context().gcs_address
    quiet_libraries()
    drop_ray_noise(local=os.environ.get(_LOCAL_RAY_ENV) == "1")


def job_runtime_env(*, local: bool = False) -> dict:
    """The runtime environment of every Ray a longtune job starts (``local``) or joins."""
    env = {"TOKENIZERS_PARALLELISM": "false", **quiet_env()}
    if verbose():
        env[LOG_LEVEL_ENV] = os.environ[LOG_LEVEL_ENV]
    if local:
        env[_LOCAL_RAY_ENV] = "1"
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


def local_system_config(config: Config, idle_workers: bool = True) -> dict:
    """The _system_config of a local Ray longtune starts. Ray starts its worker processes at
    nice 15, below its own raylet and GCS, so that a cluster node's daemons stay responsive;
    on a machine whose cores the training workers fill, that hands every slice a nice-0
    process wants to it at once, and a step loses ~20% to processes taking 0.06 of a core
    (README: Ray's overhead). With scaling.local_ray_idle_priority the workers run at nice 0
    and Ray's own processes yield instead (train/background.py)."""
    system = {}
    if config.scaling.local_ray_idle_priority:
        system["worker_niceness"] = 0
    if not idle_workers:
        system["num_workers_soft_limit"] = 0
    return system


def init_ray(config: Config, *, log_to_driver: bool = True, idle_workers: bool = True):
    """Join the cluster named by scaling.ray_address or $RAY_ADDRESS (`ray job submit` sets
    it; `RAY_ADDRESS=auto` joins a `ray start` cluster on this machine), else start a local
    Ray sized by ``local_cpus_needed``. Never joins an unnamed cluster: Ray cannot tell a
    `ray start` head from another program's `ray.init()`, whose workers may run other code.
    Ray's INFO lines in the driver, Ray Data's progress bars and the messages in
    ``_NOISE`` are left out unless ``LONGTUNE_LOG_LEVEL`` asks for them. ``idle_workers=False``:
    a local Ray keeps no idle worker processes for tasks to come (each wakes ~100 times a
    second and takes ~1% of a core; a job whose workers read their data themselves runs no
    task while it trains, README: Ray's overhead); a task then starts its own. Returns the ray
    module."""
    import ray

    quiet_ray_data()
    if ray.is_initialized():
        return ray
    address = config.scaling.ray_address or os.environ.get("RAY_ADDRESS")
    # "Started a local Ray instance", "Connecting to existing Ray cluster", a fresh home's
    # "Generated new authentication token": the driver's ray logger at INFO
    level = logging.INFO if verbose() else logging.WARNING
    if address:
        drop_ray_noise(local=False)
        ray.init(address=address, runtime_env=job_runtime_env(), log_to_driver=log_to_driver, logging_level=level)
        return ray
    # Ray Train watches for the preemption of nodes (cloud capacity taken back, a drained
    # node); a local Ray has no node to lose but the driver's, and the watcher's start logs a
    # core-worker error (its constructor arguments are in the object store, ray#53727).
    # Ray Train hands the driver's setting on to its controller.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    drop_ray_noise(local=True)
    ray.init(
        num_cpus=local_cpus_needed(config),
        runtime_env=job_runtime_env(local=True),
        log_to_driver=log_to_driver,
        logging_level=level,
        # Off by default: the dashboard is ten processes, each waking ~100 times a second,
        # and on a machine whose cores all run the worker's torch threads every wake-up
        # preempts one of them while the other waits at the next barrier (README: Ray's
        # overhead). What it serves is not needed here: Ray Train's PlacementGroupCleaner asks
        # its state API whether the run's controller lives, and without it warns (dropped,
        # _NOISE) and keeps asking; a local Ray ends with its driver, placement groups and
        # all, and a search frees its trials' groups itself (longtune/tune/cleanup.py). On, it
        # listens on 127.0.0.1, 8265 or the next free port.
        include_dashboard=config.scaling.local_dashboard,
        _system_config=local_system_config(config, idle_workers) or None,
    )
    return ray
