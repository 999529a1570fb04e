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


def gathered_ints(value: int, device: torch.device | str) -> list[int]:
    """Every rank's ``value``, in rank order (one int64 tensor of shape [1] a rank, on
    ``device``); ``[value]`` without a process group."""
    if not is_distributed():
        return [int(value)]
    mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
    _check_device(mine, device)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(out, mine)
    return [int(v) for v in torch.cat(out).tolist()]


def broadcast_(tensor: torch.Tensor, device: torch.device | str, src: int = 0, group=None) -> torch.Tensor:
    """Overwrite ``tensor`` (in place, already on ``device``) with rank ``src``'s copy (``src``
    a global rank; ``group``: the ranks taking part, None = all)."""
    if is_distributed():
        _check_device(tensor, device)
        dist.broadcast(tensor, src=src, group=group)
    return tensor


# ---------------------------------------------------------------- sharded tensors (FSDP2)
#
# Under FSDP2 (train.strategy=fsdp) a parameter between steps is a DTensor: this rank's
# shard of it (dim 0, torch.chunk's split). These helpers let code that needs a whole
# parameter, or this rank's part of a whole tensor, run the same way on plain tensors (DDP,
# one process), where they pass the tensor through. With train.fsdp.cpu_offload the shards
# live on the CPU while the mesh is the GPUs: the gathers run on the mesh's device.


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (an FSDP2 parameter, gradient or optimizer state shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` as a plain tensor (``tensor`` itself when not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def mesh_device(tensor: torch.Tensor) -> torch.device:
    """Where ``tensor``'s collectives run: its mesh's device for a DTensor (this process's
    current GPU on a CUDA mesh), else its own device."""
    if not is_sharded(tensor):
        return tensor.device
    kind = tensor.device_mesh.device_type
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, torch.get_device_module(kind).current_device())


def gathered(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor whose part on this rank is ``local``, sharded as ``like`` (a DTensor)
    is, on ``like``'s mesh device, on every rank; ``local`` itself when ``like`` is not
    sharded. Differentiable: the gradient of a whole that every rank computes alike flows
    back to this rank's part. A collective: every rank calls it, in the same order."""
    if not is_sharded(like):
        return local
    from torch.distributed.tensor import DTensor

    part = DTensor.from_local(
        local.to(mesh_device(like)), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
    return part.full_tensor()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor gathered (``gathered``), a plain tensor as it is."""
    return gathered(local_shard(tensor), tensor)


def local_part(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (the same on every rank) as ``like`` is sharded, on the
    device of ``like``'s part; ``whole`` on ``like``'s device when ``like`` is not sharded.
    No communication."""
    if not is_sharded(like):
        return whole.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    mine = distribute_tensor(
        whole.to(mesh_device(like)), like.device_mesh, like.placements, src_data_rank=None
    ).to_local()
    return mine.to(local_shard(like).device)


# ---------------------------------------------------------------- sequence parallelism


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def sequence_groups(size: int):
    """The process groups of sequence parallelism: consecutive ranks ``[i*size, (i+1)*size)``
    share a sequence. Every rank must call this (``new_group`` is collective), with the
    same ``size``; returns (this rank's group, the global ranks in it)."""
    world = world_size()
    if size < 1 or world % size:
        raise ValueError(f"sequence parallel size {size} must divide the number of ranks ({world})")
    mine, members = None, ()
    for start in range(0, world, size):
        ranks = tuple(range(start, start + size))
        group = dist.new_group(list(ranks)) if is_distributed() and size > 1 else None
        if rank() in ranks:
            mine, members = group, ranks
    return mine, members


def exchange(
    sends: Sequence[tuple[torch.Tensor, int]],
    recvs: Sequence[tuple[torch.Tensor, int]],
    device: torch.device | str,
    group=None,
) -> None:
    """Point-to-point: send each ``(tensor, global rank)`` of ``sends`` and fill each
    ``(tensor, global rank)`` of ``recvs`` in place, all posted at once and waited for, so
    that ranks sending to each other in a chain cannot deadlock. Tensors on ``device``."""
    ops = []
    for tensor, peer in sends:
        _check_device(tensor, device)
        ops.append(dist.P2POp(dist.isend, tensor, peer, group))
    for tensor, peer in recvs:
        _check_device(tensor, device)
        ops.append(dist.P2POp(dist.irecv, tensor, peer, group))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
