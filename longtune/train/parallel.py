"""Data parallelism: the one place that builds the device mesh and wraps the model, with DDP
(every worker holds the whole model) or FSDP2 (``torch.distributed.fsdp.fully_shard``: the
weights, gradients and optimizer state sharded over the workers).

    par = build(config, model_path, device, precision, make_loss)   # every rank
    par.wrapped(ids, positions, labels)       # what optimizer_step runs (train/loop.py)
    clip_grad_norm_(params, max_norm, device) # DDP or shards alike
    state = adapter_state_dict(par)           # every rank; whole on rank 0, None elsewhere
    save_sharded(directory, par, optimizer)   # every rank writes its own files
    load_sharded(directory, par, optimizer)   # every rank reads its part

How a model is sharded (``train.strategy=fsdp``):

- One FSDP group per decoder layer (the model's ``_no_split_modules``), one for an untied
  input embedding, and the root: the loss module (train/loss.py), holding what is left (the
  head, the final norm, the rotary embedding and a tied embedding, so the embedding and the
  head that share a weight are one group, as FSDP2 requires). The chunked loss calls the
  head chunk by chunk inside the root's forward, where the root's weights are gathered.
- Frozen base weights and trained adapter weights share their layer's group; FSDP2 needs
  one dtype among a group's *trained* parameters, which the adapters' fp32 trained
  parameters give (longtune/adapters/lora.py).
- On GPUs with a low-precision compute dtype the groups gather their weights in it (bf16,
  or fp16 with its sharded loss scaler) and reduce gradients in fp32; on CPUs the weights
  compute as they are, under the same autocast as DDP, so FSDP and DDP train alike.
- ``train.fsdp.reshard_after_forward`` frees a layer's gathered weights after its forward
  (gathered again in the backward): one layer's full weights at a time. ``false`` keeps them
  from forward to backward: half the all-gathers, the whole base at the peak.
- ``train.fsdp.cpu_offload``: sharded parameters, gradients and optimizer state in CPU memory.

Loading never holds more than one full copy of the base per node: every rank builds the
model on the meta device (no weights), shards it and allocates only its shards; rank 0
alone loads the real weights (in CPU memory) and broadcasts them tensor by tensor, each
rank keeping its part. The adapter's initial weights are rank 0's, as DDP's are.

Saving: the trained parameters are gathered whole to rank 0 alone (frozen weights are never
gathered), which writes the adapter exactly as a DDP run does (``adapter_state_dict``,
``longtune.adapters.save_adapter``). The training state is saved sharded with PyTorch
distributed checkpoint (``save_sharded``: each rank writes ``__<rank>_0.distcp``, rank 0
also ``.metadata``) into the one checkpoint directory Ray Train merges from every rank's
report: no two ranks write a file of the same name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from longtune.config import Config
from longtune.distributed import (
    all_reduce_sum,
    broadcast_,
    is_distributed,
    is_sharded,
    local_part,
    local_shard,
    world_size,
)
from longtune.errors import LongtuneError

if TYPE_CHECKING:
    from peft import PeftModel

    from longtune.precision import Precision

SHARDED_DIR = "sharded"  # a checkpoint's distributed-checkpoint directory (FSDP runs)


class ParallelError(LongtuneError, RuntimeError):
    """The model cannot be sharded or wrapped as configured; the message says what to change."""


@dataclass
class ParallelModel:
    """A rank's model as its strategy holds it."""

    strategy: str  # "ddp" or "fsdp"
    model: PeftModel  # the adapted model; under FSDP its parameters are DTensor shards
    loss: nn.Module  # the loss module around ``model`` (unwrapped: rank 0's evaluation runs it)
    wrapped: nn.Module  # what optimizer_step runs: DDP(loss), or the sharded loss itself
    device: torch.device
    mesh: Any = None  # the data-parallel DeviceMesh (FSDP)

    @property
    def sharded(self) -> bool:
        """True under FSDP: every forward, save and load is then a collective of all ranks."""
        return self.strategy == "fsdp"

    def grad_scaler(self, precision: Precision) -> torch.amp.GradScaler:
        """fp16's loss scaler (disabled otherwise); under FSDP one that agrees on inf/nan
        gradients across ranks, each of which sees only its shards."""
        if self.sharded and precision.grad_scaler:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type)
        return precision.grad_scaler_for(self.device)


