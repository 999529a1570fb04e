"""ASHA for a search, with rungs that survive a resumed search (Ray Tune saves no
scheduler state)."""

from __future__ import annotations

import json
from typing import Any

from ray.tune.schedulers import ASHAScheduler

from longtune.config import Config


def scheduler(config: Config) -> ResumableASHA:
    """ASHA on the training ``step``: rungs at tune.grace_period x tune.reduction_factor^k,
    up to tune.max_steps."""
    t = config.tune
    return ResumableASHA(
        time_attr="step", max_t=t.max_steps, grace_period=t.grace_period,
        reduction_factor=t.reduction_factor, stop_last_trials=False,  # trials end at max_steps
    )


class ResumableASHA(ASHAScheduler):
    """ASHA whose rungs survive a resumed search. Ray Tune does not save a scheduler's
    state: on restore it only re-adds the trials, so the rungs would start empty and the
    resumed trials would have nothing to be compared with. Each re-added trial's reported
    history (its result.json) is replayed into its bracket instead."""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        bracket = self._trial_info[trial.trial_id]
        for result in _reported(trial):
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr], self._metric_op * result[self._metric])


def _reported(trial) -> list[dict[str, Any]]:
    """The results a (restored) trial reported before, from its result.json; [] if none."""
    storage = getattr(trial, "storage", None)
    if storage is None or storage.trial_dir_name is None:  # a new trial: nothing reported yet
        return []
    try:
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/result.json") as f:
            lines = f.read().decode().splitlines()
    except (OSError, ValueError):  # created, but nothing reported yet
        return []
    return [json.loads(line) for line in lines if line.strip()]
