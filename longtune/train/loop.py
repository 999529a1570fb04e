"""One Ray Train worker's loop: stream its shard, train, report, checkpoint.

Every rank runs this function; rank 0 alone writes checkpoints and logs to MLflow, but all
ranks call ``ray.train.report`` the same number of times (at every log and checkpoint step),
as Ray Train requires.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from longtune.adapters import training_hooks
from longtune.config import Config, from_dict
from longtune.models import cpu_has_bf16
from longtune.train.checkpoint import TrainState, read_checkpoint, write_checkpoint


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    # One INFO line per report from Ray Train's worker context is noise next to our own log.
    _quiet_report_log()
    config: Config = from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(config.train.seed)
    if not on_gpu:
        torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))

    # ---------------------------------------------------------------- model, optimizer
    model = build_model(config, loop_config["model_path"], device)
    wrapped = ray.train.torch.prepare_model(
        model, move_to_device=False, parallel_strategy=config.train.strategy
    )
    params, optimizer, scheduler = build_optimizer(config, model)
    hooks = training_hooks(model, config.adapter, config.train.max_steps)
    t = config.train

    # ---------------------------------------------------------------- resume
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(directory, model, optimizer, scheduler, hooks)
        if rank == 0:
            print(f"[longtune] resumed at step {state.step} (epoch {state.epoch}, "
                  f"batch {state.batches_in_epoch})")

    # ---------------------------------------------------------------- data
    context = config.context_length
    tokens_per_step = world * t.grad_accum_steps * t.batch_size_per_worker * context
    batches = _batches(ray.train.get_dataset_shard("train"), t.batch_size_per_worker, state, device)
    eval_blocks = _EvalBlocks(loop_config, config, device) if rank == 0 else None
    tracker = _metrics_logger(loop_config) if rank == 0 else None
    autocast = autocast_for(config, device)
    config_yaml = config.to_yaml()
    fault = loop_config.get("fault_injection")

    if checkpoint is not None and rank == 0:
        tracker.log_metrics({"resumed_from_step": state.step}, state.step)

    # ---------------------------------------------------------------- baseline
    if state.step == 0 and rank == 0 and eval_blocks is not None:
        # the extended model before any training: what fine-tuning has to improve on
        baseline = eval_blocks.loss(model, autocast)
        if baseline:
            tracker.log_metrics(baseline, 0)
            print("[longtune] before training: " + "  ".join(_fmt(k, v) for k, v in baseline.items()))

    # ---------------------------------------------------------------- train
    model.train()
    window_start, window_steps, window_loss = time.perf_counter(), 0, 0.0
    while state.step < t.max_steps:
        window_loss += optimizer_step(
            wrapped, batches, params, optimizer, scheduler, config, autocast, hooks, state.step + 1
        )
        state.step += 1
        state.tokens_seen += tokens_per_step
        window_steps += 1

        if fault and rank == fault.get("rank", 0) and state.step == fault["kill_at_step"]:
            marker = Path(fault["marker"])
            if not marker.exists():  # the first attempt only
                marker.write_text(str(state.step))
                os._exit(1)

        log_now = state.step % t.log_every == 0 or state.step == t.max_steps
        checkpoint_now = state.step % t.checkpoint_every == 0 or state.step == t.max_steps
        if not (log_now or checkpoint_now):
            continue

        # ------------------------------------------------------------ metrics
        elapsed = time.perf_counter() - window_start
        mean_loss = torch.tensor([window_loss / window_steps], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean_loss)
        metrics = {
            "step": state.step,
            "loss": mean_loss.item() / world,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_step * window_steps / elapsed,
            "step_time_s": elapsed / window_steps,
            "peak_memory_mb": _peak_memory_mb(device),
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch,
            **hooks.metrics(),
        }
        window_steps, window_loss = 0, 0.0

        # ------------------------------------------------------------ eval, checkpoint, report
        if rank == 0 and checkpoint_now and eval_blocks is not None:
            metrics.update(eval_blocks.loss(model, autocast))
        if rank == 0:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, state.step)
            print("[longtune] " + "  ".join(_fmt(k, v) for k, v in metrics.items()))
        if checkpoint_now and rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                write_checkpoint(directory, model, optimizer, scheduler, state, config_yaml, hooks)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        if checkpoint_now and state.step < t.max_steps:
            # Ray Train registers a checkpoint when its controller consumes the report, and a
            # worker's report queue holds one result: this second report returns only after
            # the checkpoint's has been consumed, so a crash from here on resumes from it.
            ray.train.report({**metrics, "checkpoint_barrier": 1})
        window_start = time.perf_counter()  # eval and checkpoint time is not training time
    if tracker is not None:
        tracker.close()  # stops this process's system metrics; the driver ends the run


def _quiet_report_log() -> None:
    """Ray Train V2 logs one INFO line per report ("Reporting training result ...") from a
    logger named after its module's *file path*, so a dotted-name getLogger misses it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without Train V2's layout: nothing to quiet
        return
    getattr(context, "logger", logging.getLogger(context.__file__)).setLevel(logging.WARNING)