def fsdp_model_conflict(config: Config, model_path: str) -> str | None:
    """Why FSDP cannot shard the base model at ``model_path``, in one line naming the
    setting and what to use instead; None when it can (or the strategy is ddp). Reads the
    model's config only (a hub model's config.json is fetched; unreadable: None, the
    workers' load then says why)."""
    if config.train.strategy != "fsdp":
        return None
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.model.trust_remote_code)
    except (OSError, ValueError):
        return None
    quantization = getattr(model_config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", "?")
        return (
            f"train.strategy=fsdp cannot shard the quantized base {model_path} (quantization_config: "
            f"{method}): FSDP2 shards unquantized weights only (bitsandbytes' packed 4-bit weights are "
            "corrupted by it); use train.strategy=ddp, or an unquantized checkpoint of the model"
        )
    return None


def device_mesh(device: torch.device):
    """The 1-D data-parallel mesh over every rank of the process group, on ``device``'s type."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size(),), mesh_dim_names=("dp",))


def adapted_model(config: Config, base: nn.Module) -> PeftModel:
    """``base`` -> adapter (its trained parameters in fp32) -> longtune's attention: S2-Attn,
    or full attention that keeps packed documents apart without the model's own [N, N] mask."""
    from longtune.adapters import apply_adapter
    from longtune.attention import use_document_full_attention, use_s2_attention

    model = apply_adapter(base, config.adapter, config.train.max_steps)
    a = config.attention
    if a.type == "s2":
        use_s2_attention(model, a.group_size_ratio, a.shift, group_size=a.group_size, backend=a.backend)
    else:
        use_document_full_attention(model, backend=a.backend)
    return model


def build(
    config: Config,
    model_path: str,
    device: torch.device,
    precision: Precision,
    make_loss: Callable[[nn.Module], nn.Module],
) -> ParallelModel:
    """The model of this rank as ``train.strategy`` says, ``make_loss(model)`` around it.
    DDP: the whole model on ``device``, the loss in DistributedDataParallel (when there is
    more than one rank). FSDP: see the module docstring; needs a process group (Ray Train
    starts one), also of one rank."""
    from longtune.models import load_model

    on_gpu = device.type == "cuda"
    if config.train.strategy == "ddp":
        base, _ = load_model(config.model, on_gpu=on_gpu, path=model_path, dtype=precision.weights)
        model = adapted_model(config, base).to(device)
        loss = make_loss(model)
        wrapped = loss
        if world_size() > 1:
            ids = [device.index if device.index is not None else torch.cuda.current_device()] if on_gpu else None
            wrapped = nn.parallel.DistributedDataParallel(loss, device_ids=ids)
        return ParallelModel("ddp", model, loss, wrapped, device)

    if not is_distributed():
        raise ParallelError(
            "train.strategy=fsdp needs an initialised torch.distributed process group (Ray Train "
            "starts one for every run; alone, call torch.distributed.init_process_group first)"
        )
    import torch.distributed as dist

    conflict = fsdp_model_conflict(config, model_path)  # also reached by a Tune trial's override
    if conflict:
        raise ParallelError(conflict)
    source = None
    if dist.get_rank() == 0:  # the one full copy: rank 0's, in CPU memory
        base, _ = load_model(config.model, on_gpu=on_gpu, path=model_path, dtype=precision.weights)
        source = adapted_model(config, base)
    base, _ = load_model(config.model, on_gpu=on_gpu, path=model_path, dtype=precision.weights, empty=True)
    model = adapted_model(config, base)
    loss = make_loss(model)
    mesh = device_mesh(device)
    shard(loss, model, mesh, config, precision, device)
    _materialize(loss, model, source, device, config.train.fsdp.cpu_offload)
    del source
    return ParallelModel("fsdp", model, loss, loss, device, mesh)


# ---------------------------------------------------------------- sharding


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of ``model`` (a causal LM, or a PEFT wrapper of one): the modules
    of the classes its ``_no_split_modules`` names (transformers' own list of the blocks
    never to split), else its gradient-checkpointing layers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    layers = [m for m in inner.modules() if type(m).__name__ in names]
    if not layers:
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in inner.modules() if isinstance(m, GradientCheckpointingLayer)]
    return layers


