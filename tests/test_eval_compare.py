"""eval/compare.py: the side-by-side table, and settings refused before training starts."""

from __future__ import annotations

import pytest
from rich.console import Console

from longtune.config import load_config
from longtune.eval import EvalError
from longtune.eval.compare import check_eval_settings, comparison_table


def rendered(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def test_one_row_per_model_with_perplexity_per_length_and_passkey():
    results = {
        "before training": {"ppl_256": 40.123, "ppl_1024": 39.0, "passkey_acc_256": 0.5, "passkey_acc_1024": 0.0},
        "after training": {"ppl_256": 37.5, "passkey_acc_256": 1.0},
    }
    text = rendered(comparison_table(results, [256, 1024], "held-out"))
    assert "ppl @ 256" in text and "ppl @ 1024" in text and "passkey" in text
    before = next(line for line in text.splitlines() if "before training" in line)
    assert "40.12" in before and "39.00" in before and "50% / 0%" in before
    after = next(line for line in text.splitlines() if "after training" in line)
    assert "37.50" in after and " - " in after  # a length it was not scored at


def test_without_passkey_scores_there_is_no_passkey_column():
    assert "passkey" not in rendered(comparison_table({"m": {"ppl_256": 3.0}}, [256], "t"))


def test_settings_that_would_fail_after_training_fail_now(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    check_eval_settings(load_config(None, ["eval.passkey_lengths=[256]"]), tokenizer)
    with pytest.raises(EvalError, match="eval.stride=512 is longer than the shortest of eval.lengths"):
        check_eval_settings(load_config(None, ["eval.stride=512"]), tokenizer)
    with pytest.raises(EvalError, match="eval.passkey_lengths: 8 is too short"):
        check_eval_settings(load_config(None, ["eval.passkey_lengths=[8]"]), tokenizer)


def test_markdown_table_for_a_runs_description():
    from longtune.eval.compare import comparison_markdown

    results = {
        "before training": {"ppl_256": 40.123, "ppl_1024": 39.0, "passkey_acc_256": 0.5, "passkey_acc_1024": 0.0},
        "after | tuned": {"ppl_256": 37.5, "passkey_acc_256": 1.0},
    }
    assert comparison_markdown(results, [256, 1024]).splitlines() == [
        "| model | ppl @ 256 | ppl @ 1,024 | passkey @ 256 | passkey @ 1,024 |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| before training | 40.12 | 39.00 | 50% | 0% |",
        "| after \\| tuned | 37.50 | - | 100% | - |",
    ]


def test_table_columns_order_figures_by_length():
    from longtune.eval.compare import comparison_columns

    results = {
        "before training": {"ppl_1024": 39.0, "ppl_256": 40.0, "eval_nll_256": 3.7, "eval_tokens_256": 640.0,
                            "passkey_acc_1024": 0.0, "passkey_acc_256": 0.5},
        "after training": {"ppl_256": 37.5, "ppl_1024": 30.0, "train_loss": 2.0},
    }
    columns = comparison_columns(results)
    assert list(columns) == ["model", "ppl_256", "ppl_1024", "passkey_256", "passkey_1024", "nll_256",
                             "tokens_256", "train_loss"]
    assert columns["model"] == ["before training", "after training"]
    assert columns["ppl_1024"] == [39.0, 30.0] and columns["passkey_256"] == [0.5, None]
    assert columns["train_loss"] == [None, 2.0]
