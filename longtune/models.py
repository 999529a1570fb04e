"""Base models: load a causal LM and its tokenizer, and extend its positions.

Position interpolation (Chen et al., 2023; LongLoRA's recipe) squeezes the longer context
into the position range the model was trained on: RoPE positions are divided by
``factor = target_context / original_context``. transformers 5 expresses this in the config
(``rope_parameters = {"rope_type": "linear", "factor": ..., "rope_theta": ...}``) and builds
the rotary embedding from it when the model is created, so it is applied to the config
*before* the weights load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from longtune.config import SEED_MODEL, ModelConfig


class ModelError(ValueError):
    """A model that cannot be loaded or extended as configured; the message says why."""


def original_context(config: Any, model_cfg: ModelConfig) -> int:
    """The context the base model was trained at: model.original_context, else the
    model config's max_position_embeddings."""
    if model_cfg.original_context is not None:
        return model_cfg.original_context
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        raise ModelError(
            f"{type(config).__name__} has no max_position_embeddings; set model.original_context"
        )
    return int(n)


def interpolate_positions(config: Any, target_context: int, original: int) -> float:
    """Extend ``config`` (in place) from ``original`` to ``target_context`` tokens with
    linear RoPE interpolation, composed with any linear factor it already has. Returns the
    factor applied now (1.0 when the target is not longer)."""
    if target_context <= original:
        return 1.0
    factor = target_context / original
    rope = dict(getattr(config, "rope_parameters", None) or {})
    kind = rope.get("rope_type", "default")
    if kind == "default":
        rope.update(rope_type="linear", factor=factor)
    elif kind == "linear":
        rope["factor"] = float(rope["factor"]) * factor
    else:
        raise ModelError(
            f"the model's rope_type is {kind!r}; linear position interpolation composes only "
            "with 'default' or 'linear' RoPE"
        )
    config.rope_parameters = rope
    config.max_position_embeddings = target_context
    return factor


def cpu_has_bf16() -> bool:
    """bf16 autocast pays on CPUs with native bf16 (AVX512-BF16, AMX): ~1.5x here."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(model_cfg: ModelConfig, on_gpu: bool) -> torch.dtype:
    if model_cfg.dtype == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, model_cfg.dtype)


def model_path(model_cfg: ModelConfig) -> str:
    """A hub id or a local path; the seed model is built (once) and its cache dir returned."""
    if model_cfg.name_or_path == SEED_MODEL:
        from longtune.seed import ensure_seed_model

        return str(ensure_seed_model(model_cfg.cache_dir))
    return model_cfg.name_or_path


def load_tokenizer_for(model_cfg: ModelConfig, name_or_path: str | None = None):
    """The model's tokenizer (fast); pad token falls back to EOS for packed training."""
    from transformers import AutoTokenizer

    if (name_or_path or model_cfg.name_or_path) == SEED_MODEL:
        from longtune.seed import seed_tokenizer

        return seed_tokenizer(model_cfg.cache_dir)
    path = name_or_path or model_path(model_cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model_cfg: ModelConfig,
    *,
    on_gpu: bool = False,
    for_training: bool = True,
    path: str | None = None,
):
    """Load the base causal LM with its positions interpolated to model.target_context.

    Returns ``(model, info)`` where info records the original context and the factor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path or model_path(model_cfg)
    if not path.startswith(("/", ".")) and Path(path).exists():
        path = str(Path(path).resolve())
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a model config from {path!r}: {exc}") from None
    original = original_context(config, model_cfg)
    factor = interpolate_positions(config, model_cfg.target_context, original)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        config=config,
        dtype=resolve_dtype(model_cfg, on_gpu),
        trust_remote_code=model_cfg.trust_remote_code,
    )
    if for_training:
        model.config.use_cache = False  # no KV cache in training
        if model_cfg.gradient_checkpointing:
            # reentrant checkpointing would need inputs that require grad (frozen embeddings)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    info = {
        "path": path,
        "original_context": original,
        "target_context": model_cfg.target_context,
        "rope_factor": float(model.config.rope_parameters.get("factor", 1.0))
        if getattr(model.config, "rope_parameters", None)
        else 1.0,
        "interpolation_factor": factor,
    }
    return model, info
