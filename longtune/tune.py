"""`longtune tune`: a Ray Tune search over S2-Attn group size, LoRA rank, adapter type and
learning rate, one longtune training per trial, tracked in MLflow.

Reads top to bottom: check the search space (before Ray starts) -> set up the driver as
finetune does (model, Ray, resources, storage) -> prepare the blocks the trials read, once
-> the MLflow parent run -> a Tuner (or the interrupted one, restored) whose function
trainable builds and fits one TorchTrainer per trial -> per trial: outcome, final metrics and
curves on its nested MLflow run -> the results table, the plot and the best config.

A trial is Ray Train V2's "train driver function": it runs in a Tune actor holding one CPU,
builds the same TorchTrainer as finetune (longtune.train.trainer.build_trainer) with the
sampled overrides applied to the job's config, and fits it; the training workers take their
own resources. ``TuneReportCallback`` forwards rank 0's reports to Tune, so ASHA sees every
evaluation (trials score, checkpoint and report every ``tune.eval_every`` steps; ASHA's time
is the training ``step``). A trial's Train run is ``<storage>/<search>/train/<trial id>``:
stable across a resume, so an interrupted trial continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler

from longtune.config import Config, ConfigError, from_dict, with_overrides

TRIAL_CPUS = 1.0
"""Logical CPUs of a trial's own actor (the Train driver of that trial; Ray Tune's default).
Together with the workers' CPUs it is what one trial holds."""

FIXED_PREFIXES = ("model.", "data.", "eval.", "export.", "tune.", "tracking.", "scaling.")
FIXED_TRAIN_KEYS = ("train.max_steps", "train.log_every", "train.checkpoint_every",
                    "train.run_name", "train.storage_path")
WHY_FIXED = (
    "model and data settings define the blocks prepared once for the whole search, scaling "
    "sets what a trial holds, and a trial's length and reports are tune.max_steps and "
    "tune.eval_every"
)


class TuneSetupError(RuntimeError):
    """The search cannot run as configured; the message says why and what to change."""


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    objective: float | None
    steps: int
    outcome: str  # completed | stopped early | error | unfinished
    step_time_s: float | None
    status: str  # Ray Tune's: TERMINATED, ERROR, ...
    error: str = ""
    mlflow_run_id: str | None = None


@dataclass
class TuneResult:
    name: str
    experiment_path: str
    rows: list[TrialRow]
    finished: bool
    best: TrialRow | None = None
    best_config: Config | None = None
    output_dir: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None


# -------------------------------------------------------------------- search space


def check_search_space(config: Config) -> None:
    """Refuse, before Ray starts, a search the trials could not run: an unknown key, a key
    that would change the prepared data or a trial's resources, a value the config rejects
    (every choice, both bounds of a range, and every combination of choices, so a sampled
    trial never fails validation in a worker), optuna when it is not installed."""
    t = config.tune
    if not t.search_space:
        raise ConfigError("tune.search_space is empty: name at least one config key to search")
    known = config.flat()
    for key in t.search_space:
        if key not in known:
            raise ConfigError(f"tune.search_space: unknown config key {key!r}")
        if key.startswith(FIXED_PREFIXES) or key in FIXED_TRAIN_KEYS:
            raise ConfigError(f"tune.search_space: {key} cannot be searched ({WHY_FIXED})")
    values: dict[str, list] = {}
    for key, spec in t.search_space.items():
        kind, args = next(iter(spec.items()))
        values[key] = list(args)
        for value in args:
            try:
                with_overrides(config, {key: value})
            except ConfigError as err:
                raise ConfigError(f"tune.search_space.{key}: {kind} value {value!r} is rejected: {err}") from None
    for combo in itertools.islice(itertools.product(*values.values()), 100_000):
        overrides = dict(zip(values, combo))
        try:
            trial_config(config, overrides)
        except ConfigError as err:
            shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
            raise ConfigError(
                f"tune.search_space: the combination {shown} is rejected: {err}; narrow the space"
            ) from None
    if t.metric.startswith("eval_") and not has_eval(config):
        raise ConfigError(
            f"tune.metric={t.metric} needs held-out blocks: data.eval_fraction > 0 and "
            "eval.loss_blocks > 0 (or tune.metric=loss)"
        )
    if t.search_alg == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(
                "tune.search_alg=optuna needs Optuna: pip install optuna (or tune.search_alg=random)"
            )


