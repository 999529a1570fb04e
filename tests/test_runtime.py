"""runtime.py: how big a local Ray must be, and when a job uses GPUs."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from longtune.config import load_config
from longtune.runtime import local_cpus_needed, use_gpu


def test_a_local_ray_fits_workers_tokenizer_actors_and_read_tasks_at_once():
    config = load_config(None, ["scaling.num_workers=3", "scaling.cpus_per_worker=1.5",
                                "data.tokenize_concurrency=2"])
    # ceil(3 x 1.5) = 5 for the workers, 2 actors, 2 for read/pack tasks and the coordinator
    assert local_cpus_needed(config) == max(os.cpu_count() or 1, 5 + 2 + 2)
    assert local_cpus_needed(load_config(None, ["scaling.local_num_cpus=3"])) == 3  # the user's word


@pytest.mark.parametrize("setting, gpus, expected", [
    ("auto", 8, True), ("auto", 0, False), ("true", 0, True), ("false", 8, False),
])
def test_auto_uses_gpus_when_the_cluster_has_them(setting, gpus, expected):
    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 4, **({"GPU": gpus} if gpus else {})})
    assert use_gpu(load_config(None, [f"scaling.use_gpu={setting}"]), cluster) is expected


def test_ray_workers_drop_the_placement_group_cleaners_noise_and_nothing_else(ray_local):
    """Without the dashboard, Ray Train's PlacementGroupCleaner warns at every check that the
    state API is unavailable (290 lines in one 5-minute default run): every worker of the
    job's runtime environment filters that one message out."""
    import logging

    @ray_local.remote
    def passes(message: str) -> bool:
        logger = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
        return bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)))

    noise = ("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
             "Continuing to monitor.")
    assert ray_local.get(passes.remote(noise)) is False
    assert ray_local.get(passes.remote("Detected that the Ray Train controller actor (x) is dead.")) is True


_NOISY = """
import sys, tempfile
sys.path.insert(0, {root!r})
from longtune.runtime import quiet_libraries
quiet_libraries()
import mlflow
from transformers import LlamaConfig, LlamaForCausalLM
d = tempfile.mkdtemp()
mlflow.set_tracking_uri(f"sqlite:///{{d}}/m.db")
with mlflow.start_run():
    mlflow.log_metric("x", 1.0)
LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=64)).save_pretrained(d + "/m")
LlamaForCausalLM.from_pretrained(d + "/m")
import logging
logging.getLogger("mlflow").warning("a real warning")
print("done")
"""


