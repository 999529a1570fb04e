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