def has_eval(config: Config) -> bool:
    return config.data.eval_fraction > 0 and config.eval.loss_blocks > 0


def trial_config(config: Config, overrides: dict[str, Any]) -> Config:
    """One trial's config: the job's, the sampled overrides, and the trial settings (a
    trial of tune.max_steps steps that scores, checkpoints and reports every tune.eval_every
    steps, without the before/after scoring)."""
    t = config.tune
    return with_overrides(config, {
        **overrides,
        "train.max_steps": t.max_steps,
        "train.log_every": t.eval_every,
        "train.checkpoint_every": t.eval_every,
        "train.run_name": None,
        "eval.before_after": False,
    })


def param_space(config: Config) -> dict[str, Any]:
    from ray import tune

    space = {}
    for key, spec in config.tune.search_space.items():
        kind, args = next(iter(spec.items()))
        space[key] = {"choice": tune.choice, "uniform": tune.uniform,
                      "loguniform": tune.loguniform}[kind](*([args] if kind == "choice" else args))
    return space


# -------------------------------------------------------------------- resources


def trial_resources(config: Config, use_gpu: bool) -> dict[str, float]:
    """What one trial holds while it runs: its own actor plus its training workers."""
    s = config.scaling
    need = {"CPU": TRIAL_CPUS + s.num_workers * s.cpus_per_worker}
    if use_gpu:
        need["GPU"] = float(s.num_workers)
    return need


