"""The search driver: `tune()` runs (or resumes) the Ray Tune search that ``config.tune``
describes, one longtune training per trial, and returns its results.

Reads top to bottom: check the search space (before Ray starts) -> set up the driver as
finetune does (model, Ray, resources, storage) -> prepare the blocks the trials read, once
-> the MLflow parent run -> a Tuner (or the interrupted one, restored) whose function
trainable (trial.run_trial) builds and fits one TorchTrainer per trial -> per trial:
outcome, final metrics and curves on its nested MLflow run -> the results table, the plot
and the best config. A trial's Train run is ``<storage>/<search>/train/<trial id>``: stable
across a resume, so an interrupted trial continues from its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import replace

from longtune.config import Config, default_run_name, outputs_path, with_overrides
from longtune.tune.asha import scheduler
from longtune.tune.cleanup import ReleaseTrialRuns, trial_run_registry
from longtune.tune.data import prepare_search_data
from longtune.tune.mlflow_runs import finish_child_runs, log_parent, parent_tracker, with_resolved_tracking
from longtune.tune.progress import ProgressLines
from longtune.tune.resources import TRIAL_CPUS, concurrency, local_ray_config
from longtune.tune.results import TuneResult, best_config, best_row, trial_rows, write_outputs
from longtune.tune.space import check_search_space, param_space
from longtune.tune.trial import run_trial


def tune(config: Config, *, console=None, callbacks: list | None = None) -> TuneResult:
    """Run (or resume) the search ``config.tune`` describes. ``callbacks``: extra Ray Tune
    callbacks (tests use one to interrupt a search); a resumed search keeps the callbacks
    it was started with (Ray Tune restores them)."""
    import ray.tune
    from rich.console import Console

    from longtune.storage import check_stores, job_stores
    from longtune.train.trainer import setup_driver

    console = console or Console(stderr=True)
    t = config.tune
    check_search_space(config)
    check_stores(job_stores(config, "tune"))  # a bad bucket, endpoint or credentials: one line now
    name = t.name or default_run_name("tune")
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
    parent = parent_tracker(config, name, experiment_path)
    parent_id = parent.run_id if parent else None

    # ---------------------------------------------------------------- Tuner
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            run_trial, base=with_resolved_tracking(config).to_dict(), setup=replace(setup, ray=None),
            datasets=datasets,
            with_eval=with_eval, train_storage=f"{experiment_path}/train",
            parent_run_id=parent_id, search_name=name,
        ),
        {"CPU": TRIAL_CPUS},
    )
    with trial_run_registry(name):
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
                        search_alg=_search_alg(config, n_parallel), scheduler=scheduler(config),
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

    # ---------------------------------------------------------------- results
    rows, finished = trial_rows(config, grid)
    result = TuneResult(name=name, experiment_path=experiment_path, rows=rows, finished=finished,
                        mlflow_run_id=parent_id, tracking_uri=parent.tracking_uri if parent else None)
    finish_child_runs(config, rows, parent)
    if not finished:
        if parent:
            parent.end_run("KILLED")
        return result
    result.best = best_row(rows, t.mode)
    if result.best is not None:
        result.best_config = best_config(config, result.best.params)
    result.output_dir = t.output_dir or str(outputs_path("tune", name))
    result.files = write_outputs(config, result)
    if parent:
        log_parent(parent, config, result)
        parent.end_run("FINISHED")
    return result


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
