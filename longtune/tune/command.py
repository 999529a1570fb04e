"""The `longtune tune` command: runs the search and prints the results table, the best
trial and where its outputs are; returns 0, 1 (the search could not run, or no trial
reported the metric) or 130 (interrupted: relaunch to resume)."""

from __future__ import annotations

import sys

from longtune.config import Config
from longtune.tune.results import params_text, results_table
from longtune.tune.search import tune


def tune_command(config: Config) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    result = tune(config, console=console)  # a LongtuneError reaches the command line (exit 1)
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
    print(f"best trial: {result.best.trial_id} {params_text(result.best.params)} "
          f"{config.tune.metric}={result.best.objective:.4f}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    if result.mlflow_run_id:
        from longtune.tracking import redact_uri, ui_hint

        print(f"MLflow parent run: {result.mlflow_run_id} in {redact_uri(result.tracking_uri)}")

        print(ui_hint(result.tracking_uri))
    if "best_config.yaml" in result.files:
        print(f"Train the best config: python pipelines/finetune.py --config {result.files['best_config.yaml']}")
    return 0
