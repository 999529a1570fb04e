"""Ending a trial's Ray Train run, and freeing its workers' placement group, when the trial
ends: a workaround for a Ray behaviour, built on Ray Train's internals
(``ray.train.v2._internal``), and nothing else.

The Ray behaviour (Ray 2.60, Train V2 under Tune; ray-project/ray#54305): a trial's Train run
lives in actors the trial's actor owns. When Tune stops a trial (ASHA, the end of an
interrupted search) it ends that actor, and the Train controller dies with it without
shutting down: its workers' placement group stays reserved. Ray Train then relies on a
detached PlacementGroupCleaner (ray-project/ray#58515) that asks the state API (the
dashboard) whether the controller is alive; on a Ray without a dashboard (a joined cluster
started with --include-dashboard=false, the tests' Ray) it cannot tell, and the reserved
CPUs/GPUs would starve the next trials. (A local Ray longtune starts has no dashboard unless
scaling.local_dashboard asks for it; with one, its workers ask their own cluster's state API:
runtime.init_ray, quiet_ray_workers.)

The workaround: each trial's controller records itself and its placement group with a
registry actor of the search, and the driver aborts the controller (Ray Train's own graceful
abort: workers stopped, placement group removed, cleaner stopped) when the trial ends,
before Tune ends the trial's actor; placement groups of controllers that died anyway (an
interrupted search) are removed after the search.

When Ray frees a stopped trial's placement group itself (tests/test_tune.py's
test_nothing_reserved_after_the_search says so), delete this file and its four uses:
``trial_run_registry`` and ``ReleaseTrialRuns`` in search.py, ``record_run_callbacks`` and
``was_released`` in trial.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray.tune import Callback


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


@contextmanager
def trial_run_registry(search_name: str) -> Iterator[None]:
    """The search's registry for as long as the block runs (the driver's Tuner); on the way
    out, the Train runs of trials an interruption ended are released too."""
    registry = TrialRuns.options(name=_registry_name(search_name)).remote()
    try:
        yield
    finally:
        for trial_id in ray.get(registry.trial_ids.remote()):  # trials an interruption ended
            release_trial_run(search_name, trial_id)
        ray.kill(registry)


def record_run_callbacks(search_name: str, trial_id: str) -> list:
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


def was_released(search_name: str, trial_id: str) -> bool:
    """Whether the search ended trial ``trial_id``'s Train run (so the actor error its fit()
    ends in is no failure of the trial)."""
    return ray.get(_registry(search_name).was_released.remote(trial_id))


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
    Tune ends the trial's actor."""

    def __init__(self, search_name: str) -> None:
        self.search_name = search_name

    def on_trial_complete(self, iteration, trials, trial, **info):
        release_trial_run(self.search_name, trial.trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        release_trial_run(self.search_name, trial.trial_id)