def shard(loss: nn.Module, model: nn.Module, mesh, config: Config, precision: Precision, device) -> None:
    """``fully_shard`` each decoder layer of ``model``, an untied input embedding, and
    ``loss`` (the root, holding the rest), in place, as the module docstring says."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    f = config.train.fsdp
    layers = decoder_layers(model)
    if not layers:
        raise ParallelError(
            f"train.strategy=fsdp: found no decoder layers to shard in {type(model).__name__} (no "
            "_no_split_modules, no gradient-checkpointing layers); use train.strategy=ddp"
        )
    mixed = MixedPrecisionPolicy()
    if device.type == "cuda" and precision.compute is not None:
        mixed = MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
    # pinned host memory makes the copies to the GPU asynchronous; a CPU worker has no GPU to pin for
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if f.cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=mixed, offload_policy=offload)
    for originals in _unused_originals(model):
        # groups whose forward never runs are never gathered: the frozen originals of the
        # trained copies (a 70B model's embedding: 0.5 GB) stay sharded through every step
        fully_shard(originals if len(originals) > 1 else originals[0], **common)
    for layer in layers:
        fully_shard(layer, reshard_after_forward=f.reshard_after_forward, **common)
    embedding = model.get_input_embeddings()
    if embedding is not None and not _shares_weights(embedding, model.get_output_embeddings()):
        fully_shard(embedding, reshard_after_forward=f.reshard_after_forward, **common)
    fully_shard(loss, **common)  # the root: FSDP keeps it gathered from forward to backward


def _unused_originals(model: nn.Module) -> list[list[nn.Module]]:
    """The frozen originals PEFT keeps beside the trained copies of ``modules_to_save``
    (embeddings, norms), which training never runs, grouped so that modules sharing a
    weight (a tied embedding's and head's originals) are one group."""
    from peft.utils import ModulesToSaveWrapper

    groups: list[list[nn.Module]] = []
    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        original = wrapper.original_module
        if any(p.requires_grad for p in original.parameters()) or not any(True for _ in original.parameters()):
            continue
        group = next((g for g in groups if any(_shares_weights(original, m) for m in g)), None)
        if group is None:
            groups.append([original])
        elif all(m is not original for m in group):
            group.append(original)
    return groups


def _shares_weights(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None:
        return False
    return bool({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})


@torch.no_grad()
def _materialize(loss: nn.Module, model: nn.Module, source: nn.Module | None, device, cpu_offload: bool) -> None:
    """Allocate this rank's shards of ``model`` (built on the meta device and sharded) and
    fill them from ``source``, rank 0's whole model, broadcast one tensor at a time:
    parameters, then buffers (the non-persistent ones too: rotary frequencies)."""
    loss.to_empty(device=torch.device("cpu") if cpu_offload else device)
    if cpu_offload:  # the shards stay in CPU memory; buffers compute on the GPU
        for module in loss.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
    whole = dict(source.named_parameters()) | dict(source.named_buffers()) if source is not None else {}
    for name, target in [*model.named_parameters(), *model.named_buffers()]:
        if source is not None:
            if name not in whole:
                raise ParallelError(f"train.strategy=fsdp: rank 0's model has no {name} (the ranks built different models)")
            tensor = whole[name].detach().to(device, target.dtype)
        else:
            tensor = torch.empty(target.shape, dtype=target.dtype, device=device)
        broadcast_(tensor, device)
        local_shard(target).copy_(local_part(tensor, target))


# ---------------------------------------------------------------- the step


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, device) -> float:
    """Scale the gradients of ``params`` so that their global 2-norm is at most ``max_norm``,
    as ``torch.nn.utils.clip_grad_norm_`` does; returns the norm before clipping. Sharded
    gradients (FSDP) are summed over the ranks on ``device`` (each element lives on one
    rank), also when they are offloaded to the CPU."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_sharded(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    locals_ = [local_shard(g) for g in grads]
    squares = [torch.linalg.vector_norm(g.float()).pow(2) for g in locals_ if g.numel()]
    local = float(torch.stack(squares).sum()) if squares else 0.0
    (total,) = all_reduce_sum([local], device)
    norm = math.sqrt(total)
    coefficient = min(max_norm / (norm + 1e-6), 1.0)
    if coefficient < 1.0:
        torch._foreach_mul_([g for g in locals_ if g.numel()], coefficient)
    return norm


