"""`longtune replicate`: the LongLoRA comparison on a real local Ray and MLflow store."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_replicate_scores_five_models_on_the_same_tokens(ray_local, tmp_path, run_config):
    from mlflow import MlflowClient

    from longtune.replicate import replicate
    from longtune.tracking import read_table

    config = run_config("train.max_steps=2", "train.checkpoint_every=2")
    results = replicate(config)
    assert list(results) == ["base", "base + interpolation", "LoRA + S2-Attn", "LoRA+ + S2-Attn",
                             "LoRA+ + full attention"]
    assert len({r["eval_tokens_128"] for r in results.values()}) == 1  # same targets for all
    assert results["base"]["ppl_128"] != results["base + interpolation"]["ppl_128"]
    assert results["LoRA+ + S2-Attn"]["ppl_128"] != results["LoRA+ + full attention"]["ppl_128"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`longtune.job` = 'replicate'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 5
    # the comparison's table: the parent's description and its table artifact
    described = parents[0].data.tags["mlflow.note.content"]
    assert all(f"| {name} | " in described for name in results)
    table = read_table(client, parents[0].info.run_id, "replicate_table.json")
    assert list(table["model"]) == list(results)
    assert list(table["ppl_128"]) == pytest.approx([r["ppl_128"] for r in results.values()])
    # each model's scores and training figures under MLflow's grouped names
    trained = next(c for c in children if c.info.run_name == "LoRA+ + S2-Attn")
    assert trained.data.metrics["eval/ppl_128"] == pytest.approx(results["LoRA+ + S2-Attn"]["ppl_128"])
    assert {"train/loss", "train/step_time_s", "eval/loss"} <= set(trained.data.metrics)
