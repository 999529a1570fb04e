"""Evaluation with full attention: sliding-window perplexity at several context lengths
(``perplexity``), passkey retrieval (``passkey``), and the `longtune evaluate` job with its
table, MLflow metrics and plots (``report``). One process, one device, no Ray.

    from longtune.eval import evaluate_model, load_eval_documents
    documents = load_eval_documents(config, tokenizer)        # held-out token ids, read once
    metrics = evaluate_model(model, tokenizer, config, documents=documents)
    # {"ppl_256": ..., "eval_nll_256": ..., "eval_tokens_256": ..., "passkey_acc_256": ...}
"""

from __future__ import annotations

from longtune.eval.errors import EvalError
from longtune.eval.passkey import PasskeyReport, passkey_retrieval
from longtune.eval.perplexity import (
    PerplexityReport,
    full_attention_eval,
    load_eval_documents,
    perplexity,
    plan_spans,
)
from longtune.eval.report import EvalReport, evaluate_command, evaluate_model, run_evaluation

__all__ = [
    "EvalError",
    "EvalReport",
    "PasskeyReport",
    "PerplexityReport",
    "evaluate_command",
    "evaluate_model",
    "full_attention_eval",
    "load_eval_documents",
    "passkey_retrieval",
    "perplexity",
    "plan_spans",
    "run_evaluation",
]
