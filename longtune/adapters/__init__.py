"""Adapters: LongLoRA's LoRA+ and plain LoRA through PEFT (lora.py), LoRA² (lora2.py), PEFT's
AdaLoRA as a baseline, and what each adds to the training loop (training.py).

Plain torch + transformers + PEFT: no Ray, no MLflow.
"""

from longtune.adapters.lora import (
    apply_adapter,
    attention_projections,
    load_adapter,
    lora_config,
    parameter_counts,
    save_adapter,
    trainable_modules,
)
from longtune.adapters.training import AdapterHooks, training_hooks

__all__ = [
    "AdapterHooks",
    "apply_adapter",
    "attention_projections",
    "load_adapter",
    "lora_config",
    "parameter_counts",
    "save_adapter",
    "trainable_modules",
    "training_hooks",
]
