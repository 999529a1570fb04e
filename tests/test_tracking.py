"""MLflow tracking against a real SQLite store in a temporary directory (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from longtune.config import Config, TrackingConfig, load_config
from longtune.tracking import (
    PARENT_RUN_TAG,
    Tracker,
    param_value,
    plot_loss_curve,
    resolve_experiment,
    resolve_tracking_uri,
    resolved_config,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}"


@pytest.fixture
def cfg(store, request) -> TrackingConfig:
    """A tracking config on the shared store, one experiment per test."""
    return TrackingConfig(tracking_uri=store, experiment_name=request.node.name, system_metrics=False)


def client(cfg: TrackingConfig):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri)


def artifact_paths(cfg: TrackingConfig, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client(cfg).list_artifacts(run_id, path):
        out |= artifact_paths(cfg, run_id, info.path) if info.is_dir else {info.path}
    return out


# ---------------------------------------------------------------- where


def test_uri_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    default = resolve_tracking_uri(TrackingConfig())
    assert default == f"sqlite:///{tmp_path.absolute()}/mlflow.db"
    assert Path(default.removeprefix("sqlite:///")).is_absolute()
    assert resolve_experiment(TrackingConfig()) == "longtune"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    assert resolve_tracking_uri(TrackingConfig()) == "http://mlflow.example:5000"
    assert resolve_experiment(TrackingConfig()) == "from-env"

    explicit = TrackingConfig(tracking_uri="sqlite:////data/runs.db", experiment_name="from-config")
    assert resolve_tracking_uri(explicit) == "sqlite:////data/runs.db"
    assert resolve_experiment(explicit) == "from-config"

    # a relative SQLite path is pinned to this directory, for workers that run elsewhere
    relative = TrackingConfig(tracking_uri="sqlite:///sub/runs.db")
    assert resolve_tracking_uri(relative) == f"sqlite:///{tmp_path.absolute()}/sub/runs.db"
    pinned = resolved_config(relative)
    assert pinned.tracking_uri == resolve_tracking_uri(relative)
    assert pinned.experiment_name == "from-env"


def test_param_values_are_strings_within_limits():
    assert param_value("abc") == "abc"
    assert param_value(8) == "8"
    assert param_value(2e-5) == "2e-05"
    assert param_value(True) == "true"
    assert param_value(None) == "null"
    assert param_value(["stdlib", "x"]) == '["stdlib", "x"]'
    assert param_value({"b": 1, "a": [1, 2]}) == '{"a": [1, 2], "b": 1}'
    long = param_value("x" * 10_000)
    assert len(long) == 6000 and long.endswith("[truncated]")


# ---------------------------------------------------------------- a whole run


def test_run_logs_params_metrics_and_artifacts(cfg, tmp_path):
    config = load_config(overrides=["data.sources=[a.txt, b.txt]", "adapter.rank=16"])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    (adapter / "adapter_model.safetensors").write_bytes(b"\0" * 64)

    with Tracker(cfg) as tracker:
        run_id = tracker.start_run(run_name="finetune", tags={"job": "test"})
        tracker.log_config(config)
        for step, loss in [(1, 3.0), (2, 2.5), (3, 2.25)]:
            tracker.log_metrics({"train/loss": loss, "lr": 1e-4 * step}, step=step)
        tracker.log_artifact(adapter, artifact_path="checkpoints/adapter")
        tracker.log_artifact(adapter / "adapter_config.json")
        tracker.log_loss_curve([(1, 3.0), (2, 2.5), (3, 2.25)])

    run = client(cfg).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "finetune" and run.data.tags["job"] == "test"
    params = run.data.params
    assert params["data.sources"] == '["a.txt", "b.txt"]'  # a list value, JSON-encoded
    assert params["adapter.rank"] == "16"
    assert params["tracking.tracking_uri"] == "null"
    assert params["train.betas"] == "[0.9, 0.95]"
    assert set(params) == set(config.flat())

    history = client(cfg).get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 3.0), (2, 2.5), (3, 2.25)]

    paths = artifact_paths(cfg, run_id)
    assert {
        "checkpoints/adapter/adapter_config.json",
        "checkpoints/adapter/adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "plots/loss_curve.png",
    } <= paths
    local = Path(client(cfg).download_artifacts(run_id, "", str(tmp_path / "download")))
    assert (local / "plots" / "loss_curve.png").read_bytes()[:8] == PNG_SIGNATURE
    assert Config.model_validate(yaml.safe_load((local / "config.yaml").read_text())) == config
    # artifacts live beside the database, not in the working directory
    db_dir = Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent
    assert run.info.artifact_uri.startswith((db_dir / "mlruns").as_uri())


def test_relogging_params_on_resume_does_not_crash(cfg):
    tracker = Tracker(cfg)
    run_id = tracker.start_run()
    tracker.log_params({"a": 1, "b": [1, 2]})
    tracker.end_run("FAILED")
    assert client(cfg).get_run(run_id).info.status == "FAILED"

    resumed = Tracker(cfg)
    assert resumed.start_run(run_id=run_id) == run_id
    assert client(cfg).get_run(run_id).info.status == "RUNNING"
    resumed.log_params({"a": 1, "b": [1, 2], "c": None})  # same values again, one new
    with pytest.warns(UserWarning, match="cannot change"):
        resumed.log_params({"a": 2})
    resumed.end_run("KILLED")
    run = client(cfg).get_run(run_id)
    assert run.data.params == {"a": "1", "b": "[1, 2]", "c": "null"}
    assert run.data.tags["changed_param.a"] == "2"
    assert run.info.status == "KILLED"


def test_exception_ends_the_run_failed(cfg):
    tracker = Tracker(cfg)
    with pytest.raises(RuntimeError, match="boom"), tracker:
        run_id = tracker.start_run()
        raise RuntimeError("boom")
    assert client(cfg).get_run(run_id).info.status == "FAILED"
    assert tracker.run_id == run_id  # still readable for reports
    tracker.end_run("FINISHED")  # the first status stands
    assert client(cfg).get_run(run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="status"):
        tracker.end_run("DONE")


def test_nested_run_carries_the_parent_id(cfg):
    parent = Tracker(cfg)
    parent_id = parent.start_run(run_name="tune")
    child = Tracker(cfg)
    child_id = child.start_run(run_name="trial-0", parent_run_id=parent_id)
    child.end_run()
    parent.end_run()
    assert client(cfg).get_run(child_id).data.tags[PARENT_RUN_TAG] == parent_id
    assert PARENT_RUN_TAG not in client(cfg).get_run(parent_id).data.tags
    with pytest.raises(ValueError, match="not found"):
        Tracker(cfg).start_run(parent_run_id="0" * 32)


def test_reattach_from_another_process_logs_into_the_same_run(cfg, tmp_path):
    driver = Tracker(cfg)
    run_id = driver.start_run(run_name="driver")
    driver.log_metrics({"loss": 3.0}, step=0)
    worker_cfg = resolved_config(cfg).model_dump_json()
    (tmp_path / "note.txt").write_text("from rank 0")
    script = textwrap.dedent(
        f"""
        from longtune.config import TrackingConfig
        from longtune.tracking import Tracker
        cfg = TrackingConfig.model_validate_json({worker_cfg!r})
        with Tracker.attach(cfg, {run_id!r}) as worker:
            worker.log_metrics({{"loss": 2.0}}, step=1)
            worker.log_params({{"worker.world_size": 2}})
            worker.log_artifact({str(tmp_path / "note.txt")!r}, artifact_path="worker")
        """
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/elsewhere.db"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]

    run = client(cfg).get_run(run_id)
    assert run.info.status == "RUNNING"  # the worker did not end the driver's run
    history = client(cfg).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 3.0), (1, 2.0)]
    assert run.data.params["worker.world_size"] == "2"
    assert "worker/note.txt" in artifact_paths(cfg, run_id)
    driver.end_run()
    assert client(cfg).get_run(run_id).info.status == "FINISHED"


def test_attach_to_a_missing_run_is_a_clear_error(cfg):
    with pytest.raises(ValueError, match="not found"):
        Tracker.attach(cfg, "f" * 32)


def test_system_metrics(cfg):
    tracker = Tracker(cfg.model_copy(update={"system_metrics": True}), system_metrics_interval=0.2)
    run_id = tracker.start_run()
    time.sleep(1.0)
    tracker.end_run()
    keys = set(client(cfg).get_run(run_id).data.metrics)
    assert "system/cpu_utilization_percentage" in keys
    assert "system/system_memory_usage_megabytes" in keys


# ---------------------------------------------------------------- off


def test_disabled_tracking_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    off = TrackingConfig(enabled=False, tracking_uri=f"sqlite:///{store}/mlflow.db")
    tracker = Tracker(off)
    assert tracker.start_run(run_name="x") is None
    tracker.log_config(Config())
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.log_artifact(tmp_path / "does-not-exist")
    tracker.log_loss_curve([(1, 1.0)])
    tracker.end_run("FAILED")
    with Tracker.attach(off, "0" * 32) as attached:
        attached.log_metrics({"loss": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []
    assert tracker._client is None  # never built an MLflow client


def test_loss_curve_png(tmp_path):
    png = plot_loss_curve({"train": [(1, 3.0), (2, float("nan")), (3, 2.0)], "eval": [(3, 2.4)]}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert plot_loss_curve([], tmp_path / "empty.png") is None
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == '["c.png"]'


def test_mlflow_global_state_is_ignored(cfg, tmp_path, monkeypatch):
    """Another library (or test) pointing MLflow's global URI elsewhere changes nothing."""
    import mlflow.tracking._tracking_service.utils as tracking_utils

    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setattr(tracking_utils, "_tracking_uri", f"sqlite:///{elsewhere}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    tracker = Tracker(cfg)
    run_id = tracker.start_run()
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end_run()
    assert client(cfg).get_run(run_id).data.metrics == {"loss": 1.0}
    assert not elsewhere.exists()
