"""Which attention kernel runs: torch SDPA, flash-attn's varlen kernel, or torch's own varlen
kernel (``torch.nn.attention.varlen.varlen_attn``), decided from what actually works here.

* ``sdpa``: torch's ``scaled_dot_product_attention`` over groups folded into the batch
  dimension, everywhere (CPU and GPU). Groups with a document start or padding get a mask
  (built once per forward); the others run the fused causal kernel with no mask. Attention
  logit softcapping runs an exact per-block math path instead (no fused kernel caps).
* ``flash``: ``flash_attn_varlen_func`` (the flash-attn package): every (row, group,
  document) run of real tokens is one sequence; no masks at all; softcap and dropout native.
* ``varlen``: torch's built-in flash kernel behind ``varlen_attn`` (torch >= 2.10, CUDA):
  the same cu_seqlens plumbing as ``flash``, with no package to build. No dropout, no softcap.
* ``auto``: on CUDA, ``flash`` when flash-attn imports and the GPU and dtype suit it, else
  ``varlen`` when the row needs masks (documents, padding, a window) and torch provides it,
  else ``sdpa``. On the CPU, ``sdpa``. Whenever it cannot take the first choice on a GPU,
  it says why once per process (the logger ``longtune.attention``).

Every probe is feature detection (does it import, does the signature take ``window_size``,
``enable_gqa``, ``scale``, ``softcap``), not a version check: torch 2.10, 2.11 and 2.13 all
spell ``varlen_attn`` differently.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Callable, Literal

import torch

Backend = Literal["auto", "sdpa", "flash", "varlen"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "flash", "varlen")

logger = logging.getLogger("longtune.attention")
_SAID: set[str] = set()


def say_once(message: str) -> None:
    """Log ``message`` as a warning the first time this process sees it (not per layer)."""
    if message not in _SAID:
        _SAID.add(message)
        logger.warning(message)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


# ---------------------------------------------------------------- probes (cached per process)


@functools.cache
def flash_attn_probe() -> tuple[Callable | None, str | None]:
    """(flash_attn_varlen_func, None) when flash-attn imports, else (None, why not)."""
    try:
        found = importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return None, "flash-attn is not installed (pip install 'longtune[gpu]')"
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError) as e:  # a build for another torch/CUDA: undefined symbol
        return None, f"flash-attn is installed but does not import ({type(e).__name__}: {e})"
    return flash_attn_varlen_func, None


@functools.cache
def torch_varlen_probe() -> tuple[Callable | None, str | None]:
    """(torch.nn.attention.varlen.varlen_attn, None), or (None, why not)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (torch >= 2.10)"
    flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    if not flash_built():
        return None, f"this torch build ({torch.__version__}) has no flash attention kernel for varlen_attn"
    return varlen_attn, None


@functools.cache
def signature_params(func: Callable) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return frozenset()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def gpu_reason(query: torch.Tensor, what: str) -> str | None:
    """Why ``what`` (a flash kernel) cannot run on this tensor, or None."""
    if not query.is_cuda:
        return f"{what} needs a CUDA tensor (got device={query.device})"
    index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    cap = _capability(index)
    if cap < (8, 0):
        return f"{what} needs a GPU of compute capability >= 8.0 (Ampere or newer); cuda:{index} has {cap[0]}.{cap[1]}"
    if query.dtype not in (torch.float16, torch.bfloat16):
        return f"{what} needs fp16 or bf16 inputs, got {query.dtype} (train.precision bf16 gives bf16)"
    if query.shape[-1] > 256:
        return f"{what} supports head_dim <= 256, got {query.shape[-1]}"
    return None


def reset_probes() -> None:
    """Forget cached probe results (tests that fake a kernel call this)."""
    for f in (flash_attn_probe, torch_varlen_probe, signature_params, _capability):
        if hasattr(f, "cache_clear"):  # a test may have replaced it
            f.cache_clear()
    _SAID.clear()


