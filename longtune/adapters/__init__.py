"""Adapters: LongLoRA's LoRA+ through PEFT (lora.py); LoRA² comes later (issue #7).

Plain torch + transformers + PEFT: no Ray, no MLflow.
"""

from longtune.adapters.lora import (
    LORA2_NOT_IMPLEMENTED,
    apply_adapter,
    attention_projections,
    load_adapter,
    lora_config,
    parameter_counts,
    save_adapter,
    trainable_modules,
)

__all__ = [
    "LORA2_NOT_IMPLEMENTED",
    "apply_adapter",
    "attention_projections",
    "load_adapter",
    "lora_config",
    "parameter_counts",
    "save_adapter",
    "trainable_modules",
]
