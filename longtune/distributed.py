"""Every collective longtune runs, in one place, each on the device its process group needs.

Ray Train's process group is gloo on CPU workers and NCCL on GPU workers, and NCCL reduces
CUDA tensors only: a tensor built with ``torch.tensor(...)`` (on the CPU) and handed to
``all_reduce`` works in every CPU test and kills every GPU run at its first use. So no code
outside this module calls a ``torch.distributed`` collective (a test keeps it so), and every
function here takes the worker's ``device`` and checks the tensors it is given against it.

Plain torch: no Ray, no MLflow (the adapters use it too).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group of any size."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _check_device(tensor: torch.Tensor, device: torch.device | str) -> None:
    device = torch.device(device)
    if tensor.device.type != device.type or (
        device.index is not None and tensor.device.index != device.index
    ):
        raise RuntimeError(
            f"a collective was handed a tensor on {tensor.device}, but this worker's device is "
            f"{device}: NCCL reduces only tensors on the worker's own GPU"
        )


def all_reduce_sum(values: Sequence[float], device: torch.device | str) -> list[float]:
    """Sum each of ``values`` over all ranks (in float64, on ``device``); the values
    themselves without a process group. One collective for all of them."""
    return summed(values, device).tolist()


def summed(values: Sequence[float], device: torch.device | str) -> torch.Tensor:
    """``all_reduce_sum`` as a float64 tensor on ``device`` (shape [len(values)])."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if is_distributed():
        _check_device(tensor, device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, device: torch.device | str, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` (in place, already on ``device``) with rank ``src``'s copy."""
    if is_distributed():
        _check_device(tensor, device)
        dist.broadcast(tensor, src=src)
    return tensor
