"""The search's progress on the console: one line per evaluation of each trial and one when
a trial ends."""

from __future__ import annotations

from ray.tune import Callback

from longtune.tune.results import params_text


class ProgressLines(Callback):
    """One line per evaluation of each trial and one when a trial ends (Tune's own status
    tables are turned off: with worker lines beside them they bury the results)."""

    def __init__(self, metric: str, max_steps: int) -> None:
        self.metric, self.max_steps = metric, max_steps

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[tune] {trial.trial_id} started: {params_text(trial.config)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("checkpoint_barrier") or self.metric not in result:
            return
        print(f"[tune] {trial.trial_id} step {result.get('step')}: {self.metric}={result[self.metric]:.4f}",
              flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        step = last.get("step", 0)
        how = "completed" if step >= self.max_steps else "stopped early by ASHA"
        value = last.get(self.metric)
        shown = f", {self.metric}={value:.4f}" if value is not None else ""
        print(f"[tune] {trial.trial_id} {how} at step {step}{shown}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] {trial.trial_id} failed (see the results table)", flush=True)