# ---------------------------------------------------------------- save / load


def adapter_state_dict(par: ParallelModel) -> dict[str, torch.Tensor] | None:
    """The model's trained parameters and buffers, whole, in CPU memory, keys as
    ``model.state_dict()``'s (what ``save_adapter(model, path, state_dict)`` writes from):
    on rank 0; None on the other ranks. Under FSDP every rank must call it (the trained
    parameters are gathered; the frozen ones never are). Tied parameters stay one tensor
    under both names, as in the model's own state dict, so the adapter file is the one a
    DDP run writes."""
    import torch.distributed as dist

    if not par.sharded:
        return None if is_distributed() and dist.get_rank() != 0 else dict(par.model.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    state = get_model_state_dict(par.model, options=options)
    if dist.get_rank() != 0:
        return None
    first: dict[int, str] = {}  # a tied parameter's first name
    for name, value in par.model.state_dict(keep_vars=True).items():
        if name in state:
            state[name] = state[first.setdefault(id(value), name)]
    return state


def save_sharded(directory: str | Path, par: ParallelModel, optimizer: torch.optim.Optimizer) -> Path:
    """Write the trained parameters, adapter buffers and optimizer state of an FSDP run as a
    distributed checkpoint at ``directory/sharded``: every rank calls it and writes its own
    shards; rank 0 also writes the index (``.metadata``)."""
    import torch.distributed.checkpoint as dcp

    target = Path(directory) / SHARDED_DIR
    target.mkdir(parents=True, exist_ok=True)
    dcp.save(_state(par, optimizer), checkpoint_id=str(target))
    return target


def load_sharded(directory: str | Path, par: ParallelModel, optimizer: torch.optim.Optimizer) -> None:
    """Restore what ``save_sharded`` wrote (read from ``directory/sharded``) into this rank's
    shards of the model and optimizer; every rank calls it. The checkpoint may have been
    written by another number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    source = Path(directory) / SHARDED_DIR
    if not (source / ".metadata").is_file():
        raise FileNotFoundError(f"{source} holds no distributed checkpoint (no .metadata)")
    state = _state(par, optimizer)
    dcp.load(state, checkpoint_id=str(source))  # fails on any entry the checkpoint lacks
    # not strict: the frozen base is not in the checkpoint (it is the base model's)
    result = set_state_dict(
        par.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    frozen = {n for n, p in par.model.named_parameters() if not p.requires_grad}
    unrestored = [k for k in result.missing_keys if k not in frozen] + list(result.unexpected_keys)
    if unrestored:
        raise ParallelError(f"checkpoint {directory}: the model's {unrestored[:3]} were not restored")


def _state(par: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(
        par.model, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    return {"model": model_state, "optimizer": optimizer_state}