# ---------------------------------------------------------------- what each backend can do


def flash_unusable(query: torch.Tensor, softcap: float | None = None) -> str | None:
    func, why = flash_attn_probe()
    if func is None:
        return why
    why = gpu_reason(query, "flash-attn")
    if why is None and softcap is not None and "softcap" not in signature_params(func):
        why = "this flash-attn has no softcap argument (flash-attn >= 2.6 has)"
    return why


def varlen_unusable(
    query: torch.Tensor, *, softcap: float | None = None, dropout: float = 0.0, window: int | None = None
) -> str | None:
    func, why = torch_varlen_probe()
    if func is None:
        return why
    why = gpu_reason(query, "torch varlen_attn")
    if why is not None:
        return why
    params = signature_params(func)
    if "window_size" not in params and "is_causal" not in params:
        return "this torch's varlen_attn takes neither window_size nor is_causal: cannot ask for causal attention"
    if window is not None and "window_size" not in params:
        return f"this torch's varlen_attn has no window_size argument (sliding window {window})"
    if softcap is not None:
        return "torch varlen_attn cannot softcap attention logits"
    if dropout:
        return "torch varlen_attn has no attention dropout"
    return None


def pick_backend(
    requested: str,
    query: torch.Tensor,
    *,
    softcap: float | None = None,
    dropout: float = 0.0,
    window: int | None = None,
    needs_masks: bool = True,
) -> str:
    """The kernel to run: "sdpa", "flash" or "varlen".

    ``needs_masks``: the row has documents, padding or a window, so SDPA would need masks
    (auto then prefers a varlen kernel over SDPA). An explicit "flash" or "varlen" that cannot
    run here is an error naming why; one that runs but lacks a feature asked for (softcap,
    dropout) falls back to "sdpa", saying so once."""
    check_backend(requested)
    if requested == "sdpa":
        return "sdpa"
    if requested == "flash":
        why = flash_attn_probe()[1] or gpu_reason(query, "backend='flash' (flash-attn)")
        if why is not None:
            raise RuntimeError(
                f"attention.backend='flash' cannot run: {why}. Use backend 'auto' or 'sdpa'."
            )
        why = flash_unusable(query, softcap)
        if why is not None:
            say_once(f"attention.backend='flash': {why}; these layers run the exact SDPA/math path instead")
            return "sdpa"
        return "flash"
    if requested == "varlen":
        why = varlen_unusable(query)
        if why is not None:
            raise RuntimeError(
                f"attention.backend='varlen' cannot run: {why}. Use backend 'auto' or 'sdpa'."
            )
        why = varlen_unusable(query, softcap=softcap, dropout=dropout, window=window)
        if why is not None:
            say_once(f"attention.backend='varlen': {why}; these layers run the exact SDPA/math path instead")
            return "sdpa"
        return "varlen"
    # auto
    if not query.is_cuda:
        return "sdpa"
    why_flash = flash_unusable(query, softcap)
    if why_flash is None:
        return "flash"
    if needs_masks:
        why_varlen = varlen_unusable(query, softcap=softcap, dropout=dropout, window=window)
        if why_varlen is None:
            say_once(f"attention backend auto: not using flash-attn ({why_flash}); using torch's varlen_attn")
            return "varlen"
        say_once(
            f"attention backend auto: not using flash-attn ({why_flash}) nor torch varlen_attn "
            f"({why_varlen}); using torch SDPA, with masks for groups that hold document starts or padding"
        )
    else:
        say_once(f"attention backend auto: not using flash-attn ({why_flash}); using torch SDPA")
    return "sdpa"


def backend_report(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """For each backend, "usable" or why not, on ``device`` (default: cuda if present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probe = torch.empty(1, 1, 1, 64, device=device, dtype=dtype)
    return {
        "sdpa": "usable",
        "flash": flash_unusable(probe) or "usable",
        "varlen": varlen_unusable(probe) or "usable",
    }