def build_model(config: Config, model_path: str, device):
    """Base model -> longer context (position interpolation) -> adapter -> attention."""
    from longtune.adapters import apply_adapter
    from longtune.attention import use_s2_attention
    from longtune.models import load_model

    model, _ = load_model(config.model, on_gpu=device.type == "cuda", path=model_path)
    model = apply_adapter(model, config.adapter, config.train.max_steps)
    if config.attention.type == "s2":
        a = config.attention
        use_s2_attention(model, a.group_size_ratio, a.shift, group_size=a.group_size, backend=a.backend)
    return model.to(device)


def build_optimizer(config: Config, model):
    """AdamW over the trainable parameters, constant learning rate after a linear warm-up."""
    from transformers import get_constant_schedule_with_warmup

    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return params, optimizer, get_constant_schedule_with_warmup(optimizer, t.warmup_steps)


def optimizer_step(model, batches, params, optimizer, scheduler, config: Config, autocast,
                   hooks=None, step: int | None = None) -> float:
    """One optimizer step over train.grad_accum_steps micro-batches; returns the mean
    language-model loss (an adapter's extra loss, e.g. LoRA²'s orthogonality penalty, is
    trained on but not included). ``model`` may be a DDP wrapper: gradients sync on the last
    micro-batch only. ``hooks`` (``longtune.adapters.training_hooks``) run with ``step``, the
    number of this step counted from 1, after the optimizer step and before zero_grad."""
    t = config.train
    total = 0.0
    for micro in range(t.grad_accum_steps):
        ids, positions, labels = _inputs(next(batches))
        last = micro == t.grad_accum_steps - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast:
                loss = model(input_ids=ids, position_ids=positions, labels=labels).loss
            extra = hooks.extra_loss() if hooks is not None else None
            objective = loss if extra is None else loss + extra
            (objective / t.grad_accum_steps).backward()
        total += loss.item() / t.grad_accum_steps
    if t.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
    optimizer.step()
    if hooks is not None:
        hooks.after_optimizer_step(step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def _inputs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids, labels. A document's first token is not a target: nothing
    before it in the block belongs to its document (as transformers'
    DataCollatorWithFlattening does); padding is not a target either."""
    ids = batch["input_ids"].long()
    positions = batch["position_ids"].long()
    labels = ids.masked_fill(positions == 0, -100)
    if "loss_mask" in batch:
        labels = labels.masked_fill(batch["loss_mask"] == 0, -100)
    return ids, positions, labels


def _batches(shard, batch_size: int, state: TrainState, device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this worker's shard, epoch after epoch, starting where
    ``state`` says (the batches of the current epoch already consumed are skipped)."""
    while True:
        skip = state.batches_in_epoch
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device):
            seen += 1
            if seen <= skip:
                continue
            state.batches_in_epoch = seen
            yield batch
        if seen == 0:
            raise RuntimeError(
                f"worker has no training data: fewer than {batch_size} blocks in its shard; "
                "use more data, fewer workers or a smaller train.batch_size_per_worker"
            )
        state.epoch += 1
        state.batches_in_epoch = 0


class _EvalBlocks:
    """Held-out blocks scored with full attention at each checkpoint (rank 0). The first
    ``eval.loss_blocks`` blocks are read once and kept, so streamed data is not re-read."""

    def __init__(self, loop_config: dict[str, Any], config: Config, device) -> None:
        self.limit = config.eval.loss_blocks
        self.device = device
        self.blocks: list[dict[str, torch.Tensor]] | None = None
        self.has_eval = loop_config.get("has_eval", False)

    def _load(self) -> list[dict[str, torch.Tensor]]:
        import ray.train

        shard = ray.train.get_dataset_shard("eval")
        blocks, n = [], 0
        for batch in shard.iter_torch_batches(batch_size=1, device=self.device):
            blocks.append(batch)
            n += 1
            if n >= self.limit:
                break
        return blocks

    def loss(self, model, autocast) -> dict[str, float]:
        if not self.has_eval or self.limit == 0:
            return {}
        if self.blocks is None:
            self.blocks = self._load()
        if not self.blocks:
            return {}
        model.eval()  # full attention, as LongLoRA evaluates
        total, count = 0.0, 0
        with torch.no_grad(), autocast:
            for batch in self.blocks:
                ids, positions, labels = _inputs(batch)
                # the negative log-likelihood from the logits, not the model's `loss`: PEFT's
                # AdaLoRA adds its orthogonality penalty to `loss`, even in eval mode
                logits = model(input_ids=ids, position_ids=positions).logits[:, :-1].float()
                targets = labels[:, 1:]
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
                ).item()
                count += int((targets != -100).sum())
        model.train()
        mean = total / max(count, 1)
        return {"eval_loss": mean, "eval_ppl": float(torch.tensor(mean).exp())}


def autocast_for(config: Config, device):
    precision = config.train.precision
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16" or cpu_has_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _metrics_logger(loop_config: dict[str, Any]):
    """Rank 0's MLflow tracker, attached to the run the driver started (never ends it)."""
    from longtune.config import TrackingConfig
    from longtune.tracking import Tracker

    run = loop_config.get("mlflow") or {}
    return Tracker.attach(
        TrackingConfig(**run.get("tracking", {"enabled": False})), run.get("run_id"), node_id="rank0"
    )


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"

