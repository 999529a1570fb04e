"""`longtune replicate`: LongLoRA's core comparison, in miniature on the embedded default.

Five models, scored with full attention on the same held-out documents at every eval length:

  base                     the model as it is, read past its trained context
  base + interpolation     linear position interpolation to the target context, no training
  LoRA + S2-Attn           plain LoRA (no trainable embeddings or norms)
  LoRA+ + S2-Attn          LongLoRA's recipe
  LoRA+ + full attention   the same, trained with full attention

The three trained models use the same data, steps and seed, from the job's config. What the
paper leads us to expect: LoRA+ with S2-Attn at the target length below the base at its own
length; S2-Attn within a few percent of full attention; LoRA+ clearly better than plain LoRA.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from longtune.config import Config, default_run_name, with_overrides

TRAINED = {
    "LoRA + S2-Attn": {"adapter.type": "lora", "attention.type": "s2"},
    "LoRA+ + S2-Attn": {"adapter.type": "lora_plus", "attention.type": "s2"},
    "LoRA+ + full attention": {"adapter.type": "lora_plus", "attention.type": "full"},
}


def replicate(config: Config, *, console=None) -> dict[str, dict[str, float]]:
    return compare_trained(config, TRAINED, job="replicate", with_base=True, console=console)


def compare_trained(
    config: Config,
    trained: dict[str, dict[str, Any]],
    *,
    job: str,
    with_base: bool = False,
    extra: dict[str, dict[str, float]] | None = None,
    console=None,
) -> dict[str, dict[str, float]]:
    """Train one model per ``trained`` entry (the job's config with those overrides; same
    data, steps and seed), then score them all, optionally with the base model as it is and
    interpolated, on the same held-out documents with full attention. Each trained row also
    holds its training figures (``train_<metric>``: step time, tokens/s, final loss) and any
    ``extra`` figures given for it. Tracked as one MLflow run named ``job`` with a nested run per model."""
    from rich.console import Console

    from longtune.eval.compare import comparison_table, score_here
    from longtune.models import model_path, original_context
    from longtune.runtime import init_ray, use_gpu
    from longtune.finetune import finetune

    console = console or Console(stderr=True)
    stamp = default_run_name(job)
    adapters, training = {}, {}
    for name, overrides in trained.items():
        slug = name.lower().replace(" + ", "-").replace("+", "plus").replace("²", "2").replace(" ", "-")
        run = with_overrides(config, {**overrides, "eval.before_after": False,
                                      "train.run_name": f"{stamp}-{slug}"})
        console.rule(f"training {name}")
        result = finetune(run, console=console)
        adapters[name] = result.adapter_path
        training[name] = {f"train_{k}": float(result.metrics[k]) for k in TRAINING_FIGURES
                          if k in result.metrics}

    path = model_path(config.model)
    from transformers import AutoConfig

    base_context = original_context(AutoConfig.from_pretrained(path), config.model)
    variants = {
        **({"base": {"target_context": base_context}, "base + interpolation": {}} if with_base else {}),
        **{name: {"adapter": adapter, **trained[name]} for name, adapter in adapters.items()},
    }
    console.rule("scoring")
    ray = init_ray(config)
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu(config, ray) else 0)(score_here)
    scoring = {name: {k: v for k, v in variant.items() if k in ("adapter", "target_context")}
               for name, variant in variants.items()}
    results = ray.get(task.remote(config, path, scoring))
    for name, figures in training.items():
        results[name].update(figures)
        results[name].update((extra or {}).get(name, {}))
    console.print(comparison_table(
        results, config.eval.lengths,
        f"{config.model.name_or_path}: {base_context} -> {config.model.target_context} tokens, "
        f"{config.train.max_steps} steps each, held-out perplexity (full attention)",
    ))
    _track(config, results, variants, job, extra or {})
    return results


TRAINING_FIGURES = ("step_time_s", "tokens_per_s", "loss", "eval_loss", "ranks_kept")


def _track(config: Config, results: dict[str, dict[str, float]], variants: dict, job: str,
           extra: dict[str, dict[str, float]]) -> None:
    """One MLflow run for the comparison, one nested run per model. The comparison's table is
    the parent's description and its table artifact ``<job>_table.json`` (the raw figures:
    ``<job>/<job>.json``); ``extra`` figures (a benchmark's own) go under ``benchmark/``, apart
    from the training run's figures of the same name."""
    if not config.tracking.enabled:
        return
    from longtune.eval.compare import comparison_columns, comparison_markdown
    from longtune.tracking import start_job_run

    parent = start_job_run(config, job, job=job)
    parent.set_description(
        f"**longtune {job}**: {len(results)} models scored on the same held-out documents with full "
        f"attention, {config.train.max_steps:,} training steps each\n\n"
        + comparison_markdown(results, config.eval.lengths)
    )
    for name, metrics in results.items():
        child = start_job_run(config, name, job=job, parent_run_id=parent.run_id, system_metrics=False,
                              log_config=False)
        child.log_params({k: str(v) for k, v in variants[name].items()})
        own = extra.get(name, {})
        child.log_metrics({k: v for k, v in metrics.items() if k not in own}, 0)
        child.log_metrics({f"benchmark/{k}": v for k, v in own.items()}, 0)
        child.end_run("FINISHED")
    parent.log_table(comparison_columns(results), f"{job}_table.json")
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / f"{job}.json"
        table.write_text(json.dumps(results, indent=2))
        parent.log_artifact(table, job)
    parent.end_run("FINISHED")


def replicate_command(config: Config) -> int:
    replicate(config)
    return 0
