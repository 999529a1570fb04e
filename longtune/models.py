"""Base models: load a causal LM and its tokenizer, and extend its positions.

Position interpolation (Chen et al., 2023; LongLoRA's recipe) squeezes the longer context
into the position range the model was trained on: RoPE positions are divided by
``factor = target_context / original_context``. transformers 5 expresses this in the config
(``rope_parameters = {"rope_type": "linear", "factor": ..., "rope_theta": ...}``) and builds
the rotary embedding from it when the model is created, so it is applied to the config
*before* the weights load.

How the factor composes with the RoPE a model already has, per ``rope_type``:

- ``default``: becomes ``linear`` with the factor.
- ``linear``: the factors multiply (a model already interpolated x2, extended x4: x8).
- ``llama3`` (Llama 3.1+): ``factor`` is multiplied, ``original_max_position_embeddings``
  and ``low_freq_factor`` / ``high_freq_factor`` kept. The dimensions llama3 interpolates
  (wavelength above original / low_freq_factor) are interpolated by the new factor too, the
  high-frequency ones (wavelength below original / high_freq_factor, many full turns inside
  the trained context) stay as trained, the band between is smoothed as llama3 does.
- ``yarn``: ``factor`` is multiplied (so it is target / original_max_position_embeddings),
  ``original_max_position_embeddings`` and ``beta_fast`` / ``beta_slow`` kept. An explicit
  ``attention_factor`` is kept; without one transformers derives it from the new factor
  (0.1·ln(factor) + 1, or from mscale / mscale_all_dim), as YaRN prescribes for that
  scale. A yarn model's trained context is ``factor x original_max_position_embeddings``
  (what its factor reaches), not its ``max_position_embeddings``, unless
  ``model.original_context`` says otherwise.
- ``dynamic`` and ``longrope`` are refused: both choose their frequencies from each batch's
  length at run time, so the frequencies trained are not the ones read.

Models that keep RoPE per layer type (Gemma 3, OLMo 3: ``rope_parameters =
{"sliding_attention": {...}, "full_attention": {...}}``): each layer type is extended by
the distance its layers attend over. A ``full_attention`` layer sees every distance up to
the context: its factor is target / original. A ``sliding_attention`` layer sees distances
up to ``sliding_window`` only, and RoPE's attention scores depend on distances alone, so its
layers read a longer context exactly as they were trained when the window is within the
trained context: its factor is min(window, target) / min(window, original), 1 for every real
model (Gemma 3: window 1024 of 128k). Interpolating it anyway would squeeze the local
positions those layers resolve for nothing. Other layer types are refused.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any

import torch

from longtune.config import SEED_MODEL, ModelConfig
from longtune.errors import LongtuneError
from longtune.precision import resolve_precision

FULL, SLIDING = "full_attention", "sliding_attention"
COMPOSABLE = ("default", "linear", "llama3", "yarn")


class ModelError(LongtuneError, ValueError):
    """A model that cannot be loaded or extended as configured; the message says why."""


def original_context(config: Any, model_cfg: ModelConfig) -> int:
    """The context the base model was trained at: model.original_context; else, for yarn
    RoPE, factor x original_max_position_embeddings; else the model config's
    max_position_embeddings."""
    if model_cfg.original_context is not None:
        return model_cfg.original_context
    rope = _full_rope(config)
    if rope and rope.get("rope_type") == "yarn" and rope.get("factor") and rope.get("original_max_position_embeddings"):
        return int(round(float(rope["factor"]) * int(rope["original_max_position_embeddings"])))
    n = getattr(config, "max_position_embeddings", None)
    if not n:
        raise ModelError(
            f"{type(config).__name__} has no max_position_embeddings; set model.original_context"
        )
    return int(n)


def interpolate_positions(config: Any, target_context: int, original: int) -> float:
    """Extend ``config`` (in place) from ``original`` to ``target_context`` tokens, composed
    with the RoPE it has (see the module docstring). Returns the factor applied now to the
    layers that attend over the whole context (1.0 when the target is not longer);
    ``extend_rope`` returns it per layer type."""
    applied = extend_rope(config, target_context, original)
    return max(applied.values(), default=1.0)


def extend_rope(config: Any, target_context: int, original: int) -> dict[str, float]:
    """``interpolate_positions``, returning the factor applied now per layer type (``"all"``
    for a model with one RoPE for every layer). Nothing is changed when a layer type cannot
    be extended (ModelError)."""
    rope = getattr(config, "rope_parameters", None) or {}
    nested = _nested_keys(config, rope)
    if target_context <= original:
        return {key: 1.0 for key in nested if rope[key] is not None} if nested else {"all": 1.0}
    if not rope:
        raise ModelError(
            f"{type(config).__name__} has no rope_parameters: longtune extends the context by RoPE "
            "position interpolation only; set model.target_context <= the model's context"
        )
    factor = target_context / original
    if not nested:
        extended, applied = _composed(rope, factor, config, "rope_parameters"), {"all": factor}
    else:
        extended, applied = dict(rope), {}
        for key in nested:
            if rope[key] is None:  # a layer type without positions (NoPE)
                continue
            f = _layer_type_factor(config, key, target_context, original)
            extended[key] = _composed(rope[key], f, config, f"rope_parameters.{key}") if f > 1 else dict(rope[key])
            applied[key] = f
    config.rope_parameters = extended
    config.max_position_embeddings = target_context
    return applied


def _composed(params: dict[str, Any], factor: float, config: Any, where: str) -> dict[str, Any]:
    """A copy of one RoPE parameter dict with ``factor`` composed into it."""
    rope = dict(params)
    kind = rope.get("rope_type", "default")
    if kind == "default":
        rope.update(rope_type="linear", factor=factor)
    elif kind in ("linear", "llama3"):
        rope["factor"] = float(rope["factor"]) * factor
    elif kind == "yarn":
        current = rope.get("factor") or config.max_position_embeddings / rope["original_max_position_embeddings"]
        rope["factor"] = float(current) * factor
    elif kind == "dynamic":
        raise ModelError(
            f"{where}: rope_type 'dynamic' (dynamic NTK) recomputes its frequencies from each batch's "
            "length, so the frequencies trained are not the ones read later; position interpolation "
            "needs fixed ones. Set the model's config.json rope_parameters to rope_type 'linear' (or "
            "'default', or 'yarn' with original_max_position_embeddings) before fine-tuning, or keep "
            "model.target_context <= its context"
        )
    elif kind == "longrope":
        raise ModelError(
            f"{where}: rope_type 'longrope' (Phi-3) switches between short_factor and long_factor by "
            "each batch's length and longtune cannot compose a position factor with its "
            "per-dimension factors; use the model at its own context (model.target_context <= "
            f"{config.max_position_embeddings}) or a checkpoint with 'default', 'linear' or 'yarn' RoPE"
        )
    else:
        raise ModelError(
            f"{where}: the model's rope_type is {kind!r}; position interpolation composes only with "
            f"{', '.join(repr(k) for k in COMPOSABLE)} RoPE"
        )
    return rope


def _layer_type_factor(config: Any, layer_type: str, target_context: int, original: int) -> float:
    """How much farther than in training the layers of ``layer_type`` now attend."""
    if layer_type == FULL:
        return target_context / original
    if layer_type == SLIDING:
        window = getattr(config, "sliding_window", None)
        if not window:  # no window to bound it: it may see every distance
            return target_context / original
        return min(window, target_context) / min(window, original)
    raise ModelError(
        f"rope_parameters has RoPE for layer type {layer_type!r}: longtune knows how far "
        f"{FULL!r} and {SLIDING!r} layers attend, not {layer_type!r}, so it cannot say how "
        "to interpolate its positions"
    )


def _nested_keys(config: Any, rope: dict[str, Any]) -> list[str]:
    """The layer types ``rope`` is keyed by (Gemma 3, OLMo 3); empty for one flat dict."""
    if not rope:
        return []
    keys = getattr(config, "nested_rope_parameter_keys", None)
    if callable(keys):
        return list(keys(rope))
    return [k for k in rope if isinstance(rope[k], dict) or (rope[k] is None and k.endswith("_attention"))]


def _full_rope(config: Any) -> dict[str, Any] | None:
    """The RoPE parameters of the layers that attend over the whole context."""
    rope = getattr(config, "rope_parameters", None) or {}
    nested = _nested_keys(config, rope)
    if not nested:
        return rope or None
    return rope.get(FULL)


def rope_report(model: Any, applied: dict[str, float]) -> dict[str, dict[str, Any]]:
    """What the loaded model's rotary embeddings use, per layer type (``"all"`` for one
    RoPE): rope_type, total factor, the factor interpolated now and, where the rotary module
    exposes it, the attention scaling it built (yarn's attention_factor)."""
    rope = getattr(model.config, "rope_parameters", None) or {}
    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    report = {}
    for key, now in applied.items():
        params = rope if key == "all" else (rope.get(key) or {})
        entry: dict[str, Any] = {
            "rope_type": params.get("rope_type", "default"),
            "factor": float(params.get("factor") or 1.0),
            "interpolated": float(now),
        }
        scaling = getattr(rotary, "attention_scaling" if key == "all" else f"{key}_attention_scaling", None)
        if isinstance(scaling, (int, float)):
            entry["attention_scaling"] = float(scaling)
        report[key] = entry
    return report


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


def enable_checkpointing(model: Any, *, offload: bool = False, on_gpu: bool = False) -> None:
    """Gradient checkpointing of every decoder layer (non-reentrant: reentrant checkpointing
    would need inputs that require grad, and the embeddings may be frozen).

    ``offload``: the checkpointed layer inputs, the activations kept from the forward to the
    backward (layers x tokens x hidden), live in CPU memory in between, pinned where CUDA is
    available: GPU memory for a device-to-host copy per layer in the forward and a
    host-to-device copy in the backward's recompute. On a GPU, with a transformers whose
    ``activation_checkpointing_enable`` takes ``offload`` (5.x), transformers does it; else
    (and on a CPU, where transformers' pinned buffers fail) each layer's checkpoint runs
    under ``torch.autograd.graph.save_on_cpu``, which is what transformers does too."""
    kwargs = {"use_reentrant": False}
    enable = model.activation_checkpointing_enable
    if offload and on_gpu and "offload" in inspect.signature(enable).parameters:
        enable(activation_checkpointing_kwargs=kwargs, offload=True)
        return
    enable(activation_checkpointing_kwargs=kwargs)
    if not offload:
        return
    layers = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None and getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = functools.partial(_offloaded, func)
            layers += 1
    if not layers:
        raise ModelError(
            f"model.activation_offload: {type(model).__name__} has no checkpointed layers whose inputs "
            "could be offloaded; set model.activation_offload=false"
        )


def _offloaded(checkpoint_func, *args, **kwargs):
    """One layer's checkpoint with the tensors it saves (its inputs) kept in CPU memory."""
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return checkpoint_func(*args, **kwargs)


def quantization_config(model_cfg: ModelConfig):
    """The ``BitsAndBytesConfig`` of ``model.quantization`` (None for ``none``): the decoder's
    linear layers quantized, the embeddings, norms and LM head not (transformers keeps the
    output embedding unquantized)."""
    q = model_cfg.quantization
    if q == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            f"model.quantization={q} needs bitsandbytes: pip install 'longtune[qlora]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if q == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q,
        bnb_4bit_use_double_quant=model_cfg.double_quantization,
        bnb_4bit_compute_dtype=getattr(torch, model_cfg.quantization_compute_dtype),
    )


