"""runtime.py: how big a local Ray must be, and when a job uses GPUs."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from longtune.config import load_config
from longtune.runtime import local_cpus_needed, use_gpu


def test_a_local_ray_fits_workers_tokenizer_actors_and_read_tasks_at_once():
    config = load_config(None, ["scaling.num_workers=3", "scaling.cpus_per_worker=1.5",
                                "data.tokenize_concurrency=2"])
    # ceil(3 x 1.5) = 5 for the workers, 2 actors, 2 for read/pack tasks and the coordinator
    assert local_cpus_needed(config) == max(os.cpu_count() or 1, 5 + 2 + 2)
    assert local_cpus_needed(load_config(None, ["scaling.local_num_cpus=3"])) == 3  # the user's word


@pytest.mark.parametrize("setting, gpus, expected", [
    ("auto", 8, True), ("auto", 0, False), ("true", 0, True), ("false", 8, False),
])
def test_auto_uses_gpus_when_the_cluster_has_them(setting, gpus, expected):
    cluster = SimpleNamespace(cluster_resources=lambda: {"CPU": 4, **({"GPU": gpus} if gpus else {})})
    assert use_gpu(load_config(None, [f"scaling.use_gpu={setting}"]), cluster) is expected


def test_ray_workers_drop_the_placement_group_cleaners_noise_and_nothing_else(ray_local):
    """Without the dashboard, Ray Train's PlacementGroupCleaner warns at every check that the
    state API is unavailable (290 lines in one 5-minute default run): every worker of the
    job's runtime environment filters that one message out."""
    import logging

    @ray_local.remote
    def passes(message: str) -> bool:
        logger = logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
        return bool(logger.filter(logging.LogRecord(logger.name, logging.WARNING, __file__, 1, message, None, None)))

    noise = ("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
             "Continuing to monitor.")
    assert ray_local.get(passes.remote(noise)) is False
    assert ray_local.get(passes.remote("Detected that the Ray Train controller actor (x) is dead.")) is True
