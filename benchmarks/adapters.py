"""Adapters compared on the same long-context fine-tune: plain LoRA, LoRA+ (LongLoRA),
AdaLoRA (PEFT) and LoRA², each trained with S2-Attn from the same data, steps, seed and
initial rank, then scored with full attention on the same held-out documents.

    python benchmarks/adapters.py                       # the embedded default (seed model)
    python benchmarks/adapters.py train.max_steps=50    # any dotted config override
    python benchmarks/adapters.py --types lora2 adalora --out benchmarks/results/x.json train.lr=1e-3

Prints a table (trainable parameters, numbers scored for importance, step time measured with
the adapters taking turns in one process, step time in the training run, held-out perplexity
at each eval length), writes benchmarks/results/adapters.json and logs an MLflow
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


def parameter_figures(config, path: str, adapters: dict) -> dict[str, dict[str, int]]:
    """Trainable parameters of each adapter on the model, and how many numbers its rank
    allocator scores for importance (AdaLoRA: every A, B and E entry; LoRA²: Qin, Pin, E)."""
    from longtune.adapters import apply_adapter, parameter_counts
    from longtune.adapters.lora2 import scored_parameter_count
    from longtune.config import with_overrides
    from longtune.models import load_model

    figures = {}
    for name, overrides in adapters.items():
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


def step_times(config, path: str, adapters: dict, reps: int = 7) -> dict[str, float]:
    """Median seconds per optimizer step of each adapter (S2-Attn, one block of the target
    context, the adapter's extra loss and allocator included), measured in this process with
    the adapters taking turns, so machine noise slows all alike."""
    import time

    import torch

    from longtune.adapters import training_hooks
    from longtune.config import with_overrides
    from longtune.precision import resolve_precision
    from longtune.train.loop import (
        build_model,
        build_optimizer,
        optimizer_step,
    )

    cpu = torch.device("cpu")
    steppers = {}
    for name, overrides in adapters.items():
        cfg = with_overrides(config, {**overrides, "attention.type": "s2", "train.batch_size_per_worker": 1,
                                      "train.grad_accum_steps": 1})
        model = build_model(cfg, path, cpu)
        params, optimizer, scheduler = build_optimizer(cfg, model)
        hooks = training_hooks(model, cfg.adapter, cfg.train.max_steps)
        autocast = resolve_precision(cfg.model, cfg.train, "cpu").autocast(cpu)
        steppers[name] = (cfg, model, params, optimizer, scheduler, hooks, autocast)
    n = config.context_length
    g = torch.Generator().manual_seed(0)
    block = {"input_ids": torch.randint(1, 4000, (1, n), generator=g), "position_ids": torch.arange(n)[None]}
    times: dict[str, list[float]] = {name: [] for name in steppers}
    warmup = 3  # new matmul shapes (LoRA²'s thin k- and r-wide products) compile on first use
    for rep in range(warmup + reps):
        for name, (cfg, model, params, optimizer, scheduler, hooks, autocast) in steppers.items():
            start = time.perf_counter()
            optimizer_step(model, [block], params, optimizer, scheduler, cfg, autocast,
                           hooks, rep + 1)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(argv: list[str]) -> int:
    import argparse

    from rich.console import Console
    from rich.table import Table

    from longtune.config import load_config
    from longtune.models import model_path
    from longtune.replicate import compare_trained

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", choices=[o["adapter.type"] for o in ADAPTERS.values()],
                        help="adapter types to compare (all four when unset)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "adapters.json"))
    args, overrides = parser.parse_known_args(argv)
    adapters = {name: o for name, o in ADAPTERS.items() if not args.types or o["adapter.type"] in args.types}
    config = load_config(None, ["attention.type=s2", *overrides])
    console = Console(width=160)  # the table is wide; logs and pipes default to 80 columns
    path = model_path(config.model)
    params = parameter_figures(config, path, adapters)
    console.print("timing one optimizer step of each adapter, in turns ...")
    timed = step_times(config, path, adapters)
    runs = {name: {**overrides, "attention.type": "s2"} for name, overrides in adapters.items()}
    extra = {name: {"trainable_params": params[name]["trainable"], "adapter_params": params[name]["adapter"],
                    "scored_for_importance": params[name]["scored"], "step_time_s": timed[name]}
             for name in adapters}
    results = compare_trained(config, runs, job="compare-adapters", extra=extra, console=console)

    lengths = config.eval.lengths
    table = Table(title=f"adapters, S2-Attn, {config.train.max_steps} steps, r={config.adapter.rank} "
                        f"(pruned to {config.adapter.pruning.target_rank}), held-out perplexity")
    for column in ("adapter", "trainable", "of which adapter", "scored for importance", "s/step", "s/step in run",
                   *(f"ppl @ {n}" for n in lengths)):
        table.add_column(column, justify="left" if column == "adapter" else "right")
    rows = {}
    for name in adapters:
        r, p = results[name], params[name]
        rows[name] = {**p, **r}
        table.add_row(
            name, f"{p['trainable']:,}", f"{p['adapter']:,}", f"{p['scored']:,}" if p["scored"] else "-",
            f"{timed[name]:.3f}", f"{r.get('train_step_time_s', float('nan')):.3f}",
            *(f"{r[f'ppl_{n}']:.2f}" for n in lengths),
        )
    console.print(table)
    if "AdaLoRA" in params and "LoRA²" in params:
        ada, lora2 = params["AdaLoRA"]["scored"], params["LoRA²"]["scored"]
        console.print(f"LoRA² scores {lora2:,} numbers for importance, AdaLoRA {ada:,}: "
                      f"{1 - lora2 / ada:.1%} fewer")
    out = write_json(args.out, {
        "config": {"max_steps": config.train.max_steps, "lr": config.train.lr, "rank": config.adapter.rank,
                   "target_rank": config.adapter.pruning.target_rank,
                   "outer_rank": config.adapter.lora2.outer_rank, "lengths": lengths},
        "rows": rows,
    })
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
