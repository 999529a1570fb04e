"""The search space: which keys may be searched and with which values (checked before Ray
starts), one trial's config from the job's and its sampled values, and the space as Ray
Tune's ``param_space``."""

from __future__ import annotations

import itertools
from typing import Any

from longtune.config import Config, ConfigError, with_overrides

FIXED_PREFIXES = ("model.", "data.", "eval.", "export.", "tune.", "tracking.", "scaling.")
FIXED_TRAIN_KEYS = ("train.max_steps", "train.log_every", "train.checkpoint_every",
                    "train.run_name", "train.storage_path")
WHY_FIXED = (
    "model and data settings define the blocks prepared once for the whole search, scaling "
    "sets what a trial holds, and a trial's length and reports are tune.max_steps and "
    "tune.eval_every"
)


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