@pytest.mark.parametrize("level", [None, "info"])
def test_a_job_shows_real_warnings_but_not_the_libraries_chatter(level, tmp_path):
    """A process that quiets the libraries (as the CLI and every Ray worker do) prints no
    weight-loading progress bars and no MLflow INFO lines about its tables, but still MLflow's
    warnings; LONGTUNE_LOG_LEVEL=info (the CLI's --verbose) brings the chatter back."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "MLFLOW_LOGGING_LEVEL",
                        "LONGTUNE_LOG_LEVEL")}
    if level:
        env["LONGTUNE_LOG_LEVEL"] = level
    script = _NOISY.format(root=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shown = done.stdout + done.stderr
    assert "a real warning" in shown and "done" in shown
    chatter = ("Loading weights" in shown, "Creating initial MLflow database tables" in shown)
    assert chatter == ((True, True) if level else (False, False)), shown


def test_the_job_runtime_env_carries_the_quiet_settings_unless_verbose(monkeypatch):
    from longtune.runtime import job_runtime_env

    monkeypatch.delenv("LONGTUNE_LOG_LEVEL", raising=False)
    assert job_runtime_env()["env_vars"]["TRANSFORMERS_VERBOSITY"] == "error"
    monkeypatch.setenv("LONGTUNE_LOG_LEVEL", "info")
    env = job_runtime_env()["env_vars"]
    assert "TRANSFORMERS_VERBOSITY" not in env and env["LONGTUNE_LOG_LEVEL"] == "info"


def test_verbose_flag_sets_the_log_level(monkeypatch):
    from longtune.cli import main

    monkeypatch.delenv("LONGTUNE_LOG_LEVEL", raising=False)
    assert main(["finetune", "--verbose", "--print-config"]) == 0
    assert os.environ["LONGTUNE_LOG_LEVEL"] == "info"
    monkeypatch.delenv("LONGTUNE_LOG_LEVEL")


# ------------------------------------------------------------------ a quiet terminal (#18)

from longtune.runtime import _LOCAL_NOISE, _NOISE  # noqa: E402

_CLEANER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_AUTOSCALER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"
_TOKEN = "ray._private.authentication.authentication_token_setup"
_EXECUTOR = "ray.data._internal.execution.streaming_executor"


@pytest.fixture
def noise_filters():
    """Takes the filters drop_ray_noise adds off the loggers again."""
    import logging

    from longtune.runtime import _DropNoise

    yield
    for name, _ in _NOISE + _LOCAL_NOISE:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(f)


def _shown(logger_name: str, message: str) -> bool:
    import logging

    logger = logging.getLogger(logger_name)
    return bool(logger.filter(logging.LogRecord(logger_name, logging.WARNING, __file__, 1, message, None, None)))


_RAY_LINES = [  # (logger, message as Ray 2.60 logs it, dropped in a local Ray)
    (_CLEANER, "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
               "Continuing to monitor.", True),
    (_CLEANER, "Detected that the Ray Train controller actor (x) is dead. Cleaning up placement group = [y] "
               "created by this run.", False),
    (_AUTOSCALER, "Failed to send resource request for train-x. If this only happens transiently during network "
                  "partition or CPU being overloaded, it's safe to ignore this error.", True),
    (_TOKEN, "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.", True),
    ("ray.data._internal.progress", "Progress bars disabled. To enable, set "
                                    "`ray.data.DataContext.get_current().enable_progress_bars = True`.", True),
    (_EXECUTOR, "\N{HEAVY CHECK MARK}\N{VARIATION SELECTOR-16}  Dataset train_x execution finished in 30.08 seconds",
     True),
    (_EXECUTOR, "\N{WARNING SIGN}\N{VARIATION SELECTOR-16}  Dataset train_x execution failed", False),
]


@pytest.mark.parametrize("level", [None, "info"])
def test_a_local_rays_noise_is_dropped_and_every_other_message_kept(level, monkeypatch, noise_filters):
    """Each message longtune drops in a Ray it started is dropped by its logger and opening
    words, the same loggers' other messages stay, and LONGTUNE_LOG_LEVEL=info (--verbose)
    keeps them all."""
    from longtune.runtime import drop_ray_noise

    monkeypatch.delenv("LONGTUNE_LOG_LEVEL", raising=False)
    if level:
        monkeypatch.setenv("LONGTUNE_LOG_LEVEL", level)
    drop_ray_noise(local=True)
    drop_ray_noise(local=True)  # a second call (the driver, then a worker hook) adds nothing
    shown = [_shown(name, message) for name, message, _ in _RAY_LINES]
    assert shown == [bool(level) or not dropped for _, _, dropped in _RAY_LINES]


def test_a_joined_cluster_keeps_the_autoscaling_and_token_warnings(monkeypatch, noise_filters):
    """A cluster longtune joins may have an autoscaler that reads Ray Train's resource
    requests, and its own authentication: those warnings stay; the rest is dropped."""
    from longtune.runtime import drop_ray_noise

    monkeypatch.delenv("LONGTUNE_LOG_LEVEL", raising=False)
    drop_ray_noise(local=False)
    local_only = {name for name, _ in _LOCAL_NOISE}
    shown = [_shown(name, message) for name, message, _ in _RAY_LINES]
    assert shown == [name in local_only or not dropped for name, _, dropped in _RAY_LINES]


def test_a_workers_state_api_asks_its_own_cluster(ray_local):
    """With another Ray on the machine, Ray's state API in a worker would ask the newest
    `ray start` cluster (where Ray Train's PlacementGroupCleaner finds no controller, takes
    it for dead and removes the run's placement group) or fail: every worker of the job names
    its own cluster."""

    @ray_local.remote
    def api_address() -> tuple:
        return os.environ.get("RAY_API_SERVER_ADDRESS"), ray_local.get_runtime_context().gcs_address

    asked, own = ray_local.get(api_address.remote())
    assert asked == own == ray_local.get_runtime_context().gcs_address


_LOCAL_RAY = """
from longtune.config import load_config
from longtune.runtime import init_ray, quiet_libraries
quiet_libraries()  # as the CLI does
ray = init_ray(load_config(None, ["scaling.local_num_cpus=2", "scaling.local_dashboard=true"]))
import ray.data

@ray.remote(num_cpus=0)
class Probe:
    def alive(self, actor_id):
        # what Ray Train's PlacementGroupCleaner asks about the run's controller, once a second
        from ray.train.v2._internal.state.util import is_actor_alive
        return is_actor_alive(actor_id, timeout=30)

@ray.remote
def rows(ds):  # as a Ray Train worker runs the dataset it is handed
    return len(ds.take_all())

probe = Probe.remote()
print("alive:", ray.get(probe.alive.remote(probe._actor_id.hex())), flush=True)
ds = ray.data.from_items([{"x": i} for i in range(50)], override_num_blocks=5).map_batches(lambda b: b)
print("rows:", ray.get(rows.remote(ds)), flush=True)
ray.shutdown()
"""


def test_a_local_ray_serves_the_state_api_and_starts_quietly(tmp_path):
    """A Ray that longtune starts with scaling.local_dashboard (here in a fresh home, as on a
    user's first run, with stdout not a terminal) answers Ray Train's state-API question about
    its controller (without the dashboard it fails once a second), and the driver shows no Ray
    start-up INFO, no token-authentication notice, no Ray Data progress bar or execution lines."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGTUNE_LOG_LEVEL", "RAY_"))}
    env["HOME"] = str(home)
    done = subprocess.run([sys.executable, "-c", _LOCAL_RAY], capture_output=True, text=True, env=env,
                          timeout=400, cwd=tmp_path)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    assert "alive: True" in shown and "rows: 50" in shown
    noise = ["Started a local Ray instance", "Token authentication", "authentication token", "Progress bars",
             "Running Dataset", "Starting execution", "execution finished", "State API"]
    assert [line for line in noise if line in shown] == [], shown