def keep_4bit_layout(model) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights. On a CPU with AVX512-BF16 the
    first forward of a ``Linear4bit`` in eval mode without gradients rewrites its packed
    weight in place into a layout only an inference kernel reads (``gemv_4bit``): from then
    on the layer passes no gradient to its input, ignores the compute dtype, and
    dequantizing it (export) gives wrong weights — silently, also back in train mode. A
    before/after evaluation or a checkpoint's held-out loss is such a forward."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(
    model_cfg: ModelConfig,
    *,
    on_gpu: bool = False,
    for_training: bool = True,
    path: str | None = None,
    dtype: torch.dtype | None = None,
    empty: bool = False,
):
    """Load the base causal LM with its positions interpolated to model.target_context, its
    weights in ``dtype`` (None: ``resolve_precision(model_cfg, None, device).weights``;
    training passes the dtype resolved with train.precision).

    ``empty=True`` reads no weights: the same model (config, positions, dtype, training
    settings, eval mode) with every parameter and buffer on the meta device. A sharded run's
    ranks build this and receive their shards of rank 0's weights (longtune/train/parallel.py),
    so a node never holds a full copy per worker.

    Returns ``(model, info)``. info: path, original_context, target_context, rope_factor (the
    total factor of the RoPE of the layers attending over the whole context),
    interpolation_factor (applied now), rope (``rope_report``: per layer type) and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = path or model_path(model_cfg)
    if not path.startswith(("/", ".")) and Path(path).exists():
        path = str(Path(path).resolve())
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a model config from {path!r}: {exc}") from None
    original = original_context(config, model_cfg)
    applied = extend_rope(config, model_cfg.target_context, original)
    if dtype is None:
        dtype = resolve_precision(model_cfg, None, "cuda" if on_gpu else "cpu").weights
    if empty:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code
            )
        model.eval()  # as from_pretrained leaves it
    else:
        quantized = quantization_config(model_cfg)
        placement = {}
        if quantized is not None:
            # bitsandbytes places the quantized weights as it loads them: on this worker's own
            # GPU (Ray Train sets the current device; it is not always cuda:0), else the CPU
            placement = {"quantization_config": quantized,
                         "device_map": {"": torch.cuda.current_device() if on_gpu else "cpu"}}
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            trust_remote_code=model_cfg.trust_remote_code,
            **placement,
        )
        if quantized is not None:
            keep_4bit_layout(model)
    if for_training:
        model.config.use_cache = False  # no KV cache in training
        if model_cfg.activation_offload and not model_cfg.gradient_checkpointing:
            raise ModelError(
                "model.activation_offload=true needs model.gradient_checkpointing=true: it moves the "
                "checkpointed layer inputs (one [tokens, hidden] tensor per layer) to CPU memory; without "
                "checkpointing the backward keeps every intermediate activation of every layer, which "
                "longtune does not offload. Set model.gradient_checkpointing=true or "
                "model.activation_offload=false"
            )
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(model, offload=model_cfg.activation_offload, on_gpu=on_gpu)
    info = {
        "path": path,
        "original_context": original,
        "target_context": model_cfg.target_context,
        "rope_factor": float((_full_rope(model.config) or {}).get("factor") or 1.0),
        "interpolation_factor": max(applied.values(), default=1.0),
        "rope": rope_report(model, applied),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return model, info
