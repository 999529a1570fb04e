"""longtune tune: a real Ray Tune search of real (tiny) longtune trainings, MLflow in SQLite.

One search serves most tests (the suite runs on two cores): three trials of four steps, the
learning rate either useful (1e-2: the first and the third trial, both LoRA²) or useless
(1e-6: the second, LoRA+), one trial at a time, ASHA comparing at step 2. It is interrupted
after its first trial completes and relaunched, so the same search also shows that a resumed
search runs no finished trial again and that ASHA's rungs survive the resume (the useless
trial is compared with the first trial's results, reported before the interruption, and
stopped).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from longtune.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

SPACE = (
    "tune.search_space={train.lr: {choice: [1.0e-2, 1.0e-6]}, adapter.type: {choice: [lora_plus, lora2]}, "
    "adapter.rank: {choice: [4, 8]}, attention.group_size_ratio: {choice: [0.5, 0.25]}}"
)


def tune_config(tmp: Path, model_dir: str, corpus: str, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model_dir}", "model.target_context=128",
        f"data.sources=[{corpus}]", "data.min_doc_chars=100", "data.eval_fraction=0.2",
        "train.warmup_steps=0", "train.batch_size_per_worker=1", f"train.storage_path={tmp / 'ray'}",
        f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}", "tracking.system_metrics=false",
        "eval.loss_blocks=2", "eval.lengths=[64, 128]", "eval.stride=32", "eval.max_eval_tokens=2000",
        "eval.passkey_trials=0", "eval.before_after=false", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
        "tune.name=search", "tune.num_samples=3", "tune.max_steps=4", "tune.eval_every=2",
        "tune.grace_period=2", "tune.reduction_factor=2", "tune.max_concurrent_trials=1",
        "tune.seed=6",  # samples (lr, adapter, rank, ratio) = (1e-2, lora2, 8, 1/2), (1e-6, lora_plus,
        # 8, 1/2), (1e-2, lora2, 4, 1/4): the useless trial has a good rung to be compared with
        f"tune.output_dir={tmp / 'out'}", SPACE,
        *extra,
    ])


class InterruptAfterFirstTrial:
    """A Ray Tune callback that records trial starts in a file and, the first time a trial
    completes, sends this process SIGUSR1 (Tune's signal to stop and save, like Ctrl+C).
    Tune pickles it with the experiment, so the relaunched search runs it again: the
    marker file makes the interruption happen once."""

    def __new__(cls, directory: Path):
        from ray.tune import Callback

        class _Callback(Callback):
            def __init__(self, d: str) -> None:
                self.d = d

            def on_trial_start(self, iteration, trials, trial, **info):
                with open(os.path.join(self.d, "starts.txt"), "a") as f:
                    f.write(trial.trial_id + "\n")

            def on_trial_complete(self, iteration, trials, trial, **info):
                marker = os.path.join(self.d, "interrupted")
                if not os.path.exists(marker):
                    Path(marker).write_text(trial.trial_id)
                    os.kill(os.getpid(), signal.SIGUSR1)

        return _Callback(str(directory))


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory, tiny_model_dir, corpus_dir):
    from longtune.tune import tune

    tmp = tmp_path_factory.mktemp("tune")
    config = tune_config(tmp, tiny_model_dir, corpus_dir)
    started = time.perf_counter()
    first = tune(config, callbacks=[InterruptAfterFirstTrial(tmp)])
    second = tune(config)  # the same name and storage: resumes
    return SimpleNamespace(first=first, result=second, tmp=tmp, config=config,
                           seconds=time.perf_counter() - started)


def mlflow_client(tmp: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")


# -------------------------------------------------------------------- the search


@pytest.mark.slow
def test_interrupted_search_resumes_without_rerunning_finished_trials(search):
    first, result, tmp = search.first, search.result, search.tmp
    done = (tmp / "interrupted").read_text()
    assert not first.finished and first.best is None and not first.files
    assert [r.outcome for r in first.rows if r.trial_id == done] == ["completed"]
    assert result.finished and len(result.rows) == 3
    starts = (tmp / "starts.txt").read_text().split()
    assert starts.count(done) == 1  # the finished trial did not run again
    assert sorted(set(starts)) == [r.trial_id for r in result.rows]
    # its MLflow run holds each step once, and so does every other trial's (a stopped trial
    # may train on for a step or two while it is being stopped)
    client = mlflow_client(tmp)
    for row in result.rows:
        steps = [m.step for m in client.get_metric_history(row.mlflow_run_id, "eval/loss")]
        assert steps == sorted(set(steps)) and steps[0] == 0 and row.steps in steps, (row.trial_id, steps)


@pytest.mark.slow
def test_asha_stops_the_useless_learning_rate(search):
    rows = search.result.rows
    by_outcome = {o: [r for r in rows if r.outcome == o] for o in ("completed", "stopped early", "error")}
    assert not by_outcome["error"], [r.error for r in rows]
    shown = [(r.params, r.steps, r.objective) for r in rows]
    assert by_outcome["stopped early"], shown
    for r in rows:  # every useless trial stopped, at the first rung it reached
        assert (r.outcome == "stopped early") == (r.params["train.lr"] == 1e-6), shown
        assert r.steps == (2 if r.params["train.lr"] == 1e-6 else 4), shown
    assert {r.params["adapter.type"] for r in by_outcome["completed"]} == {"lora2"}
    best = search.result.best
    assert best.outcome == "completed" and best.steps == 4 and best.params["train.lr"] == 1e-2
    assert best.objective == min(r.objective for r in by_outcome["completed"])


@pytest.mark.slow
def test_outputs_table_plot_and_best_config(search):
    result = search.result
    out = Path(result.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["best_config.yaml", "objective.png", "results.csv"]
    lines = (out / "results.csv").read_text().splitlines()
    assert lines[0].split(",")[:6] == ["trial_id", "train.lr", "adapter.type", "adapter.rank",
                                       "attention.group_size_ratio", "eval_loss"]
    assert len(lines) == 4
    assert (out / "objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(out / "best_config.yaml")
    assert best.train.lr == result.best.params["train.lr"]
    assert best.adapter.rank == result.best.params["adapter.rank"]
    assert best.adapter.type == result.best.params["adapter.type"] == "lora2"
    assert best.train.run_name is None and best.train.max_steps == search.config.train.max_steps


@pytest.mark.slow
def test_mlflow_parent_run_with_one_nested_run_per_trial(search):
    result, client = search.result, mlflow_client(search.tmp)
    parent = client.get_run(result.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["longtune.job"] == "tune" and parent.data.tags["longtune.tune_name"] == "search"
    assert json.loads(parent.data.params["tune.search_space"])["train.lr"] == {"choice": [1e-2, 1e-6]}
    assert parent.data.metrics["tune/best_eval_loss"] == pytest.approx(result.best.objective)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert artifacts == {"tune/best_config.yaml", "tune/results.csv", "tune/objective.png"}
    parents = client.search_runs([parent.info.experiment_id], "tags.`longtune.job` = 'tune'")
    assert len(parents) == 1  # the resumed search kept its run
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["longtune.tune_trial_id"] for c in children) == [r.trial_id for r in result.rows]
    for child in children:
        row = next(r for r in result.rows if r.trial_id == child.data.tags["longtune.tune_trial_id"])
        assert child.info.status == "FINISHED"
        assert child.data.tags["longtune.trial_outcome"] == row.outcome
        assert float(child.data.params["train.lr"]) == row.params["train.lr"]
        assert child.data.params["train.max_steps"] == "4"
        assert child.data.metrics["tune/final_eval_loss"] == pytest.approx(row.objective)
        assert {"train/loss", "eval/loss", "train/step_time_s", "tune/steps_run"} <= set(child.data.metrics)
        assert "plots/loss_curve.png" in {a.path for a in client.list_artifacts(child.info.run_id, "plots")}


@pytest.mark.slow
def test_nothing_reserved_after_the_search(search):
    import ray

    deadline = time.time() + 20
    while True:
        groups = ray.util.placement_group_table().values()
        leftover = [g for g in groups if g["state"] != "REMOVED"]
        available, total = ray.available_resources(), ray.cluster_resources()
        busy = {k: (available.get(k, 0), v) for k, v in total.items()
                if k in ("CPU", "GPU", "memory") and abs(available.get(k, 0) - v) > 1e-6}
        if (not leftover and not busy) or time.time() > deadline:
            break
        time.sleep(1)
    assert not leftover, leftover
    assert not busy, busy


@pytest.mark.slow
def test_best_config_yaml_trains(search, tmp_path):
    from longtune.finetune import finetune

    path = Path(search.result.output_dir) / "best_config.yaml"
    config = load_config(path, ["train.max_steps=2", "train.run_name=from-best"])
    result = finetune(config)
    assert result.metrics["step"] == 2 and Path(result.adapter_path).is_dir()


@pytest.mark.slow
def test_optuna_search_runs_an_fsdp_trial(ray_local, tmp_path, tiny_model_dir, corpus_dir):
    """An Optuna search whose trial trains with train.strategy=fsdp (its one worker's model
    sharded over a mesh of one): the trial completes, its checkpoint is the sharded kind. Its
    blocks come from a `longtune prepare` dataset its worker reads itself (the first ones a
    trial needs: tune/data.py), without Ray Data."""
    pytest.importorskip("optuna")
    from longtune.data.pipeline import prepare
    from longtune.tune import tune
    from longtune.tune.data import prepare_search_data

    prepared = f"data.prepared_path={tmp_path / 'prepared'}"
    config = tune_config(tmp_path, tiny_model_dir, corpus_dir, "tune.name=optuna", "tune.search_alg=optuna",
                         "tune.num_samples=1", "tune.max_steps=2", "tune.grace_period=2", "train.strategy=fsdp",
                         prepared)
    manifest = prepare(config)
    datasets, with_eval = prepare_search_data(config)
    assert with_eval and datasets["train"].total == 2 < manifest["blocks"]["train"]  # 2 steps x 1 block
    assert datasets["eval"].total == 2  # eval.loss_blocks
    result = tune(config)
    assert result.finished and [r.outcome for r in result.rows] == ["completed"]
    assert Path(result.files["best_config.yaml"]).is_file()
    assert list(Path(result.experiment_path).glob("train/*/checkpoint_*/sharded/.metadata"))


# -------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("override,message", [
    ("tune.search_space={adapter.rnak: {choice: [4]}}", "unknown config key 'adapter.rnak'"),
    ("tune.search_space={data.context_length: {choice: [64]}}", "data.context_length cannot be searched"),
    ("tune.search_space={model.target_context: {choice: [64]}}", "cannot be searched"),
    ("tune.search_space={adapter.rank: {choice: [4, 0]}}", "choice value 0 is rejected: adapter.rank"),
    ("tune.search_space={train.lr: {loguniform: [0, 1]}}", "loguniform needs lo > 0"),
    ("tune.search_space={train.lr: {uniform: [1, 0.1]}}", "lo < hi"),
    ("tune.grace_period=50", "tune.grace_period (50) must be <= tune.max_steps (40)"),
])
def test_bad_search_spaces_are_refused_before_ray_starts(override, message):
    from longtune.tune import check_search_space

    with pytest.raises(ConfigError, match=_escape(message)):
        check_search_space(load_config(None, [override]))


def test_optuna_without_optuna_says_how_to_install(monkeypatch):
    import importlib.util

    from longtune.tune import check_search_space

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optuna" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install optuna"):
        check_search_space(load_config(None, ["tune.search_alg=optuna"]))


def test_cli_refuses_a_bad_space_with_one_line_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "tune.py"), "tune.search_space={data.eval_fraction: {choice: [0.1]}}",
         f"tune.output_dir={tmp_path / 'out'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("longtune tune: config error: tune.search_space: data.eval_fraction")
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_concurrency_follows_the_resources():
    from longtune.tune import concurrency, fitting_trials

    def cluster(**have):
        return SimpleNamespace(cluster_resources=lambda: have)

    config = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1"])
    assert fitting_trials(config, {"CPU": 9}, use_gpu=False) == 3  # 1 + 2 x 1 CPU a trial
    assert fitting_trials(config, {"CPU": 64, "GPU": 4}, use_gpu=True) == 2  # 2 GPUs a trial
    joined = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=1",
                                "scaling.ray_address=ray://head:10001", "tune.num_samples=20"])
    assert concurrency(joined, cluster(CPU=64.0, GPU=8.0), use_gpu=True) == 4
    assert concurrency(joined, cluster(CPU=64.0), use_gpu=False) == 20  # 21 fit, 20 samples
    # a local Ray: the machine's cores bound it too (logical CPUs are sized above them)
    local = load_config(None, ["scaling.num_workers=2", "scaling.cpus_per_worker=0.5"])
    assert concurrency(local, cluster(CPU=4.0), use_gpu=False) == max(1, min(2, (os.cpu_count() or 1) // 2))
    # an explicit value the local Ray cannot hold is refused, not left to wait forever
    from longtune.tune import TuneSetupError

    too_many = load_config(None, ["tune.max_concurrent_trials=3"])
    with pytest.raises(TuneSetupError, match=r"max_concurrent_trials=3 needs 2 CPU per trial"):
        concurrency(too_many, cluster(CPU=4.0), use_gpu=False)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_trials_log_to_the_drivers_mlflow_store(tmp_path, monkeypatch):
    """A trial runs in its own working directory: the driver's default store is written in."""
    from longtune.tune import with_resolved_tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    trial = with_resolved_tracking(load_config(None, []))
    assert trial.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert trial.tracking.experiment_name == "longtune"


# -------------------------------------------------------------------- results, without Ray


def _row(trial_id: str, objective, outcome: str, **kw):
    from longtune.tune import TrialRow

    steps = 4 if outcome == "completed" else 2
    return TrialRow(trial_id, kw.pop("params", {}), objective, steps, outcome, kw.pop("step_time_s", None),
                    "ERROR" if outcome == "error" else "TERMINATED", **kw)


def test_the_best_trial_is_the_best_of_those_that_ran_every_step():
    from longtune.tune.results import best_row

    rows = [_row("a", 5.0, "completed"), _row("b", 4.0, "stopped early"), _row("c", 4.5, "completed"),
            _row("d", None, "completed"), _row("e", 1.0, "error")]
    assert best_row(rows, "min").trial_id == "c"  # b's better value is no final score
    assert best_row(rows, "max").trial_id == "a"
    stopped = [_row("b", 4.0, "stopped early"), _row("f", 3.0, "stopped early"), _row("e", 1.0, "error")]
    assert best_row(stopped, "min").trial_id == "f"  # none completed: the stopped ones count
    assert best_row([_row("e", 1.0, "error"), _row("d", None, "completed")], "min") is None


def test_results_csv_has_a_column_per_searched_key_and_blanks_for_missing_values():
    from longtune.tune.results import results_csv

    config = load_config(None, ["tune.search_space={train.lr: {loguniform: [1.0e-5, 1.0e-3]}, "
                                "adapter.rank: {choice: [4, 8]}}"])
    rows = [_row("a", 5.123456789, "completed", params={"train.lr": 1e-4, "adapter.rank": 8}, step_time_s=1.23456,
                 mlflow_run_id="r1"),
            _row("b", None, "error", params={"train.lr": 2e-5, "adapter.rank": 4}, error="boom")]
    assert results_csv(config, rows).splitlines() == [
        "trial_id,train.lr,adapter.rank,eval_loss,steps,outcome,step_time_s,status,mlflow_run_id,error",
        "a,0.0001,8,5.12346,4,completed,1.235,TERMINATED,r1,",
        "b,2e-05,4,,2,error,,ERROR,,boom",
    ]


def test_searches_saved_before_the_package_split_still_load():
    """Ray Tune pickles a search's scheduler, callbacks and trial-folder function by module and
    name (tuner.pkl): those of a search saved when they lived in longtune/tune.py resolve."""
    import pickle

    from longtune.tune.asha import ResumableASHA

    assert pickle.loads(b"clongtune.tune\nResumableASHA\n.") is ResumableASHA
    for name in ("ReleaseTrialRuns", "ProgressLines", "_trial_dirname"):
        assert callable(pickle.loads(f"clongtune.tune\n{name}\n.".encode()))
