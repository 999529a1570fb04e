"""What a longtune training checkpoint holds, and how a run resumes from one.

    <checkpoint>/
      adapter/          the adapter in PEFT format: `PeftModel.from_pretrained(base, ...)` loads it
      optimizer.pt      AdamW state (train.strategy=ddp)
      sharded/          train.strategy=fsdp instead: a PyTorch distributed checkpoint of the
                        trained parameters, adapter buffers and AdamW state, each rank's
                        shards in its own file (__<rank>_0.distcp), the index in .metadata
      scheduler.pt      learning-rate schedule state
      adapter_state.pt  what the adapter's training hooks keep (LoRA²: the rank allocator's
                        importance EMAs); only for adapters that have any
      grad_scaler.pt    fp16's loss scale and its growth tracker; only with fp16
      state.json        step, data position (epoch, batches consumed in it), tokens seen
      config.yaml       the resolved config of the run

DDP: only rank 0 writes; every rank reads the same files on resume. FSDP: every rank calls
``write_checkpoint`` (the trained parameters are gathered to rank 0 for adapter/, the
allocator's state likewise) and writes its own shards into its own directory; rank 0 writes
everything else. Ray Train merges the ranks' directories into the one checkpoint (no file
name is written by two ranks), and on resume every rank reads its part of sharded/.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from longtune.errors import LongtuneError
from longtune.train.parallel import SHARDED_DIR, adapter_state_dict, load_sharded, save_sharded

ADAPTER_DIR = "adapter"


class CheckpointError(LongtuneError, RuntimeError):
    """A checkpoint this run cannot resume from; the message says what to do instead."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # passes over the data started
    batches_in_epoch: int = 0  # micro-batches consumed in the current epoch (per worker)
    tokens_seen: int = 0  # all workers

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


ADAPTER_STATE = "adapter_state.pt"
GRAD_SCALER = "grad_scaler.pt"


def write_checkpoint(
    directory: str | Path, model, optimizer, scheduler, state: TrainState, config_yaml: str, hooks=None,
    scaler=None, parallel=None,
) -> Path:
    """Write a checkpoint into ``directory`` (model: the PEFT model, not a DDP wrapper).

    ``parallel``: the rank's ``train.parallel.ParallelModel``; when it is sharded (FSDP)
    every rank calls this, each with its own ``directory``, and only rank 0's holds more
    than its shards (see the module docstring)."""
    from longtune.adapters import save_adapter

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if parallel is not None and parallel.sharded:
        return _write_sharded(directory, model, optimizer, scheduler, state, config_yaml, hooks, scaler, parallel)
    save_adapter(model, directory / ADAPTER_DIR)
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    hook_state = hooks.state_dict() if hooks is not None else {}
    return _write_rest(directory, scheduler, state, config_yaml, hook_state, scaler)


def _write_sharded(directory: Path, model, optimizer, scheduler, state, config_yaml, hooks, scaler, parallel) -> Path:
    """write_checkpoint of an FSDP run, on every rank: the collectives first, in one order."""
    import torch.distributed as dist

    from longtune.adapters import save_adapter

    adapter_state = adapter_state_dict(parallel)  # whole on rank 0 only
    hook_state = hooks.state_dict() if hooks is not None else {}  # the allocator gathers its EMAs
    save_sharded(directory, parallel, optimizer)
    if dist.get_rank() != 0:
        return directory
    save_adapter(model, directory / ADAPTER_DIR, state_dict=adapter_state)
    return _write_rest(directory, scheduler, state, config_yaml, hook_state, scaler)


def _write_rest(directory: Path, scheduler, state, config_yaml: str, hook_state: dict, scaler) -> Path:
    """What both strategies write alike, after the adapter and the optimizer state."""
    torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    if hook_state:
        torch.save(hook_state, directory / ADAPTER_STATE)
    if scaler is not None and scaler.is_enabled():
        torch.save(scaler.state_dict(), directory / GRAD_SCALER)
    (directory / "config.yaml").write_text(config_yaml)
    (directory / "state.json").write_text(state.to_json())  # last: a complete checkpoint
    return directory


def read_checkpoint(
    directory: str | Path, model, optimizer, scheduler, hooks=None, scaler=None, parallel=None
) -> TrainState:
    """Restore model weights (trainable ones and adapter buffers such as LoRA²'s masks),
    optimizer, scheduler, the adapter hooks' state and fp16's loss scale; return the
    training state. ``parallel`` as for ``write_checkpoint``: under FSDP every rank calls
    this and restores its shards from sharded/. A checkpoint of the other strategy is
    refused, naming the strategy to resume it with."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    directory = Path(directory)
    if not (directory / "state.json").is_file():
        raise FileNotFoundError(f"{directory} is not a complete longtune checkpoint (no state.json)")
    sharded = parallel is not None and parallel.sharded
    written = "fsdp" if (directory / SHARDED_DIR).is_dir() else "ddp"
    if written != ("fsdp" if sharded else "ddp"):
        raise CheckpointError(
            f"checkpoint {directory} was written by a train.strategy={written} run; resume it with "
            f"train.strategy={written}, or start a new run (another train.run_name)"
        )
    if sharded:
        load_sharded(directory, parallel, optimizer)
        return _read_rest(directory, scheduler, hooks, scaler)
    weights = load_peft_weights(str(directory / ADAPTER_DIR), device="cpu")
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", [])]
    if missing:
        raise RuntimeError(f"checkpoint {directory} holds weights this model lacks: {missing[:5]}")
    # Read onto the CPU: a bare torch.load puts tensors saved from cuda:0 back on cuda:0 on
    # every rank. The optimizer moves its state to each parameter's device as it loads; the
    # adapter hooks move theirs the same way.
    optimizer.load_state_dict(_load(directory / "optimizer.pt"))
    return _read_rest(directory, scheduler, hooks, scaler)


def _read_rest(directory: Path, scheduler, hooks, scaler) -> TrainState:
    """What every strategy's checkpoint holds whole: schedule, hooks' state, loss scale."""
    scheduler.load_state_dict(_load(directory / "scheduler.pt"))
    if hooks is not None and (directory / ADAPTER_STATE).is_file():
        hooks.load_state_dict(_load(directory / ADAPTER_STATE))
    if scaler is not None and scaler.is_enabled() and (directory / GRAD_SCALER).is_file():
        scaler.load_state_dict(_load(directory / GRAD_SCALER))
    return TrainState(**json.loads((directory / "state.json").read_text()))


def _load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)
