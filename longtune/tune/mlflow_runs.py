"""MLflow for a search: the parent run (found again when a search resumes), one nested run
per trial and its ending, the trials' view of the driver's store."""

from __future__ import annotations

from typing import TYPE_CHECKING

from longtune.config import Config

if TYPE_CHECKING:
    from longtune.tune.results import TrialRow, TuneResult

TUNE_NAME_TAG = "longtune.tune_name"
TRIAL_ID_TAG = "longtune.tune_trial_id"


def with_resolved_tracking(config: Config) -> Config:
    """The config trials get: the MLflow store and experiment written in, as the driver
    resolves them (a trial runs in its own working directory, where a default
    ``sqlite:///mlflow.db`` would be another store)."""
    from longtune.tracking import resolved_config

    if not config.tracking.enabled:
        return config
    return config.model_copy(update={"tracking": resolved_config(config.tracking)})


def parent_tracker(config: Config, name: str, experiment_path: str):
    """The search's MLflow run: the one this search name had before (a resumed search), else
    a new one. Params: the job's config (the search space included); tags name the search."""
    if not config.tracking.enabled:
        return None
    from longtune.tracking import JOB_TAG, find_run, start_job_run

    previous = find_run(config.tracking, {JOB_TAG: "tune", TUNE_NAME_TAG: name})
    return start_job_run(config, name, job="tune", run_id=previous,
                         tags={TUNE_NAME_TAG: name, "longtune.tune_path": experiment_path})


def child_run_id(config: Config, parent_run_id: str, trial_id: str) -> str | None:
    """The nested run of ``trial_id`` under the search's run, if it has one already."""
    from longtune.tracking import PARENT_RUN_TAG, find_run

    return find_run(config.tracking, {PARENT_RUN_TAG: parent_run_id, TRIAL_ID_TAG: trial_id})


def finish_child_runs(config: Config, rows: list[TrialRow], parent) -> None:
    """Each trial's nested run gets its outcome, final metrics and loss curve, and ends:
    FINISHED (completed or stopped early: the tag says which), FAILED on error, KILLED when
    the search was interrupted first. The driver does this for every trial alike: a trial
    stopped by ASHA ends mid-run, with no chance to close its own run."""
    if parent is None:
        return
    from longtune.tracking import Tracker, loss_curves

    for row in rows:
        run_id = child_run_id(config, parent.run_id, row.trial_id)
        row.mlflow_run_id = run_id
        if run_id is None:
            continue
        child = Tracker.attach(parent.cfg, run_id, system_metrics=False)
        child.set_tags({"longtune.trial_outcome": row.outcome, **({"longtune.error": row.error} if row.error else {})})
        if row.objective is not None:
            child.log_metrics({f"final_{config.tune.metric}": row.objective, "steps_run": row.steps}, row.steps)
        child.log_loss_curve(loss_curves(child))
        status = {"error": "FAILED", "unfinished": "KILLED"}.get(row.outcome, "FINISHED")
        child.client.set_terminated(run_id, status)


def log_parent(parent, config: Config, result: TuneResult) -> None:
    counts = {o: sum(r.outcome == o for r in result.rows) for o in ("completed", "stopped early", "error")}
    metrics = {"trials_completed": counts["completed"], "trials_stopped_early": counts["stopped early"],
               "trials_failed": counts["error"]}
    if result.best is not None:
        metrics[f"best_{config.tune.metric}"] = result.best.objective
        parent.set_tags({"longtune.best_trial_id": result.best.trial_id,
                         "longtune.best_run_id": result.best.mlflow_run_id or ""})
        parent.log_params({f"best.{k}": v for k, v in result.best.params.items()})
    parent.log_metrics(metrics, config.tune.max_steps)
    for path in result.files.values():
        parent.log_artifact(path, "tune")