@pytest.mark.parametrize("level, ray_level, dashboard", [(None, "WARNING", None), ("info", "INFO", "true")])
def test_a_local_ray_is_asked_for_its_info_lines_only_when_verbose(level, ray_level, dashboard, monkeypatch,
                                                                   noise_filters):
    import logging

    import ray

    from longtune.runtime import init_ray

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if not k.startswith("RAY_")})
    os.environ.pop("LONGTUNE_LOG_LEVEL", None)
    if level:
        os.environ["LONGTUNE_LOG_LEVEL"] = level
    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.append(kwargs))
    init_ray(load_config(None, [f"scaling.local_dashboard={dashboard}"] if dashboard else []))
    (kwargs,) = started
    assert kwargs["logging_level"] == getattr(logging, ray_level)
    # off unless asked for: its processes' wake-ups cost a small machine's training time
    assert kwargs["include_dashboard"] is (dashboard == "true")
    assert kwargs["runtime_env"]["env_vars"]["LONGTUNE_LOCAL_RAY"] == "1"
    # no preemption watcher in a local Ray (its start logs a core-worker error)
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"


@pytest.mark.parametrize("level", [None, "info"])
def test_datasets_the_driver_creates_draw_no_progress_bars_unless_verbose(level, monkeypatch):
    from ray.data import DataContext

    from longtune.runtime import quiet_ray_data

    monkeypatch.delenv("LONGTUNE_LOG_LEVEL", raising=False)
    if level:
        monkeypatch.setenv("LONGTUNE_LOG_LEVEL", level)
    context = DataContext.get_current()
    saved = context.enable_progress_bars, context.print_on_execution_start
    try:
        context.enable_progress_bars = context.print_on_execution_start = True
        quiet_ray_data()
        assert (context.enable_progress_bars, context.print_on_execution_start) == (bool(level), bool(level))
    finally:
        context.enable_progress_bars, context.print_on_execution_start = saved


@pytest.mark.parametrize("level, train_level", [(None, "WARNING"), ("info", "INFO")])
def test_ray_trains_info_lines_show_only_when_verbose(level, train_level, monkeypatch):
    from longtune.train.trainer import train_logging

    monkeypatch.delenv("LONGTUNE_LOG_LEVEL", raising=False)
    if level:
        monkeypatch.setenv("LONGTUNE_LOG_LEVEL", level)
    assert train_logging()["logging_config"].log_level == train_level


def test_the_ingest_options_are_the_data_contexts_without_rays_deprecation_warning():
    """DataConfig.default_ingest_options() warns at every run that exclude_resources is
    deprecated (Ray 2.60); the ingest options copy the DataContext's without it."""
    import warnings

    from ray.data import DataContext

    from longtune.train.ingest import ingest_config

    context = DataContext.get_current().execution_options
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*exclude_resources")
        options = ingest_config(2)._user_execution_options
    assert options.preserve_order is True
    assert (options.resource_limits, options.exclude_resources) == (context.resource_limits, context.exclude_resources)


_IDLE_WORKERS = """
import sys, time
import psutil
from longtune.config import load_config
from longtune.runtime import init_ray
ray = init_ray(load_config(None, ["scaling.local_num_cpus=2"]), idle_workers=sys.argv[1] == "keep")

@ray.remote
def one():
    return 1

print("task:", ray.get(one.remote()), flush=True)
def idle():
    return sum(1 for p in psutil.Process().children(recursive=True)
               if p.is_running() and p.name().startswith("ray::IDLE"))
deadline, counts = time.time() + 20, []
while time.time() < deadline:  # Ray kills an idle worker over its limit after 1 s
    counts.append(idle())
    time.sleep(0.5)
print("idle at the end:", counts[-1], "most:", max(counts), flush=True)
ray.shutdown()
"""


@pytest.mark.parametrize("keep", [True, False])
def test_a_local_ray_keeps_no_idle_workers_when_asked(keep, tmp_path):
    """init_ray(idle_workers=False), as a job whose workers read their own data starts it:
    the worker processes Ray keeps warm for tasks are gone after their idle second, and a task
    still runs (on a worker started for it)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LONGTUNE_LOG_LEVEL", "RAY_"))}
    done = subprocess.run([sys.executable, "-c", _IDLE_WORKERS, "keep" if keep else "drop"], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown
    assert "task: 1" in shown
    idle_at_end = int(shown.split("idle at the end: ")[1].split()[0])
    assert (idle_at_end > 0) is keep, shown
