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
    DESCRIPTION_TAG,
    EXPERIMENT_KIND_TAG,
    PARENT_RUN_TAG,
    Tracker,
    loss_curves,
    metric_name,
    param_value,
    plot_loss_curve,
    read_table,
    resolve_experiment,
    resolve_tracking_uri,
    resolved_config,
    run_url,
    ui_hint,
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
    history = client(cfg).get_metric_history(run_id, "train/loss")
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


# ---------------------------------------------------------------- how MLflow's UI shows it


@pytest.mark.parametrize("key, name", [
    # what the training loop reports (train/loop.py), the adapters' hooks included
    ("loss", "train/loss"), ("lr", "train/lr"), ("tokens_per_s", "train/tokens_per_s"),
    ("step_time_s", "train/step_time_s"), ("peak_memory_mb", "train/peak_memory_mb"),
    ("tokens_seen", "train/tokens_seen"), ("epoch", "train/epoch"), ("ranks_kept", "train/ranks_kept"),
    ("orth_loss", "train/orth_loss"), ("loss_scale", "train/loss_scale"),
    ("resumed_from_step", "train/resumed_from_step"),
    # held-out scores: the loop's, and by length (evaluate, before/after, replicate)
    ("eval_loss", "eval/loss"), ("eval_ppl", "eval/ppl"), ("ppl_1024", "eval/ppl_1024"),
    ("passkey_acc_1024", "eval/passkey_1024"), ("ppl_vs_length", "eval/ppl_vs_length"),
    ("passkey_acc_vs_length", "eval/passkey_vs_length"),
    ("eval_nll_1024", None), ("eval_tokens_1024", None),  # in the tables only
    # a compared model's training figures (replicate), a search's figures (tune)
    ("train_loss", "train/loss"), ("train_eval_loss", "eval/loss"), ("train_step_time_s", "train/step_time_s"),
    ("final_eval_loss", "tune/final_eval_loss"), ("best_loss", "tune/best_loss"),
    ("trials_stopped_early", "tune/trials_stopped_early"), ("steps_run", "tune/steps_run"),
    # grouped already, or nobody's we know: as they are
    ("system/cpu_utilization_percentage", "system/cpu_utilization_percentage"), ("train/loss", "train/loss"),
    ("trainable_params", "trainable_params"), ("train_other", "train_other"),
])
def test_metric_names_are_grouped_for_mlflow(key, name):
    assert metric_name(key) == name


def test_metrics_are_logged_under_their_mlflow_names(cfg):
    tracker = Tracker(cfg)
    run_id = tracker.start_run()
    tracker.log_metrics({"loss": 2.0, "eval_loss": 2.5, "ppl_256": 9.0, "passkey_acc_256": 0.5,
                         "eval_nll_256": 2.2, "eval_tokens_256": 640, "mine": 1, "system/x": 3}, step=4)
    assert loss_curves(tracker) == {"train": [(4, 2.0)], "eval": [(4, 2.5)]}  # read back by our names
    with pytest.raises(ValueError, match="'loss' and 'train/loss' would both be logged as MLflow metric 'train/loss'"):
        tracker.log_metrics({"loss": 1.0, "train/loss": 1.0}, step=5)
    tracker.end_run()
    assert client(cfg).get_run(run_id).data.metrics == {
        "train/loss": 2.0, "eval/loss": 2.5, "eval/ppl_256": 9.0, "eval/passkey_256": 0.5, "mine": 1.0,
        "system/x": 3.0,
    }


def test_the_training_loops_report_charts_no_step_and_no_epoch_before_the_data_repeats(cfg):
    from longtune.train.loop import _tracked

    report = {"step": 10, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 900.0, "step_time_s": 0.5,
              "peak_memory_mb": 300.0, "tokens_seen": 5120, "epoch": 0}
    tracker = Tracker(cfg)
    run_id = tracker.start_run()
    tracker.log_metrics(_tracked(report), step=10)
    tracker.log_metrics(_tracked({**report, "step": 20, "epoch": 1}), step=20)
    tracker.end_run()
    metrics = client(cfg).get_run(run_id).data.metrics
    assert sorted(metrics) == ["train/epoch", "train/loss", "train/lr", "train/peak_memory_mb",
                               "train/step_time_s", "train/tokens_per_s", "train/tokens_seen"]
    assert [(m.step, m.value) for m in client(cfg).get_metric_history(run_id, "train/epoch")] == [(20, 1.0)]