def fitting_trials(config: Config, resources: dict[str, float], use_gpu: bool) -> int:
    """How many trials the given resources hold at once (0 if not even one)."""
    need = trial_resources(config, use_gpu)
    return min(math.floor(resources.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0)


def _joined(config: Config) -> bool:
    return bool(config.scaling.ray_address or os.environ.get("RAY_ADDRESS"))


def local_ray_config(config: Config) -> Config:
    """The config a local Ray is started from: big enough for tune.max_concurrent_trials
    trials when that is set (otherwise runtime.local_cpus_needed's sizing holds one trial
    beside the data preparation)."""
    from longtune.runtime import local_cpus_needed

    t, s = config.tune, config.scaling
    if _joined(config) or s.local_num_cpus is not None or t.max_concurrent_trials is None:
        return config
    want = math.ceil(t.max_concurrent_trials * trial_resources(config, False)["CPU"])
    return with_overrides(config, {"scaling.local_num_cpus": max(local_cpus_needed(config), want)})


def concurrency(config: Config, ray, use_gpu: bool) -> int:
    """tune.max_concurrent_trials, else as many trials as the cluster holds at once. On a
    local Ray the machine's cores count too: its logical CPUs are sized above them so Ray
    Data can run beside training, and trials sharing cores only run slower, giving ASHA
    fewer finished rungs to compare with."""
    t = config.tune
    have = ray.cluster_resources()
    fit = fitting_trials(config, have, use_gpu)
    if t.max_concurrent_trials is not None:
        if t.max_concurrent_trials > fit:
            message = (
                f"tune.max_concurrent_trials={t.max_concurrent_trials} needs "
                f"{_show_resources(trial_resources(config, use_gpu))} per trial, the cluster has "
                f"{_show_resources(have)} (at most {fit} trial(s) at once)"
            )
            if not _joined(config):
                raise TuneSetupError(f"not enough resources: {message}")
            print(f"[longtune] warning: {message} (waiting for the autoscaler)")
        return min(t.max_concurrent_trials, t.num_samples)
    if not _joined(config):
        cores = {"CPU": float(os.cpu_count() or 1), "GPU": have.get("GPU", 0)}
        fit = min(fit, fitting_trials(config, cores, use_gpu))
    return max(1, min(fit, t.num_samples))


def _show_resources(resources: dict[str, float]) -> str:
    return " + ".join(f"{resources[k]:g} {k}" for k in ("CPU", "GPU") if resources.get(k))


# -------------------------------------------------------------------- data, once


def prepare_search_data(config: Config) -> tuple[dict[str, Any], bool]:
    """The blocks every trial reads, prepared once and kept in Ray's object store: the first
    tune.max_steps x workers x batch x accumulation training blocks (what one trial
    consumes; the largest batch in the space) and eval.loss_blocks held-out blocks."""
    from longtune.train.trainer import open_datasets

    s, t = config.scaling, config.train
    space = config.tune.search_space
    batch = _largest(space, "train.batch_size_per_worker", t.batch_size_per_worker)
    accum = _largest(space, "train.grad_accum_steps", t.grad_accum_steps)
    n_train = config.tune.max_steps * s.num_workers * batch * accum
    # The final packing pass gathers pack_batch_tokens before it yields: no more than needed.
    cap = max(n_train, config.eval.loss_blocks) * config.context_length
    data_config = with_overrides(config, {"data.pack_batch_tokens": min(config.data.pack_batch_tokens, cap)})
    datasets, with_eval = open_datasets(data_config)
    datasets["train"] = datasets["train"].limit(n_train).materialize()
    if with_eval:
        datasets["eval"] = datasets["eval"].limit(config.eval.loss_blocks).materialize()
    return datasets, with_eval


def _largest(space: dict[str, Any], key: str, default: int) -> int:
    spec = space.get(key)
    if not spec:
        return default
    kind, args = next(iter(spec.items()))
    return int(max(args)) if kind == "choice" else math.ceil(args[-1])


# -------------------------------------------------------------------- one trial


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

    from longtune.train.trainer import build_trainer, start_tracking

    config = trial_config(from_dict(base), params)
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = None
    if parent_run_id is not None:
        tracker = start_tracking(
            config, f"{search_name}-{trial_id}", job="tune-trial", parent_run_id=parent_run_id,
            run_id=_child_run_id(config, parent_run_id, trial_id),  # a resumed trial continues its run
            tags={"longtune.tune_name": search_name, "longtune.tune_trial_id": trial_id,
                  **{f"longtune.param.{k}": v for k, v in params.items()}},
            system_metrics=False,  # rank 0 logs the workers' system metrics
        )
    trainer = build_trainer(
        config, setup, run_name=trial_id, storage=train_storage, datasets=datasets,
        has_eval=with_eval, tracker=tracker,
        callbacks=[TuneReportCallback(), *_record_run_callbacks(search_name, trial_id)],
    )
    try:
        trainer.fit()  # the driver ends the MLflow run with the trial's outcome
    except ray.exceptions.RayActorError:
        if not ray.get(_registry(search_name).was_released.remote(trial_id)):
            raise
        # the search ended this trial's Train run (ASHA stopped it): not an error


# -------------------------------------------------------------------- ending a trial's run
#
# A trial's Train run lives in actors the trial's actor owns. When Tune stops a trial (ASHA,
# the end of an interrupted search) it ends that actor, and the Train controller dies with it
# without shutting down: its workers' placement group stays reserved. Ray Train then relies
# on a detached PlacementGroupCleaner that asks the state API (the dashboard) whether the
# controller is alive; without a dashboard (a local Ray started by longtune, the tests) or
# with several Rays on one machine it cannot tell, and the reserved CPUs/GPUs would starve
# the next trials. So each trial's controller records itself and its placement group with a
# registry actor of the search, and the driver aborts the controller (Ray Train's own
# graceful abort: workers stopped, placement group removed, cleaner stopped) when the trial
# ends, before Tune ends the trial's actor; placement groups of controllers that died anyway
# (an interrupted search) are removed after the search.


@ray.remote(num_cpus=0)
class TrialRuns:
    """The search's record of each trial's Train controller and worker placement group."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.released: set[str] = set()

    def add(self, trial_id: str, **entry) -> None:
        self.runs.setdefault(trial_id, {}).update(entry)
        self.released.discard(trial_id)

    def release(self, trial_id: str) -> dict[str, Any] | None:
        self.released.add(trial_id)
        return self.runs.pop(trial_id, None)

    def was_released(self, trial_id: str) -> bool:
        return trial_id in self.released

    def trial_ids(self) -> list[str]:
        return list(self.runs)


def _registry_name(search_name: str) -> str:
    return f"longtune-tune-{search_name}"


def _registry(search_name: str):
    return ray.get_actor(_registry_name(search_name))


def _record_run_callbacks(search_name: str, trial_id: str) -> list:
    """A Ray Train callback (in the trial's controller) that records the controller and its
    workers' placement group. Built on Ray Train's internal callback hooks, as Ray Train's
    own PlacementGroupCleanerCallback is; [] if a Ray version lacks them."""
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
    except ImportError:  # pragma: no cover - another Ray version
        return []

    class RecordTrialRun(ControllerCallback, WorkerGroupCallback):
        def after_controller_start(self, train_run_context):
            controller = ray.get_runtime_context().current_actor
            ray.get(_registry(search_name).add.remote(trial_id, controller=controller))

        def after_worker_group_start(self, worker_group):
            pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
            ray.get(_registry(search_name).add.remote(trial_id, placement_group=pg))

    return [RecordTrialRun()]


def release_trial_run(search_name: str, trial_id: str, timeout_s: float = 60.0) -> None:
    """End trial ``trial_id``'s Train run if it still runs, and free its placement group."""
    from ray.util.placement_group import remove_placement_group

    entry = ray.get(_registry(search_name).release.remote(trial_id))
    if not entry:
        return
    controller, pg = entry.get("controller"), entry.get("placement_group")
    if controller is not None:
        try:  # abort() ends the controller actor, so the call itself ends in an actor error
            ray.get(controller.abort.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
    if pg is not None and ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
        remove_placement_group(pg)


class ReleaseTrialRuns(Callback):
    """Ray Tune callback (driver): end a trial's Train run as soon as the trial ends, before
    Tune ends the trial's actor (see above)."""

    def __init__(self, search_name: str) -> None:
        self.search_name = search_name

    def on_trial_complete(self, iteration, trials, trial, **info):
        release_trial_run(self.search_name, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        release_trial_run(self.search_name, trial.trial_id)


# -------------------------------------------------------------------- the search


def tune(config: Config, *, console=None, callbacks: list | None = None) -> TuneResult:
    """Run (or resume) the search ``config.tune`` describes. ``callbacks``: extra Ray Tune
    callbacks (tests use one to interrupt a search); a resumed search keeps the callbacks
    it was started with (Ray Tune restores them)."""
    import ray.tune
    from rich.console import Console

    from longtune.train.trainer import setup_driver

    console = console or Console(stderr=True)
    t = config.tune
    check_search_space(config)
    name = t.name or f"tune-{time.strftime('%Y%m%d-%H%M%S')}"
    config = with_overrides(config, {"tune.name": name})

    # ---------------------------------------------------------------- driver, resources
    setup = setup_driver(local_ray_config(config))  # also checks that one trial fits
    n_parallel = concurrency(config, setup.ray, setup.use_gpu)
    experiment_path = f"{setup.storage.rstrip('/')}/{name}"
    resuming = ray.tune.Tuner.can_restore(experiment_path)

    # ---------------------------------------------------------------- data, once
    started = time.perf_counter()
    datasets, with_eval = prepare_search_data(config)
    console.print(
        f"[bold]longtune tune[/] [cyan]{name}[/]{' (resuming)' if resuming else ''}: "
        f"{t.num_samples} trials of {t.max_steps} steps over {', '.join(t.search_space)}; "
        f"{n_parallel} at a time; ASHA on {t.metric} every {t.eval_every} steps from step "
        f"{t.grace_period}; data ready in {time.perf_counter() - started:.1f} s; "
        f"state in {experiment_path}",
        soft_wrap=True,
    )

    # ---------------------------------------------------------------- MLflow parent run
    parent = _parent_tracker(config, name, experiment_path)
    parent_id = parent.run_id if parent else None

    # ---------------------------------------------------------------- Tuner
    registry = TrialRuns.options(name=_registry_name(name)).remote()
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, base=_with_resolved_tracking(config).to_dict(), setup=replace(setup, ray=None),
            datasets=datasets,
            with_eval=with_eval, train_storage=f"{experiment_path}/train",
            parent_run_id=parent_id, search_name=name,
        ),
        {"CPU": TRIAL_CPUS},
    )
    try:
        if resuming:
            tuner = ray.tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True,
                                           resume_errored=True)
        else:
            tuner = ray.tune.Tuner(
                trainable,
                param_space=param_space(config),
                tune_config=ray.tune.TuneConfig(
                    metric=t.metric, mode=t.mode, num_samples=t.num_samples,
                    search_alg=_search_alg(config, n_parallel), scheduler=_scheduler(config),
                    # the random search's generator takes the limit itself (_search_alg)
                    max_concurrent_trials=n_parallel if t.search_alg == "optuna" else None,
                    trial_dirname_creator=_trial_dirname,
                ),
                run_config=ray.tune.RunConfig(
                    name=name, storage_path=setup.storage, verbose=0,
                    failure_config=ray.tune.FailureConfig(max_failures=0),
                    callbacks=[ProgressLines(t.metric, t.max_steps), ReleaseTrialRuns(name),
                               *(callbacks or [])],
                ),
            )
        grid = tuner.fit()
    except BaseException:
        if parent:
            parent.end_run("KILLED")
        raise
    finally:
        for trial_id in ray.get(registry.trial_ids.remote()):  # trials an interruption ended
            release_trial_run(name, trial_id)
        ray.kill(registry)

    # ---------------------------------------------------------------- results
    rows, finished = _rows(config, grid)
    result = TuneResult(name=name, experiment_path=experiment_path, rows=rows, finished=finished,
                        mlflow_run_id=parent_id, tracking_uri=parent.tracking_uri if parent else None)
    _finish_child_runs(config, rows, parent)
    if not finished:
        if parent:
            parent.end_run("KILLED")
        return result
    result.best = best_row(rows, t.mode)
    if result.best is not None:
        result.best_config = best_config(config, result.best.params)
    result.output_dir = t.output_dir or str(Path("outputs") / "tune" / name)
    result.files = _write_outputs(config, result)
    if parent:
        _log_parent(parent, config, result)
        parent.end_run("FINISHED")
    return result


def _with_resolved_tracking(config: Config) -> Config:
    """The config trials get: the MLflow store and experiment written in, as the driver
    resolves them (a trial runs in its own working directory, where a default
    ``sqlite:///mlflow.db`` would be another store)."""
    from longtune.tracking import resolved_config

    if not config.tracking.enabled:
        return config
    return config.model_copy(update={"tracking": resolved_config(config.tracking)})


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _search_alg(config: Config, n_parallel: int):
    """Random sampling or Optuna's TPE, seeded. A BasicVariantGenerator passed in gets no
    limit from max_concurrent_trials (Tune applies it only to the one it builds itself), so
    it is given here; Tune wraps Optuna's Searcher in a ConcurrencyLimiter."""
    t = config.tune
    if t.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=t.metric, mode=t.mode, seed=t.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=t.seed, max_concurrent=n_parallel)


