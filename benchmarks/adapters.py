"""Adapters compared on the same long-context fine-tune: plain LoRA, LoRA+ (LongLoRA),
AdaLoRA (PEFT) and LoRA², each trained with S2-Attn from the same data, steps, seed and
initial rank, then scored with full attention on the same held-out documents.

    python benchmarks/adapters.py                       # the embedded default (seed model)
    python benchmarks/adapters.py train.max_steps=50    # any dotted config override

Prints a table (trainable parameters, numbers scored for importance, step time, held-out
perplexity at each eval length), writes benchmarks/results/adapters.json and logs an MLflow
run "compare-adapters" with a nested run per adapter.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import write_json

ADAPTERS = {
    "LoRA": {"adapter.type": "lora"},
    "LoRA+": {"adapter.type": "lora_plus"},
    "AdaLoRA": {"adapter.type": "adalora"},
    "LoRA²": {"adapter.type": "lora2"},
}


def parameter_figures(config, path: str) -> dict[str, dict[str, int]]:
    """Trainable parameters of each adapter on the model, and how many numbers its rank
    allocator scores for importance (AdaLoRA: every A, B and E entry; LoRA²: Qin, Pin, E)."""
    from longtune.adapters import apply_adapter, parameter_counts
    from longtune.adapters.lora2 import scored_parameter_count
    from longtune.config import with_overrides
    from longtune.models import load_model

    figures = {}
    for name, overrides in ADAPTERS.items():
        cfg = with_overrides(config, overrides)
        model, _ = load_model(cfg.model, on_gpu=False, path=path)
        model = apply_adapter(model, cfg.adapter, cfg.train.max_steps)
        counts = parameter_counts(model)
        scored = 0
        if cfg.adapter.type == "lora2":
            scored = scored_parameter_count(model)
        elif cfg.adapter.type == "adalora":
            scored = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        figures[name] = {"trainable": counts["trainable"], "adapter": counts["lora"], "scored": scored}
    return figures


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from longtune.config import load_config
    from longtune.models import model_path
    from longtune.replicate import compare_trained

    config = load_config(None, ["attention.type=s2", *argv])
    console = Console()
    path = model_path(config.model)
    params = parameter_figures(config, path)
    runs = {name: {**overrides, "attention.type": "s2"} for name, overrides in ADAPTERS.items()}
    results = compare_trained(config, runs, job="compare-adapters", console=console)

    lengths = config.eval.lengths
    table = Table(title=f"adapters, S2-Attn, {config.train.max_steps} steps, r={config.adapter.rank} "
                        f"(pruned to {config.adapter.pruning.target_rank}), held-out perplexity")
    for column in ("adapter", "trainable", "of which adapter", "scored for importance", "s/step",
                   *(f"ppl @ {n}" for n in lengths)):
        table.add_column(column, justify="left" if column == "adapter" else "right")
    rows = {}
    for name in ADAPTERS:
        r, p = results[name], params[name]
        rows[name] = {**p, **r}
        table.add_row(
            name, f"{p['trainable']:,}", f"{p['adapter']:,}", f"{p['scored']:,}" if p["scored"] else "-",
            f"{r.get('train_step_time_s', float('nan')):.3f}",
            *(f"{r[f'ppl_{n}']:.2f}" for n in lengths),
        )
    console.print(table)
    ada, lora2 = params["AdaLoRA"]["scored"], params["LoRA²"]["scored"]
    console.print(f"LoRA² scores {lora2:,} numbers for importance, AdaLoRA {ada:,}: "
                  f"{1 - lora2 / ada:.1%} fewer")
    out = write_json(Path(__file__).parent / "results" / "adapters.json", {
        "config": {"max_steps": config.train.max_steps, "rank": config.adapter.rank,
                   "target_rank": config.adapter.pruning.target_rank,
                   "outer_rank": config.adapter.lora2.outer_rank, "lengths": lengths},
        "rows": rows,
    })
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
