"""`longtune evaluate` end to end on a tiny saved model, a tiny corpus and a real SQLite
MLflow store; held-out documents; plots; one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longtune.cli import main
from longtune.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run far faster on one thread when the machine is loaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    """A LoRA+ adapter for the tiny model whose LoRA weights are not zero (so it changes
    the model)."""
    from longtune.adapters import apply_adapter, save_adapter
    from longtune.models import load_model

    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.target_context=256"])
    model, _ = load_model(config.model, for_training=False)
    peft = apply_adapter(model, config.adapter)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return str(save_adapter(peft, tmp_path_factory.mktemp("adapter") / "adapter"))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory, make_text):
    path = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        (path / f"doc{i:02d}.txt").write_text(make_text(i, 300 + 20 * i))
    return str(path)


def overrides(tmp_path: Path, corpus: str) -> list[str]:
    return [
        "model.target_context=256", f"data.sources=[{corpus}]", "data.min_doc_chars=100",
        "data.eval_fraction=0.3", "eval.stride=64", "eval.max_eval_tokens=640",
        "eval.passkey_lengths=[256]", "eval.passkey_trials=2", "eval.batch_size=4",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false",
    ]


def test_evaluate_logs_metrics_and_plots(tmp_path, tiny_model_dir, adapter_dir, corpus_dir, capsys):
    from mlflow import MlflowClient

    from longtune.tracking import read_table

    # --lengths takes every word after it (nargs="+"), so the overrides come first
    rc = main(["evaluate", "--model", tiny_model_dir, "--adapter", adapter_dir,
               *overrides(tmp_path, corpus_dir), "--lengths", "64", "128", "256"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "perplexity" in out and "passkey" in out and "tokens scored at every length" in out

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [run] = client.search_runs(
        [client.get_experiment_by_name("longtune").experiment_id],
        filter_string="tags.`longtune.job` = 'evaluate'",
    )
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for n in (64, 128, 256):
        assert metrics[f"eval/ppl_{n}"] > 1
    assert 0 <= metrics["eval/passkey_256"] <= 1
    # ln(ppl) and the scored-token count are the table's columns, not charts
    assert all(k.startswith("eval/") for k in metrics), sorted(metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/ppl_vs_length")] == [64, 128, 256]
    table = read_table(client, run.info.run_id, "eval_table.json")
    assert list(table["length"]) == [64, 128, 256]
    assert list(table["tokens"]) == [640] * 3  # the cap: 10 spans of 64, at every length
    assert (table["nll"] > 0).all()
    assert list(table["ppl"]) == pytest.approx([metrics[f"eval/ppl_{n}"] for n in (64, 128, 256)])
    described = run.data.tags["mlflow.note.content"]
    assert f"+ adapter `{adapter_dir}`" in described and "| 256 |" in described
    assert run.data.params["model.adapter_path"] == adapter_dir
    assert run.data.params["resolved.rope_factor"] == "4.0"

    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    for png in ("plots/perplexity_vs_length.png", "plots/passkey_vs_length.png"):
        assert (artifacts / png).read_bytes()[:8] == PNG_MAGIC
    results = json.loads((artifacts / "eval/results.json").read_text())
    assert [s["length"] for s in results["perplexity"]["lengths"]] == [64, 128, 256]
    assert len(results["passkey"]["trials"]) == 2

    # the adapter was applied: the base model alone scores differently
    from longtune.eval import evaluate_model
    from longtune.models import load_model, load_tokenizer_for

    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "eval.lengths=[64, 128, 256]",
                                *overrides(tmp_path, corpus_dir), "eval.passkey_trials=0"])
    base, _ = load_model(config.model, for_training=False)
    base_metrics = evaluate_model(base, load_tokenizer_for(config.model), config, progress=False)
    assert set(base_metrics) == {f"{k}_{n}" for k in ("ppl", "eval_nll", "eval_tokens") for n in (64, 128, 256)}
    assert abs(base_metrics["eval_nll_256"] - table["nll"][2]) > 1e-3


def test_held_out_documents_are_the_eval_split(tmp_path, tiny_model_dir, corpus_dir):
    from transformers import AutoTokenizer

    from longtune.data.sources import split_of
    from longtune.eval import load_eval_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = load_config(None, [f"model.name_or_path={tiny_model_dir}", "eval.lengths=[64, 128]",
                                *overrides(tmp_path, corpus_dir), "eval.max_eval_tokens=100000"])
    documents = load_eval_documents(config, tokenizer)
    names = sorted(p.name for p in Path(corpus_dir).iterdir() if split_of(p.name, 0.3) == "eval")
    assert 0 < len(names) < 30
    expected = [tokenizer.encode((Path(corpus_dir) / n).read_text(), add_special_tokens=False) for n in names]
    assert documents == expected

    few = load_eval_documents(config.model_copy(update={"eval": config.eval.model_copy(
        update={"max_eval_tokens": 64})}), tokenizer)
    assert len(few) == 1  # reading stops once the documents hold the spans to score


def test_plots_are_pngs(tmp_path):
    from longtune.eval.passkey import PasskeyReport, PasskeyScore
    from longtune.eval.perplexity import LengthScore, PerplexityReport
    from longtune.eval.report import EvalReport, plot_passkey, plot_perplexity

    ppl = PerplexityReport(stride=256, max_length=1024, documents=3, documents_used=3,
                           documents_too_short=0, spans_available=4)
    ppl.scores = {n: LengthScore(n, 1024, 4, 4.0 + n / 1024, 60.0 + n / 100) for n in (256, 512, 1024)}
    keys = PasskeyReport(scores={n: PasskeyScore(n, 10, 10 - n // 256) for n in (256, 512, 1024)})
    report = EvalReport(ppl, keys, {"original_context": 256, "target_context": 1024, "rope_factor": 4.0})
    for plot, name in ((plot_perplexity, "ppl.png"), (plot_passkey, "passkey.png")):
        assert plot(report, tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert plot_passkey(EvalReport(None, PasskeyReport()), tmp_path / "none.png") is None


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--adapter", "/nonexistent/adapter", "adapter path '/nonexistent/adapter' does not exist"),
        ("--model", "/nonexistent/model", "model path '/nonexistent/model' does not exist"),
    ],
)
def test_a_missing_path_exits_1_with_one_line(tmp_path, tiny_model_dir, corpus_dir, capsys, flag, value, message):
    args = ["--model", tiny_model_dir, flag, value] if flag == "--adapter" else [flag, value]
    rc = main(["evaluate", *args, *overrides(tmp_path, corpus_dir)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == f"longtune evaluate: {message} ({'model.adapter_path' if flag == '--adapter' else 'model.name_or_path'})"
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_no_held_out_documents_exits_1(tmp_path, tiny_model_dir, corpus_dir, capsys):
    rc = main(["evaluate", "--model", tiny_model_dir, *overrides(tmp_path, corpus_dir), "data.eval_fraction=0"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "data.eval_fraction is 0" in err
