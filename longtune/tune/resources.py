"""Resources: what one trial holds, how many trials run at once, and the local Ray sized to
hold them."""

from __future__ import annotations

import math
import os

from longtune.config import Config, with_overrides
from longtune.errors import LongtuneError

TRIAL_CPUS = 1.0
"""Logical CPUs of a trial's own actor (the Train driver of that trial; Ray Tune's default).
Together with the workers' CPUs it is what one trial holds."""


class TuneSetupError(LongtuneError, RuntimeError):
    """The search cannot run as configured; the message says why and what to change."""


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