def _scheduler(config: Config):
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


class ProgressLines(Callback):
    """One line per evaluation of each trial and one when a trial ends (Tune's own status
    tables are turned off: with worker lines beside them they bury the results)."""

    def __init__(self, metric: str, max_steps: int) -> None:
        self.metric, self.max_steps = metric, max_steps

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[tune] {trial.trial_id} started: {_params_text(trial.config)}", flush=True)

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


def _params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# -------------------------------------------------------------------- results


def _rows(config: Config, grid) -> tuple[list[TrialRow], bool]:
    """One row per trial, and whether the search is finished (every sample created and
    ended; an interrupted search is not). Statuses come from the saved experiment state:
    after an interruption the in-memory trials read TERMINATED, the saved ones RUNNING."""
    from ray.tune import ExperimentAnalysis

    from longtune.train.trainer import root_cause

    analysis = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    status = {trial.trial_id: trial.status for trial in analysis.trials}
    keys = list(config.tune.search_space)
    rows = []
    for result in grid:
        trial_id = Path(result.path).name  # _trial_dirname: the trial id
        metrics = result.metrics or {}
        step = int(metrics.get("step", 0))
        value = metrics.get(config.tune.metric)
        history = result.metrics_dataframe
        step_time = None
        if history is not None and "step_time_s" in history:
            step_time = float(history["step_time_s"].mean())
        if result.error is not None:
            outcome = "error"
        elif status.get(trial_id) != "TERMINATED":
            outcome = "unfinished"
        elif step >= config.tune.max_steps:
            outcome = "completed"
        else:
            outcome = "stopped early"
        rows.append(TrialRow(
            trial_id=trial_id,
            params={k: result.config.get(k) for k in keys},
            objective=float(value) if value is not None else None,
            steps=step, outcome=outcome, step_time_s=step_time,
            status=status.get(trial_id, "?"),
            error=root_cause(result.error) if result.error is not None else "",
        ))
    rows.sort(key=lambda r: r.trial_id)
    finished = len(rows) >= config.tune.num_samples and all(
        r.status in ("TERMINATED", "ERROR") for r in rows
    )
    return rows, finished


