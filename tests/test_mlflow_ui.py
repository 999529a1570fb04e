"""A run as MLflow's UI shows it, in a real browser: `mlflow server` on loopback over a store
the Tracker wrote, the run's pages opened in headless Chromium (benchmarks/mlflow_screenshot.py
drives it). Skipped where no Chromium is installed (Debian: apt-get install chromium)."""

from __future__ import annotations

import pytest
from conftest import load_script

pytestmark = pytest.mark.slow


def load_screenshot():
    return load_script("benchmarks/mlflow_screenshot.py")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = load_screenshot().find_chromium()
    if path is None:
        pytest.skip("no Chromium: none of chromium, chromium-browser, google-chrome on PATH and no "
                    "LONGTUNE_CHROMIUM naming one (Debian: apt-get install chromium)")
    return path


def logged_run(store: str) -> tuple[str, str]:
    """A finetune-like run, logged the way the job logs it: the loop's reports under our
    names, the before/after scores at the first and last step, the description, the table."""
    from longtune.config import TrackingConfig
    from longtune.eval.compare import comparison_columns, comparison_markdown
    from longtune.tracking import Tracker

    scores = {
        "before training": {"ppl_256": 31.5, "ppl_1024": 58.0, "passkey_acc_1024": 0.0, "eval_nll_1024": 4.06},
        "after training": {"ppl_256": 25.25, "ppl_1024": 24.75, "passkey_acc_1024": 0.5, "eval_nll_1024": 3.21},
    }
    tracker = Tracker(TrackingConfig(tracking_uri=store, system_metrics=False))
    run_id = tracker.start_run("ui-check")
    for step in (10, 20, 30, 40):
        tracker.log_metrics({"loss": 4.0 - step / 20, "lr": 2e-4, "tokens_per_s": 900.0 + step,
                             "step_time_s": 0.5, "peak_memory_mb": 300.0, "tokens_seen": 1024 * step}, step)
    tracker.log_metrics({"eval_loss": 3.4, "eval_ppl": 30.0}, 0)
    tracker.log_metrics({"eval_loss": 3.1, "eval_ppl": 22.2}, 40)
    tracker.log_metrics(scores["before training"], 0)
    tracker.log_metrics(scores["after training"], 40)
    tracker.set_description("**longtune finetune** `ui-check`\n\n" + comparison_markdown(scores, [256, 1024]))
    tracker.log_table(comparison_columns(scores), "before_after.json")
    tracker.end_run()
    return tracker.experiment_id, run_id


def test_the_runs_charts_show_in_the_model_training_view(chromium, tmp_path):
    shot = load_screenshot()
    from longtune.tracking import run_url

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id, run_id = logged_run(store)
    with shot.MlflowServer(store, tmp_path / "server.log") as server:
        charts = shot.open_page(run_url(server.url, experiment_id, run_id), chromium=chromium,
                                want=["(train/loss)", "(eval/ppl_1024)"], screenshot=False)
        overview = shot.open_page(run_url(server.url, experiment_id, run_id).replace("/model-metrics", ""),
                                  chromium=chromium, want=["before training"], charts=False, screenshot=False)

    # one section per group, in MLflow's order, each chart drawn with its curve (the UI's
    # own section for ungrouped metrics, "Model metrics", stays empty)
    assert [s for s in charts.sections if not s.endswith("(0)")] == ["eval (5)", "train (6)"], charts.sections
    assert charts.charts >= 5
    for name in ("train/loss", "train/tokens_per_s", "eval/loss", "eval/ppl_1024", "eval/passkey_1024"):
        assert f"ui-check ({name})" in charts.body, name
    assert "nll" not in charts.body  # table-only figures are not charted
    # "Model training", not the GenAI view of traces, latency and token usage
    assert "Model registry" in charts.body and "Token Usage" not in charts.body and "Observability" not in charts.body
    # the description on the run's overview: its before/after table, rendered
    assert "before training" in overview.body and "after training" in overview.body
    assert "ppl @ 1,024" in overview.body and "| --- |" not in overview.body
