"""A search's results: one row per trial read back from Ray Tune, the best trial and its
config, and what is shown and written of them (CSV, rich table, objective plot,
best_config.yaml)."""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longtune.config import Config, with_overrides


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


def trial_rows(config: Config, grid) -> tuple[list[TrialRow], bool]:
    """One row per trial, and whether the search is finished (every sample created and
    ended; an interrupted search is not). Statuses come from the saved experiment state:
    after an interruption the in-memory trials read TERMINATED, the saved ones RUNNING."""
    from ray.tune import ExperimentAnalysis

    from longtune.errors import root_cause

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


def write_outputs(config: Config, result: TuneResult) -> dict[str, str]:
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
        f"({params_text(best.params)}), objective {best.objective:.6g} after {best.steps} steps.\n"
        "# Train it in full: python pipelines/finetune.py --config <this file>\n"
    )
    return header + result.best_config.to_yaml()



def params_text(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in params.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