def test_experiment_is_tagged_as_finetuning(cfg):
    tracker = Tracker(cfg)
    tracker.start_run()
    tracker.end_run()
    experiment = client(cfg).get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == "finetuning"


@pytest.mark.parametrize("before, after", [
    (None, "finetuning"),  # made before longtune tagged its experiments
    ("genai_development_inferred", "finetuning"),  # a guess of MLflow's UI
    ("no_inferred_type", "finetuning"),
    ("custom_model_development", "custom_model_development"),  # a person's choice stays
])
def test_an_existing_experiment_gets_the_kind_unless_one_was_chosen(cfg, before, after):
    mlflow = client(cfg)
    experiment_id = mlflow.create_experiment(cfg.experiment_name)
    if before is not None:
        mlflow.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, before)
    tracker = Tracker(cfg)
    tracker.start_run()
    tracker.end_run()
    assert tracker.experiment_id == experiment_id
    assert mlflow.get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == after


def test_description_and_table(cfg):
    tracker = Tracker(cfg)
    run_id = tracker.start_run()
    tracker.set_description("**hello**\n\n| a | b |\n| --- | --- |\n| 1 | 2 |")
    tracker.log_table({"model": ["before training", "after training"], "ppl_256": [9.5, 7.25]}, "before_after.json")
    with pytest.raises(ValueError, match="one length"):
        tracker.log_table({"model": ["a"], "ppl_256": [1.0, 2.0]}, "bad.json")
    with pytest.raises(ValueError, match="must end in .json"):
        tracker.log_table({"model": ["a"]}, "table.csv")
    tracker.set_description("x" * 9000)
    long_text = client(cfg).get_run(run_id).data.tags[DESCRIPTION_TAG]
    tracker.set_description("**hello**")
    tracker.end_run()

    run = client(cfg).get_run(run_id)
    assert run.data.tags[DESCRIPTION_TAG] == "**hello**"
    assert len(long_text) == 8000 and long_text.endswith("[truncated]")
    # MLflow's UI finds table artifacts through this tag
    assert {"path": "before_after.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    table = read_table(client(cfg), run_id, "before_after.json")
    assert table.to_dict("list") == {"model": ["before training", "after training"], "ppl_256": [9.5, 7.25]}


def test_a_finetune_runs_description_says_what_was_trained():
    from longtune.finetune import run_description

    config = load_config(overrides=["model.target_context=1024", "adapter.type=lora_plus", "adapter.rank=8", "adapter.alpha=16",
                                    "attention.type=s2", "attention.group_size_ratio=0.25",
                                    "adapter.target_modules=[q_proj, v_proj]"])
    text = run_description(config, "run-1", original_context=256)
    assert text.startswith("**longtune finetune** `run-1`")
    assert f"| model | {config.model.name_or_path} |" in text
    assert "| context | 256 -> 1,024 tokens (position interpolation x4) |" in text
    assert "| adapter | lora_plus r=8, alpha=16 on q_proj, v_proj |" in text
    assert "| attention | S2-Attn (groups of 0.25 of the context, shift split); evaluated with full attention |" in text
    full = run_description(load_config(overrides=["attention.type=full"]), "run-2")
    assert "| attention | full |" in full and "| context | " in full


def test_ui_hint_links_the_runs_charts_in_the_model_training_view():
    url = run_url("http://127.0.0.1:5000/", "3", "abc")
    assert url == "http://127.0.0.1:5000/#/experiments/3/runs/abc/model-metrics?workflowType=machine_learning"
    assert ui_hint("sqlite:////data/mlflow.db", "3", "abc").splitlines() == [
        "Open it with: mlflow ui --backend-store-uri sqlite:////data/mlflow.db --port 5000",
        f"then open: {url}",
    ]
    assert ui_hint("http://mlflow.internal:5000", "3", "abc") == (
        "Open it at: http://mlflow.internal:5000/#/experiments/3/runs/abc/model-metrics?workflowType=machine_learning"
    )
    assert ui_hint("sqlite:////data/mlflow.db") == "Open it with: mlflow ui --backend-store-uri sqlite:////data/mlflow.db --port 5000"


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
    assert client(cfg).get_run(run_id).data.metrics == {"train/loss": 1.0}
    assert not elsewhere.exists()
