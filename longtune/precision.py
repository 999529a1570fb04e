"""Numeric precision: the one place that decides, from ``model.dtype``, ``train.precision``
and the device, which dtype the base weights load in, which dtype autocast computes in (or
none), and whether the loss needs a GradScaler.

    precision = resolve_precision(config.model, config.train, device.type)
    model, _ = load_model(config.model, on_gpu=..., dtype=precision.weights)
    scaler = precision.grad_scaler_for(device)       # a disabled scaler unless fp16
    with precision.autocast(device):
        loss = model(...).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                       # before clipping: true gradient norms
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    stepped = step_optimizer(scaler, optimizer)      # False: inf/nan gradients, step skipped

| train.precision | model.dtype | GPU with bf16 (Ampere+) | GPU without bf16 (V100, T4) | CPU |
| --- | --- | --- | --- | --- |
| auto | auto | bf16 weights, bf16 autocast | fp16 weights, fp16 autocast + GradScaler | fp32 weights; bf16 autocast on CPUs with native bf16, else none |
| auto | float32 | fp32 weights, bf16 autocast | fp32 weights, fp16 autocast + GradScaler | fp32 weights; bf16 autocast on CPUs with native bf16, else none |
| auto | bfloat16 | bf16 weights, bf16 autocast | the same (emulated) | bf16 weights, bf16 autocast |
| auto or fp16 | float16 | fp16 weights, fp16 autocast + GradScaler | the same | the same |
| bf16 | auto | bf16 weights, bf16 autocast | the same (emulated) | fp32 weights, bf16 autocast |
| bf16 | float32 / bfloat16 | that dtype's weights, bf16 autocast | the same | the same |
| fp16 | auto | fp16 weights, fp16 autocast + GradScaler | the same | fp32 weights, fp16 autocast + GradScaler |
| fp16 | float32 | fp32 weights, fp16 autocast + GradScaler | the same | the same |
| fp32 | auto / float32 | fp32 weights, no autocast | the same | the same |

Refused at config validation (``longtune.config.precision_conflict``): fp32 with bfloat16 or
float16 weights, bf16 with float16 weights, fp16 with bfloat16 weights. Whatever the weights,
the *trained* parameters (LoRA factors, embeddings, norms) are held in fp32
(``longtune.adapters.lora``); weights below fp32 always come with autocast in their dtype,
so a frozen bf16/fp16 matmul never meets an fp32 input outside autocast.

No Ray, no MLflow here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from longtune.config import ConfigError, precision_conflict

if TYPE_CHECKING:
    from longtune.config import ModelConfig, TrainConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_TYPES = ("cuda", "cpu")


class PrecisionError(ConfigError):
    """Precision settings that cannot run on this device; the message names the settings."""


def cpu_has_bf16() -> bool:
    """bf16 autocast pays on CPUs with native bf16 (AVX512-BF16, AMX): ~1.5x there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 natively: on CUDA, compute capability 8.0+
    (emulated bf16 on older GPUs runs, slowly); on CPU, AVX512-BF16 or AMX."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_bf16()


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (float32, bfloat16, float16)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}") from None


@dataclass(frozen=True)
class Precision:
    """What a job computes in. ``weights``: the dtype the base model loads in; ``compute``:
    the autocast dtype, None for none; ``grad_scaler``: the loss needs scaling (fp16)."""

    weights: torch.dtype
    compute: torch.dtype | None
    grad_scaler: bool

    def autocast(self, device: torch.device | str):
        """``torch.autocast`` in ``compute`` on ``device``'s type; a no-op context without."""
        device_type = torch.device(device).type
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.compute)

    def grad_scaler_for(self, device: torch.device | str) -> torch.amp.GradScaler:
        """A GradScaler for ``device``, enabled only when ``grad_scaler`` is: a disabled one
        passes the loss through, ``unscale_`` does nothing and ``step`` is optimizer.step, so
        the loop can always call it."""
        return torch.amp.GradScaler(torch.device(device).type, enabled=self.grad_scaler)

    def describe(self) -> dict[str, Any]:
        """For logs and MLflow params: {"weights": "bfloat16", "autocast": "bfloat16" | "none",
        "grad_scaler": False}."""
        return {
            "weights": _name(self.weights),
            "autocast": _name(self.compute) if self.compute is not None else "none",
            "grad_scaler": self.grad_scaler,
        }


def resolve_precision(
    model_cfg: "ModelConfig",
    train_cfg: "TrainConfig | None",
    device_type: str,
    *,
    bf16_native: bool | None = None,
) -> Precision:
    """The Precision of ``model.dtype`` x ``train.precision`` (auto when ``train_cfg`` is
    None, e.g. for evaluation alone) on ``device_type`` ("cuda" or "cpu"), per the table in
    this module's docstring. ``bf16_native`` overrides the probe of the device
    (``native_bf16``). Raises ConfigError for contradicting settings."""
    if device_type not in DEVICE_TYPES:
        raise PrecisionError(f"precision: device type {device_type!r} is not supported (expected cuda or cpu)")
    dtype = model_cfg.dtype
    precision = train_cfg.precision if train_cfg is not None else "auto"
    conflict = precision_conflict(dtype, precision)
    if conflict:  # configs built with model_copy skip validation
        raise ConfigError(conflict)
    on_gpu = device_type == "cuda"

    if precision == "fp32":
        return Precision(torch.float32, None, False)
    if precision == "fp16" or dtype == "float16":
        weights = torch.float16 if dtype == "auto" and on_gpu else torch_dtype("float32" if dtype == "auto" else dtype)
        return Precision(weights, torch.float16, True)
    if precision == "bf16" or dtype == "bfloat16":
        weights = torch.bfloat16 if dtype == "auto" and on_gpu else torch_dtype("float32" if dtype == "auto" else dtype)
        return Precision(weights, torch.bfloat16, False)

    # auto, with auto or float32 weights: the device decides
    native = native_bf16(device_type) if bf16_native is None else bf16_native
    if on_gpu:
        if native:
            return Precision(torch.bfloat16 if dtype == "auto" else torch.float32, torch.bfloat16, False)
        # no bf16 tensor cores (V100, T4): fp16 with loss scaling is what they run fast
        return Precision(torch.float16 if dtype == "auto" else torch.float32, torch.float16, True)
    return Precision(torch.float32, torch.bfloat16 if native else None, False)


def step_optimizer(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)`` then ``scaler.update()``. Returns False when the step was
    skipped because a gradient was inf/nan (fp16 overflow: the scaler lowers its scale and
    the loop should skip what reads gradients, e.g. LoRA²'s rank allocator)."""
    if not scaler.is_enabled():
        optimizer.step()
        return True
    before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # update() lowers the scale exactly when it found inf/nan (and step() then skipped)
    return scaler.get_scale() >= before


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = [
    "Precision",
    "PrecisionError",
    "cpu_has_bf16",
    "native_bf16",
    "resolve_precision",
    "step_optimizer",
    "torch_dtype",
]
