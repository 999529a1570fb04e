"""One Ray Train worker's loop: stream its shard, train, report, checkpoint.

Every rank runs this function; rank 0 alone logs to MLflow and (DDP) writes checkpoints,
but all ranks call ``ray.train.report`` the same number of times (at every log and
checkpoint step), as Ray Train requires. Under FSDP (train.strategy=fsdp) every rank writes
its shards into the checkpoint it reports and evaluates its share of the held-out blocks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from longtune.adapters import training_hooks
from longtune.attention.sequence_parallel import sharded_sequence
from longtune.config import Config
from longtune.distributed import all_reduce_sum, world_size
from longtune.precision import Precision, resolve_precision, step_optimizer
from longtune.train.checkpoint import TrainState, read_checkpoint, write_checkpoint
from longtune.train.host_memory import retain_freed_memory
from longtune.train.loss import LanguageModelLoss, block_inputs, target_count
from longtune.train.parallel import ParallelModel, adapted_model, clip_grad_norm_
from longtune.train.sequence import SequenceGroup, sequence_group
from longtune.train.worker_config import WorkerConfig
from longtune.tracking import metric_name


def train_loop(worker: WorkerConfig) -> None:
    import ray.train
    import ray.train.torch

    # One INFO line per report from Ray Train's worker context is noise next to our own log.
    _quiet_report_log()
    config, t = worker.config, worker.config.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # this worker's own GPU (not always cuda:0), or the CPU
    torch.manual_seed(t.seed)
    if t.retain_host_memory and device.type == "cpu":
        retain_freed_memory()  # before the model's first allocation (train/host_memory.py)
    if device.type != "cuda":
        torch.set_num_threads(max(1, worker.threads_per_worker))
    if worker.local_ray_driver is not None and device.type == "cpu":  # measured there, gloo
        _yield_local_ray(worker.local_ray_driver, ctx.get_local_rank(), rank, device)

    # ---------------------------------------------------------------- model, optimizer
    precision = resolve_precision(config.model, t, device.type)
    par = build_parallel(config, worker.model_path, device, precision)
    # the loss module is what DDP wraps and FSDP's root: its forward runs the model (train/loss.py)
    model, loss_fn, wrapped = par.model, par.loss, par.wrapped
    params, optimizer, scheduler = build_optimizer(config, model)
    hooks = training_hooks(model, config.adapter, t.max_steps)
    scaler = par.grad_scaler(precision)  # fp16 only; otherwise it passes everything through

    # ---------------------------------------------------------------- resume
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint(directory, model, optimizer, scheduler, hooks, scaler, parallel=par)
        if rank == 0:
            print(f"[longtune] resumed at step {state.step} (epoch {state.epoch}, "
                  f"batch {state.batches_in_epoch})")

    # ---------------------------------------------------------------- data
    # sequence parallelism: the group's leader reads its data and shares it (train/sequence.py)
    sequence = sequence_group(config.scaling.sequence_parallel, device)
    p = config.scaling.sequence_parallel
    tokens_per_step = world // p * t.grad_accum_steps * t.batch_size_per_worker * config.context_length
    # every rank asks: on Ray Data's path the first ask is a barrier of Ray Train's
    shard = dataset_shard(worker, "train", rank // p, world // p)
    batches = _batches(shard, t.batch_size_per_worker, state, device) \
        if sequence is None or sequence.is_leader else None
    if sequence is not None:
        batches = sequence.shared(batches, t.batch_size_per_worker, config.context_length)
    # FSDP: every rank runs every forward (the weights are gathered from all of them)
    evaluates = worker.has_eval and (rank == 0 or par.sharded)
    eval_blocks = _EvalBlocks(worker, device, rank if par.sharded else 0, world if par.sharded else 1) \
        if evaluates else None
    tracker = _metrics_logger(worker) if rank == 0 else None
    autocast = precision.autocast(device)
    config_yaml = config.to_yaml()

    # A resumed run redoes the steps after its checkpoint; those the lost attempt had logged
    # already stay as they were: MLflow's history holds each step once.
    logged_up_to = 0
    if checkpoint is not None and rank == 0:
        logged_up_to = tracker.last_step(metric_name("loss"))
        redone = max(0, logged_up_to - state.step)
        tracker.log_metrics({"resumed_from_step": state.step, "redone_steps": redone}, state.step)
        if redone:
            steps = f"step {logged_up_to}" if redone == 1 else f"steps {state.step + 1}-{logged_up_to}"
            print(f"[longtune] {steps} redone: logged before the failure, not logged again")

    # ---------------------------------------------------------------- baseline
    if state.step == 0 and eval_blocks is not None:
        # the extended model before any training: what fine-tuning has to improve on
        baseline = eval_blocks.loss(loss_fn, autocast)
        if baseline and rank == 0:
            tracker.log_metrics(baseline, 0)
            print("[longtune] before training: " + "  ".join(_fmt(k, v) for k, v in baseline.items()))

    # ---------------------------------------------------------------- train
    model.train()
    window_start, window_steps, window = time.perf_counter(), 0, StepLoss()
    data_wait = 0.0  # seconds of the window spent waiting for the next micro-batches
    while state.step < t.max_steps:
        fetch = time.perf_counter()
        micro_batches = [next(batches) for _ in range(t.grad_accum_steps)]
        data_wait += time.perf_counter() - fetch
        window += optimizer_step(
            wrapped, micro_batches, params, optimizer, scheduler, config, autocast, hooks, state.step + 1, scaler,
            sequence,
        )
        state.step += 1
        state.tokens_seen += tokens_per_step
        window_steps += 1
        for probe in worker.probes:
            probe.after_step(rank, state.step, micro_batches)

        log_now = state.step % t.log_every == 0 or state.step == t.max_steps
        checkpoint_now = state.step % t.checkpoint_every == 0 or state.step == t.max_steps
        if not (log_now or checkpoint_now):
            continue

        # ------------------------------------------------------------ metrics
        elapsed = time.perf_counter() - window_start
        loss_sum, targets = all_reduce_sum([window.loss_sum, window.tokens], device)
        metrics = {
            "step": state.step,
            "loss": loss_sum / max(targets, 1.0),  # per target token of every rank
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_step * window_steps / elapsed,
            "step_time_s": elapsed / window_steps,
            "data_wait_s": data_wait / window_steps,  # of step_time_s: the data did not keep up
            "peak_memory_mb": _peak_memory_mb(device),
            "tokens_seen": state.tokens_seen,
            "epoch": state.epoch,
            **hooks.metrics(),
            **({"loss_scale": scaler.get_scale(), "skipped_steps": window.skipped} if scaler.is_enabled() else {}),
        }
        window_steps, window, data_wait = 0, StepLoss(), 0.0

        # ------------------------------------------------------------ eval, checkpoint, report
        if checkpoint_now and eval_blocks is not None:
            metrics.update(eval_blocks.loss(loss_fn, autocast))
        if rank == 0:
            if state.step > logged_up_to:
                tracker.log_metrics(_tracked(metrics), state.step)
            print("[longtune] " + "  ".join(_fmt(k, v) for k, v in metrics.items()))
        if checkpoint_now and (rank == 0 or par.sharded):
            # FSDP: each rank reports its own directory (its shards; rank 0's also everything
            # else) and Ray Train merges them into the one checkpoint
            with tempfile.TemporaryDirectory() as directory:
                write_checkpoint(directory, model, optimizer, scheduler, state, config_yaml, hooks, scaler,
                                 parallel=par)
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


def _tracked(metrics: dict[str, Any]) -> dict[str, Any]:
    """What MLflow gets of a report: not the step (MLflow's own x axis), and the epoch only
    once the data has been read through (until then a constant 0 chart)."""
    return {k: v for k, v in metrics.items() if k != "step" and not (k == "epoch" and v == 0)}


def _yield_local_ray(driver_pid: int, local_rank: int, rank: int, device: torch.device) -> None:
    """Every worker takes back normal priority if it inherited idle priority from a lowered
    raylet (a restarted worker) and moves its own Ray threads to idle priority; the first
    worker then moves the local Ray's own processes, all but the training workers, there
    too (train/background.py)."""
    import os

    from longtune.distributed import gathered_ints
    from longtune.runtime import verbose
    from longtune.train import background

    if not background.restore_own_priority():
        print(f"[longtune] worker {rank} runs at idle CPU priority, inherited from the local Ray's "
              "raylet, and may not raise it (needs root or CAP_SYS_NICE): it yields to every other "
              "process on this machine; set scaling.local_ray_idle_priority=false to avoid it")
    workers = gathered_ints(os.getpid(), device)
    own = background.lower_own_ray_threads()
    if local_rank == 0:
        lowered = background.lower_local_ray(driver_pid, workers)
        if verbose():
            print(f"[longtune] the local Ray's own processes at idle CPU priority: {lowered.threads} threads "
                  f"of {', '.join(sorted(set(lowered.processes))) or 'none'}, and {own} of the worker's"
                  + ("; raylet kept (no privilege to restore the workers it forks)" if lowered.kept_raylet else ""))


def _quiet_report_log() -> None:
    """Ray Train V2 logs one INFO line per report ("Reporting training result ...") from a
    logger named after its module's *file path*, so a dotted-name getLogger misses it."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without Train V2's layout: nothing to quiet
        return
    getattr(context, "logger", logging.getLogger(context.__file__)).setLevel(logging.WARNING)


def build_model(config: Config, model_path: str, device, precision: Precision | None = None):
    """Base model (weights in ``precision.weights``, resolved from the config by default) ->
    longer context (position interpolation) -> adapter, its trained parameters in fp32 ->
    attention: the whole model on ``device`` (what one DDP worker holds)."""
    from longtune.models import load_model

    precision = precision or resolve_precision(config.model, config.train, device.type)
    model, _ = load_model(config.model, on_gpu=device.type == "cuda", path=model_path, dtype=precision.weights)
    return adapted_model(config, model).to(device)


def build_parallel(config: Config, model_path: str, device, precision: Precision) -> ParallelModel:
    """This rank's model, its loss and the wrapper optimizer_step runs, as train.strategy says
    (train/parallel.py): DDP of the loss, or the model sharded with FSDP2."""
    from longtune.train.parallel import build

    return build(config, model_path, device, precision, lambda model: build_loss(config, model))


def build_loss(config: Config, model) -> LanguageModelLoss:
    """The language-model loss of ``model`` as train.chunked_loss and train.loss_chunk_tokens
    say (train/loss.py): the module a data-parallel wrapper wraps."""
    t = config.train
    return LanguageModelLoss(model, t.loss_chunk_tokens if t.chunked_loss else None)


def build_optimizer(config: Config, model):
    """AdamW over the trainable parameters, constant learning rate after a linear warm-up."""
    from transformers import get_constant_schedule_with_warmup

    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    return params, optimizer, get_constant_schedule_with_warmup(optimizer, t.warmup_steps)


@dataclass
class StepLoss:
    """The language-model loss of one or more steps on one rank, as sums (train/loss.py)."""

    loss_sum: float = 0.0  # summed token cross-entropies
    tokens: int = 0  # the target tokens they were summed over
    skipped: int = 0  # optimizer steps fp16's loss scaling skipped (inf/nan gradients)

    def __iadd__(self, other: StepLoss) -> StepLoss:
        self.loss_sum += other.loss_sum
        self.tokens += other.tokens
        self.skipped += other.skipped
        return self

    @property
    def mean(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


def optimizer_step(model, micro_batches: list[dict[str, torch.Tensor]], params, optimizer, scheduler,
                   config: Config, autocast, hooks=None, step: int | None = None,
                   scaler: torch.amp.GradScaler | None = None, sequence: SequenceGroup | None = None) -> StepLoss:
    """One optimizer step over ``micro_batches`` (train.grad_accum_steps batches of blocks,
    on the worker's device); returns this rank's language-model loss as sums (an adapter's
    extra loss, e.g. LoRA²'s orthogonality penalty, is trained on but not included).

    ``model``: a ``LanguageModelLoss`` (``build_loss``), bare or inside DDP, or sharded by
    FSDP2 (``build_parallel``), or a bare causal LM, whose loss is then built from the config
    here. A data-parallel wrapper of the bare model is refused: the chunked loss would run
    around it, bypassing its gradient sync.

    The gradient is that of the step's global loss: token losses summed over every
    micro-batch and rank, divided by the number of target tokens of all ranks (one small
    all-reduce per step), so a padded block weighs only its real tokens. A DDP wrapper (of the
    loss) averages gradients over ranks (hence the world-size factor) and syncs
    on the last micro-batch only. ``hooks`` (``longtune.adapters.training_hooks``) run with
    ``step``, this step's number counted from 1, after the optimizer step, before zero_grad.
    ``scaler`` (fp16: ``Precision.grad_scaler_for``) scales the loss; a step it skips for
    inf/nan gradients does not reach the hooks (LoRA²'s allocator would read them).

    The adapter's extra loss does not depend on the data: it is computed and backpropagated
    once, before the micro-batches, while every parameter is as the optimizer left it (under
    FSDP a shard, whose penalty gradient lands on the shard and is added to what the
    micro-batches reduce into it; with reshard_after_forward=false the layers' weights are
    gathered between a forward and its backward and the penalty could not reach the shards).
    Its gradient is the one a share of it on each of the micro-batches would give.

    ``sequence`` (scaling.sequence_parallel > 1, train/sequence.py): every rank of the group
    got the same micro-batches; each trains on its shard of their tokens, the forward and
    the backward inside ``sharded_sequence`` (checkpointed layers recompute attention, halo
    exchange included, in the backward), and counts its shard's targets only."""
    loss_fn = _loss_module(model, config)
    inputs = [block_inputs(batch) for batch in micro_batches]
    device = inputs[0][0].device
    shards = [None] * len(inputs)
    if sequence is not None:
        cut = [sequence.shard(*x) for x in inputs]
        inputs, shards = [x[:3] for x in cut], [x[3] for x in cut]
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)  # passes everything through
    local_tokens = sum(target_count(labels) for _, _, labels in inputs)
    (global_tokens,) = all_reduce_sum([local_tokens], device)
    scale = world_size() / max(global_tokens, 1.0)
    result = StepLoss(tokens=local_tokens)
    extra = hooks.extra_loss() if hooks is not None else None
    if extra is not None:
        # outside DDP's forward: its gradient stays local until the last micro-batch's sync
        scaler.scale(extra).backward()
    for i, (ids, positions, labels) in enumerate(inputs):
        last = i == len(inputs) - 1
        sync = contextlib.nullcontext() if last or not hasattr(loss_fn, "no_sync") else loss_fn.no_sync()
        with sync, sharded_sequence(shards[i]):
            with autocast:
                loss_sum = loss_fn(ids, positions, labels)
            scaler.scale(loss_sum * scale).backward()
        result.loss_sum += loss_sum.item()
    scaler.unscale_(optimizer)  # before clipping: the true gradient norm
    if config.train.max_grad_norm is not None:
        clip_grad_norm_(params, config.train.max_grad_norm, device)
    stepped = step_optimizer(scaler, optimizer)
    result.skipped = int(not stepped)
    if hooks is not None and stepped:
        hooks.after_optimizer_step(step)
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return result


def _loss_module(model, config: Config):
    """``model`` as the loss module optimizer_step calls (see its docstring)."""
    if isinstance(model, LanguageModelLoss) or isinstance(getattr(model, "module", None), LanguageModelLoss):
        return model
    if isinstance(getattr(model, "module", None), torch.nn.Module):
        raise TypeError(
            f"optimizer_step got a {type(model).__name__} around {type(model.module).__name__}: wrap "
            "the loss, not the model (DDP(build_loss(config, model))), so the wrapper's forward, "
            "which prepares its gradient sync, is the one that runs"
        )
    return build_loss(config, model)


def dataset_shard(worker: WorkerConfig, name: str, index: int, count: int):
    """This worker's share of dataset ``name``: the ``index``-th of ``count`` equal shards of a
    prepared split it reads itself ("eval": ``count`` 1, whole), else what Ray Train's
    DataConfig handed it (train/ingest.py; its split already follows sequence parallelism)."""
    prepared = worker.prepared.get(name)
    if prepared is not None:
        return prepared.shard(index, count)
    import ray.train

    return ray.train.get_dataset_shard(name)


def _batches(shard, batch_size: int, state: TrainState, device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of this worker's shard, epoch after epoch, starting where
    ``state`` says (the batches of the current epoch already consumed are skipped). The
    shard's order is the same on every run (a prepared split's rows in file order; Ray
    Data's, because build_trainer's DataConfig preserves it), so
    the skipped batches are exactly the ones trained on before the checkpoint."""
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
    ``eval.loss_blocks`` blocks are read once and kept, so streamed data is not re-read.

    Sharded (FSDP, ``world`` > 1): every rank reads the same blocks (the "eval" dataset is
    not split), scores every ``world``-th of them from its ``rank`` on, and the sums are
    added over the ranks; a rank with one block fewer runs one forward more on a block it
    does not count, since every forward gathers weights from every rank."""

    def __init__(self, worker: WorkerConfig, device, rank: int = 0, world: int = 1) -> None:
        self.worker = worker
        self.limit = worker.config.eval.loss_blocks
        self.device = device
        self.rank, self.world = rank, world
        self.blocks: list[dict[str, torch.Tensor]] | None = None

    def _load(self) -> list[dict[str, torch.Tensor]]:
        shard = dataset_shard(self.worker, "eval", 0, 1)
        blocks = []
        for batch in shard.iter_torch_batches(batch_size=1, device=self.device):
            blocks.append(batch)
            if len(blocks) >= self.limit:
                break
        return blocks

    def loss(self, loss_fn: LanguageModelLoss, autocast) -> dict[str, float]:
        """eval_loss and eval_ppl of the held-out blocks, by ``loss_fn`` (unwrapped: rank 0
        alone runs it; under FSDP the sharded root, on every rank), whose model is in eval
        mode meanwhile."""
        if self.limit == 0:
            return {}
        if self.blocks is None:
            self.blocks = self._load()
        if not self.blocks:  # the same on every rank: each read the same dataset
            return {}
        model = loss_fn.model
        model.eval()  # full attention, as LongLoRA evaluates
        total = StepLoss()
        rounds = math.ceil(len(self.blocks) / self.world)
        with torch.no_grad(), autocast:
            for i in range(self.rank, rounds * self.world, self.world):
                ids, positions, labels = block_inputs(self.blocks[i % len(self.blocks)])
                loss_sum = loss_fn(ids, positions, labels).item()
                if i < len(self.blocks):
                    total += StepLoss(loss_sum, target_count(labels))
        model.train()
        if self.world > 1:
            loss_sum, tokens = all_reduce_sum([total.loss_sum, total.tokens], self.device)
            total = StepLoss(loss_sum, int(tokens))
        return {"eval_loss": total.mean, "eval_ppl": math.exp(total.mean)}


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _metrics_logger(worker: WorkerConfig):
    """Rank 0's MLflow tracker, attached to the run the driver started (never ends it)."""
    from longtune.config import TrackingConfig
    from longtune.tracking import Tracker

    return Tracker.attach(worker.tracking or TrackingConfig(enabled=False), worker.run_id, node_id="rank0")


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key}={value:.4g}"
    return f"{key}={value}"
