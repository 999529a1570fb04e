"""One trial: Ray Tune's function trainable, a whole longtune training with the sampled
values.

A trial is Ray Train V2's "train driver function": it runs in a Tune actor holding one CPU,
builds the same TorchTrainer as finetune (longtune.train.trainer.build_trainer) with the
sampled overrides applied to the job's config, and fits it; the training workers take their
own resources. ``TuneReportCallback`` forwards rank 0's reports to Tune, so ASHA sees every
evaluation (trials score, checkpoint and report every ``tune.eval_every`` steps; ASHA's time
is the training ``step``).
"""

from __future__ import annotations

from typing import Any

from longtune.config import from_dict
from longtune.tune.cleanup import record_run_callbacks, was_released
from longtune.tune.mlflow_runs import TRIAL_ID_TAG, TUNE_NAME_TAG, child_run_id
from longtune.tune.space import trial_config


def run_trial(
    params: dict[str, Any],
    *,
    base: dict[str, Any],
    setup,
    datasets: dict[str, Any],
    with_eval: bool,
    train_storage: str,
    parent_run_id: str | None,
    search_name: str,
) -> None:
    """Ray Tune's function trainable: one longtune training with the sampled overrides."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from longtune.tracking import start_job_run
    from longtune.train.trainer import build_trainer

    config = trial_config(from_dict(base), params)
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = None
    if parent_run_id is not None:
        tracker = start_job_run(
            config, f"{search_name}-{trial_id}", job="tune-trial", parent_run_id=parent_run_id,
            run_id=child_run_id(config, parent_run_id, trial_id),  # a resumed trial continues its run
            tags={TUNE_NAME_TAG: search_name, TRIAL_ID_TAG: trial_id,
                  **{f"longtune.param.{k}": v for k, v in params.items()}},
            system_metrics=False,  # rank 0 logs the workers' system metrics
        )
    trainer = build_trainer(
        config, setup, run_name=trial_id, storage=train_storage, datasets=datasets,
        has_eval=with_eval, tracker=tracker,
        callbacks=[TuneReportCallback(), *record_run_callbacks(search_name, trial_id)],
    )
    try:
        trainer.fit()  # the driver ends the MLflow run with the trial's outcome
    except ray.exceptions.RayActorError:
        if not was_released(search_name, trial_id):
            raise
        # the search ended this trial's Train run (ASHA stopped it): not an error