def best_row(rows: list[TrialRow], mode: str) -> TrialRow | None:
    """The best final objective among the trials that ran every step (a trial ASHA stopped
    was worse than its peers when it stopped; its early value is no final score); among
    the stopped ones only if none completed."""
    for pool in (
        [r for r in rows if r.outcome == "completed" and r.objective is not None],
        [r for r in rows if r.outcome == "stopped early" and r.objective is not None],
    ):
        if pool:
            return (min if mode == "min" else max)(pool, key=lambda r: r.objective)
    return None


def best_config(config: Config, params: dict[str, Any]) -> Config:
    """The job's config with the best trial's values: ready for `longtune finetune`."""
    return with_overrides(config, {**params, "train.run_name": None})


def results_csv(config: Config, rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = list(config.tune.search_space)
    writer.writerow(["trial_id", *keys, config.tune.metric, "steps", "outcome", "step_time_s",
                     "status", "mlflow_run_id", "error"])
    for r in rows:
        writer.writerow([
            r.trial_id, *[r.params.get(k) for k in keys],
            "" if r.objective is None else f"{r.objective:.6g}", r.steps, r.outcome,
            "" if r.step_time_s is None else f"{r.step_time_s:.4g}", r.status, r.mlflow_run_id or "",
            r.error,
        ])
    return out.getvalue()


SHORT_NAMES = {"attention.group_size_ratio": "group ratio", "adapter.rank": "rank",
               "adapter.type": "adapter", "train.lr": "lr"}


def results_table(config: Config, result: TuneResult):
    """The rows as a rich table (errors are printed below it, in full)."""
    from rich import box
    from rich.table import Table

    t = config.tune
    table = Table(title=f"longtune tune {result.name}: {t.metric} after up to {t.max_steps} steps, "
                        f"* = best", box=box.SIMPLE_HEAD)
    keys = list(t.search_space)
    for column in ["trial", *[SHORT_NAMES.get(k, k.rsplit(".", 1)[-1]) for k in keys], t.metric, "steps",
                   "outcome", "s/step"]:
        table.add_column(column, justify="left" if column in ("trial", "outcome", "adapter") else "right",
                         no_wrap=True)
    for r in result.rows:
        table.add_row(
            r.trial_id + (" *" if result.best is r else ""), *[_fmt(r.params.get(k)) for k in keys],
            "-" if r.objective is None else f"{r.objective:.4f}", str(r.steps), r.outcome,
            "-" if r.step_time_s is None else f"{r.step_time_s:.2f}",
        )
    return table


def plot_objective(config: Config, rows: list[TrialRow], path: str | os.PathLike[str]) -> Path | None:
    """The objective against each searched key (group size ratio and rank first): one panel
    per key, completed trials filled, stopped ones hollow, colour by adapter type when that
    is searched. Matplotlib's object API on an Agg canvas, as tracking.plot_loss_curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [r for r in rows if r.objective is not None and math.isfinite(r.objective)]
    if not points:
        return None
    t = config.tune
    first = ["attention.group_size_ratio", "adapter.rank"]
    keys = [k for k in first if k in t.search_space] + [
        k for k in t.search_space if k not in first and k != "adapter.type"
    ]
    keys = keys or list(t.search_space)
    colour_key = "adapter.type" if "adapter.type" in t.search_space else None
    groups = sorted({str(r.params.get(colour_key)) for r in points}) if colour_key else ["trials"]
    colours = {g: f"C{i}" for i, g in enumerate(groups)}
    fig = Figure(figsize=(4.2 * len(keys), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), i + 1)
        values = [r.params.get(key) for r in points]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        categories = sorted({str(v) for v in values})
        for r in points:
            group = str(r.params.get(colour_key)) if colour_key else "trials"
            x = r.params.get(key) if numeric else categories.index(str(r.params.get(key)))
            ax.scatter([x], [r.objective], s=40, edgecolors=colours[group],
                       facecolors=colours[group] if r.outcome == "completed" else "none", label=group)
        if numeric and key in ("attention.group_size_ratio", "adapter.rank", "train.lr") and min(values) > 0:
            ax.set_xscale("log", base=10 if key == "train.lr" else 2)
        if numeric and key in ("attention.group_size_ratio", "adapter.rank"):
            ticks = sorted(set(values))
            labels = [f"1/{round(1 / v)}" if 0 < v < 1 else f"{v:g}" for v in ticks]
            ax.set_xticks(ticks, labels)
        if not numeric:
            ax.set_xticks(range(len(categories)), categories)
        ax.set_xlabel(key)
        ax.set_ylabel(t.metric)
        ax.grid(True, alpha=0.3)
        if colour_key and i == 0:
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=8)
    fig.suptitle(f"{t.metric} by trial (filled: completed, hollow: stopped early)", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _write_outputs(config: Config, result: TuneResult) -> dict[str, str]:
    """best_config.yaml, results.csv and objective.png in the output folder, which appears
    whole (written beside it and renamed into place)."""
    from longtune.atomic import publish_dir

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        if result.best_config is not None:
            (tmp / "best_config.yaml").write_text(_best_yaml(result), encoding="utf-8")
        (tmp / "results.csv").write_text(results_csv(config, result.rows), encoding="utf-8")
        plot_objective(config, result.rows, tmp / "objective.png")

    target = publish_dir(result.output_dir, write)
    return {p.name: str(p) for p in sorted(target.iterdir())}


def _best_yaml(result: TuneResult) -> str:
    best = result.best
    header = (
        f"# The best trial of longtune tune {result.name}: {best.trial_id} "
        f"({_params_text(best.params)}), objective {best.objective:.6g} after {best.steps} steps.\n"
        "# Train it in full: python pipelines/finetune.py --config <this file>\n"
    )
    return header + result.best_config.to_yaml()


# -------------------------------------------------------------------- MLflow


def _parent_tracker(config: Config, name: str, experiment_path: str):
    """The search's MLflow run: the one this search name had before (a resumed search), else
    a new one. Params: the job's config (the search space included); tags name the search."""
    if not config.tracking.enabled:
        return None
    from longtune.tracking import Tracker, resolved_config
    from longtune.train.trainer import start_tracking

    probe = Tracker(resolved_config(config.tracking))
    experiment = probe.client.get_experiment_by_name(probe.experiment_name)
    previous = None
    if experiment is not None:
        runs = probe.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`longtune.job` = 'tune' and tags.`longtune.tune_name` = '{name}'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        previous = runs[0].info.run_id if runs else None
    return start_tracking(config, name, job="tune", run_id=previous,
                          tags={"longtune.tune_name": name, "longtune.tune_path": experiment_path})


def _child_run_id(config: Config, parent_run_id: str, trial_id: str) -> str | None:
    from longtune.tracking import Tracker, resolved_config

    probe = Tracker(resolved_config(config.tracking))
    parent = probe.client.get_run(parent_run_id)
    runs = probe.client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
        f"tags.`longtune.tune_trial_id` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _finish_child_runs(config: Config, rows: list[TrialRow], parent) -> None:
    """Each trial's nested run gets its outcome, final metrics and loss curve, and ends:
    FINISHED (completed or stopped early: the tag says which), FAILED on error, KILLED when
    the search was interrupted first. The driver does this for every trial alike: a trial
    stopped by ASHA ends mid-run, with no chance to close its own run."""
    if parent is None:
        return
    from longtune.tracking import Tracker
    from longtune.train.trainer import curves

    for row in rows:
        run_id = _child_run_id(config, parent.run_id, row.trial_id)
        row.mlflow_run_id = run_id
        if run_id is None:
            continue
        child = Tracker.attach(parent.cfg, run_id, system_metrics=False)
        child.set_tags({"longtune.trial_outcome": row.outcome, **({"longtune.error": row.error} if row.error else {})})
        if row.objective is not None:
            child.log_metrics({f"final_{config.tune.metric}": row.objective, "steps_run": row.steps}, row.steps)
        child.log_loss_curve(curves(child, run_id))
        status = {"error": "FAILED", "unfinished": "KILLED"}.get(row.outcome, "FINISHED")
        child.client.set_terminated(run_id, status)


def _log_parent(parent, config: Config, result: TuneResult) -> None:
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


# -------------------------------------------------------------------- the command


def tune_command(config: Config) -> int:
    from rich.console import Console

    from longtune.data.errors import DataError
    from longtune.models import ModelError
    from longtune.train.trainer import TrainingSetupError

    console = Console(stderr=True)
    try:
        result = tune(config, console=console)
    except (TuneSetupError, TrainingSetupError, DataError, ModelError) as err:
        print(f"longtune tune: {err}", file=sys.stderr)
        return 1
    # the table is read in logs and `ray job logs` too, where rich would assume 80 columns
    Console(stderr=True, width=max(console.width, 110)).print(results_table(config, result))
    for row in result.rows:
        if row.error:
            console.print(f"{row.trial_id} failed: {row.error}", soft_wrap=True)
    if not result.finished:
        console.print(
            f"longtune tune: the search {result.name} was interrupted; relaunch with "
            f"tune.name={result.name} (and the same storage) to resume it", soft_wrap=True,
        )
        return 130
    if result.best is None:
        print(f"longtune tune: no trial of {result.name} reported {config.tune.metric}", file=sys.stderr)
        return 1
    print(f"best trial: {result.best.trial_id} {_params_text(result.best.params)} "
          f"{config.tune.metric}={result.best.objective:.4f}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    if result.mlflow_run_id:
        print(f"MLflow parent run: {result.mlflow_run_id} in {result.tracking_uri}")
        from longtune.tracking import ui_hint

        print(ui_hint(result.tracking_uri))
    if "best_config.yaml" in result.files:
        print(f"Train the best config: python pipelines/finetune.py --config {result.files['best_config.yaml']}")
    return 0
