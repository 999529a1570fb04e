"""The GPU path, proved on one CUDA GPU in a few minutes: longtune's attention, model,
adapter and training step, and the loop's collectives, in one process, without Ray or MLflow.

    python benchmarks/gpu_check.py                 # on a CUDA machine: the full check (<= 6 min on H100/H200)
    python benchmarks/gpu_check.py --cpu           # the same checks, reduced, on the CPU (the test suite runs it)

It needs only torch, transformers, PEFT, PyYAML and pydantic (longtune's config); not Ray,
MLflow or flash-attn (used when present). Run it from the repository root (it puts the
checkout on sys.path) where longtune is not installed. A GPU machine without pydantic can be
given it as wheels made here: ``bash benchmarks/gpu_wheels.sh`` (then
``pip install --no-index --find-links benchmarks/wheels pydantic`` there).

Checks, each a section of the printed table and of the JSON (``--out``):

1. attention: S2-Attn (split and roll) against the dense-mask reference, forward and
   backward, with GQA, right padding, packed documents and a sliding window, on every
   backend usable here (sdpa, torch varlen, flash-attn), in bf16 on CUDA (fp32 on --cpu).
2. attention_speed: one layer of a 7B model (32 heads, head_dim 128): forward+backward time
   and peak memory of S2-Attn and of full causal attention at 8k-64k tokens.
3. train_step: a LoRA+ step of a random ~1B Llama (16 layers, hidden 2048) at 32k tokens,
   bf16 weights, gradient checkpointing, S2-Attn and full attention, each with the chunked
   LM-head loss on and off (train.chunked_loss; on must peak lower), then S2 with
   model.activation_offload (must peak lower still): tokens/s and peak GiB; and whether the
   norms and embeddings move in a few AdamW steps at lr 2e-5 (in bf16 they would not:
   updates of ~1e-5 to weights of ~1 round away). Each row also carries ``longtune plan``'s
   prediction of that step's peak (``predicted_gib``, ``measured/predicted``; on --cpu, where
   no peak is measured, the prediction alone).
4. collectives: the loop's metric reduction, token count and LoRA²'s score broadcast through
   a real process group of world size 1 (NCCL on CUDA, gloo on --cpu), with the loop's own
   optimizer step inside it; then the same LoRA² steps with train.strategy=fsdp (FSDP2 over a
   mesh of one: bf16 gathers and fp32 reductions on CUDA, the allocator on DTensor shards),
   its sharded checkpoint written and resumed (the resumed steps must equal the
   uninterrupted ones), and again with train.fsdp.cpu_offload (shards in host memory); and
   sequence parallelism's training path with one rank (P = 1: the halo exchange needs a
   second GPU), whose losses must equal the plain step's.

Exit code 0 when every check passed, 1 otherwise (the table says which). Never changes the
GPU's settings.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import write_json  # noqa: E402


@dataclass
class Sizes:
    """What each section runs at: the full check on a GPU, a reduced one on the CPU."""

    device: str
    dtype: torch.dtype
    tolerance: float  # max |out - reference| / max |reference|, forward and gradients
    attn: dict = field(default_factory=dict)  # correctness case
    speed_lengths: tuple[int, ...] = ()
    speed_heads: int = 32
    speed_head_dim: int = 128
    model: dict = field(default_factory=dict)  # the LlamaConfig of the training step
    train_tokens: int = 0
    train_steps: int = 3
    weights: str = "auto"  # model.dtype of the training step: a bf16 base either way


GPU = Sizes(
    device="cuda", dtype=torch.bfloat16, tolerance=3e-2,
    attn=dict(batch=2, heads=8, kv_heads=2, seq=1024, head_dim=64, group=256, window=192),
    speed_lengths=(8192, 16384, 32768, 65536),
    model=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=8192),
    train_tokens=32768,
)
CPU = Sizes(
    device="cpu", dtype=torch.float32, tolerance=1e-4,
    attn=dict(batch=2, heads=4, kv_heads=2, seq=128, head_dim=16, group=32, window=24),
    speed_lengths=(1024, 2048), speed_heads=8, speed_head_dim=64,
    model=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    train_tokens=256, weights="bfloat16",
)


# ---------------------------------------------------------------- 1. attention


def attention_cases(s: Sizes) -> list[dict[str, Any]]:
    """The inputs' variants: GQA always; plus padding, packed documents, a window."""
    a = s.attn
    n = a["seq"]
    pad = torch.ones(a["batch"], n, dtype=torch.long)
    pad[1, n - n // 5:] = 0  # right padding in the second row
    docs = torch.cat([torch.arange(n // 3), torch.arange(n // 2), torch.arange(n - n // 3 - n // 2)])[None]
    return [
        {"case": "gqa"},
        {"case": "padding", "attention_mask": pad},
        {"case": "packed documents", "position_ids": docs},
        {"case": "sliding window", "sliding_window": a["window"]},
        {"case": "padding + documents", "attention_mask": pad, "position_ids": docs},
    ]


def check_attention(s: Sizes) -> list[dict[str, Any]]:
    from longtune.attention import reference_attention, s2_attention, s2_reference_mask
    from longtune.attention.backends import backend_report

    a = s.attn
    usable = [name for name, state in backend_report(s.device, s.dtype).items() if state == "usable"]
    g = torch.Generator(device="cpu").manual_seed(0)
    base = [torch.randn(a["batch"], h, a["seq"], a["head_dim"], generator=g)
            for h in (a["heads"], a["kv_heads"], a["kv_heads"])]
    rows = []
    for shift in ("split", "roll"):
        for case in attention_cases(s):
            kwargs = {k: v for k, v in case.items() if k != "case"}
            if shift == "roll" and "sliding_window" in kwargs:
                continue  # the paper's roll has no windowed variant worth checking twice
            mask = s2_reference_mask(a["batch"], a["heads"], a["seq"], a["group"], shift,
                                     kwargs.get("attention_mask"), kwargs.get("position_ids"),
                                     kwargs.get("sliding_window"))
            # the reference in fp64 on the CPU: the truth every backend is held to
            ref_in = [x.double().requires_grad_() for x in base]
            ref = reference_attention(*ref_in, mask)
            real = (kwargs["attention_mask"].bool() if "attention_mask" in kwargs
                    else torch.ones(a["batch"], a["seq"], dtype=torch.bool))
            weight = torch.randn(ref.shape, generator=g, dtype=torch.float64) * real[:, :, None, None]
            (ref * weight).sum().backward()
            for backend in usable:
                ins = [x.detach().to(s.device, s.dtype, copy=True).requires_grad_() for x in base]
                dev_kwargs = {k: (v.to(s.device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
                out, _ = s2_attention(*ins, group_size=a["group"], shift=shift, backend=backend, **dev_kwargs)
                (out.double() * weight.to(s.device)).sum().backward()
                errors = {"out": _rel_err(out[real.to(s.device)], ref[real])}
                for name, x, r in zip("qkv", ins, ref_in):
                    errors[f"d{name}"] = _rel_err(x.grad, r.grad)
                worst = max(errors.values())
                rows.append({"shift": shift, "case": case["case"], "backend": backend,
                             **{k: float(f"{v:.3g}") for k, v in errors.items()},
                             "ok": bool(worst <= s.tolerance and math.isfinite(worst))})
    return rows


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- 2. attention speed


def attention_speed(s: Sizes) -> list[dict[str, Any]]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from longtune.attention import s2_attention
    from longtune.attention.masks import clear_forward_cache

    module = torch.nn.Module()
    module.is_causal = True
    rows = []
    for n in s.speed_lengths:
        def inputs():
            g = torch.Generator(device=s.device).manual_seed(0)
            # [B, N, H, D] projections viewed as [B, H, N, D], the layout a model hands over
            qkv = torch.randn(3, 1, n, s.speed_heads, s.speed_head_dim, generator=g, dtype=s.dtype, device=s.device)
            return [x.transpose(1, 2).requires_grad_() for x in qkv.unbind(0)]

        methods = {
            "full": lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, is_causal=True)[0],
            "s2": lambda q, k, v: s2_attention(q, k, v, group_size=n // 4)[0],
        }
        row: dict[str, Any] = {"tokens": n}
        for name, fn in methods.items():
            def step():
                q, k, v = inputs()
                fn(q, k, v).sum().backward()
                clear_forward_cache()
            seconds, peak = _timed(step, s.device, reps=3 if n <= 32768 else 2)
            row[f"{name}_ms"] = round(seconds * 1000, 2)
            row[f"{name}_peak_mib"] = round(peak / 2**20, 1) if peak is not None else None
        row["speedup"] = round(row["full_ms"] / row["s2_ms"], 2)
        row["ok"] = True
        rows.append(row)
    return rows


def _timed(step: Callable[[], None], device: str, reps: int) -> tuple[float, int]:
    """Median seconds of ``step`` after a warm-up, and its peak memory (CUDA: allocated bytes
    above the start; CPU: not measured, None: benchmarks/attention.py measures it there)."""
    step()
    times = []
    peak = 0 if device == "cuda" else None
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start_mem = torch.cuda.memory_allocated()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - start_mem)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], peak


# ---------------------------------------------------------------- 3. a training step


def train_step(s: Sizes, workdir: Path) -> list[dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtune.attention import use_document_full_attention, use_s2_attention
    from longtune.config import load_config
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_loss, build_model, build_optimizer
    from longtune.train.loss import LanguageModelLoss

    path = workdir / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(**s.model, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)  # as a hub checkpoint ships
    n = s.train_tokens
    run = load_config(None, [
        f"model.name_or_path={path}", f"model.target_context={n}", f"model.dtype={s.weights}",
        "adapter.type=lora_plus", "train.lr=2e-5", "train.warmup_steps=0", "train.max_grad_norm=1.0",
        "train.batch_size_per_worker=1",
        *([f"train.loss_chunk_tokens={n // 4}"] if s.device == "cpu" else []),  # several chunks there too
    ])
    device = torch.device(s.device)
    model = build_model(run, str(path), device)
    params, optimizer, scheduler = build_optimizer(run, model)
    autocast = resolve_precision(run.model, run.train, device.type).autocast(device)
    g = torch.Generator().manual_seed(0)
    block = {"input_ids": torch.randint(0, s.model["vocab_size"], (1, n), generator=g).to(device),
             "position_ids": torch.arange(n)[None].to(device)}
    watched = _watched(model)
    before = {name: p.detach().clone() for name, p in watched.items()}
    losses = {"on": build_loss(run, model), "off": LanguageModelLoss(model, None)}  # train.chunked_loss
    rows = []
    model.train()
    for attention in ("s2", "full"):
        if attention == "s2":
            use_s2_attention(model, 0.25)
        else:
            use_document_full_attention(model)  # what attention.type=full trains with
        for chunked, loss_fn in losses.items():
            rows.append(_step_row(loss_fn, block, params, optimizer, scheduler, run, autocast, s,
                                  attention=attention, chunked_loss=chunked))
    for r in rows:
        _with_plan(r, run, s, **{"attention.type": r["attention"], "train.chunked_loss": r["chunked_loss"] == "on"})
    peaks = {(r["attention"], r["chunked_loss"]): r["peak_gib"] for r in rows}
    if s.device == "cuda":  # the logits of 32k tokens x 32k vocabulary alone are 4 GiB in fp32
        for r in rows:
            if r["chunked_loss"] == "on":
                r["ok"] = r["peak_gib"] < peaks[r["attention"], "off"]
    # every step above was an AdamW step at lr 2e-5: did the trained norms and embeddings move?
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in watched.items()}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    rows.append({"attention": "trainables", "dtypes": ",".join(dtypes),
                 **{f"moved_{k}": float(f"{v:.3g}") for k, v in moved.items()},
                 "ok": dtypes == ["float32"] and all(v > 0 for v in moved.values())})

    # model.activation_offload: the checkpointed layer inputs in (pinned) host memory
    del model, params, optimizer, scheduler, losses, watched, before
    if s.device == "cuda":
        torch.cuda.empty_cache()
    offload_run = run.model_copy(update={"model": run.model.model_copy(update={"activation_offload": True})})
    model = build_model(offload_run, str(path), device)
    params, optimizer, scheduler = build_optimizer(offload_run, model)
    use_s2_attention(model, 0.25)
    model.train()
    row = _step_row(build_loss(offload_run, model), block, params, optimizer, scheduler, offload_run, autocast, s,
                    attention="s2", chunked_loss="on")
    row["activation_offload"] = "on"
    _with_plan(row, offload_run, s, **{"attention.type": "s2", "train.chunked_loss": True})
    if s.device == "cuda":
        row["ok"] = row["peak_gib"] < peaks["s2", "on"]
    rows.append(row)
    return rows


def _with_plan(row: dict[str, Any], run, s: Sizes, **settings: Any) -> None:
    """Add ``longtune plan``'s prediction of the step's peak to a measured row: the rise above
    what stays resident between steps (weights, trained copies, AdamW's state), as
    ``peak_gib`` measures it (max_memory_allocated less the allocation at the step's start),
    and measured / predicted. The attention backend is the one that ran."""
    from longtune.attention.backends import backend_report
    from longtune.config import with_overrides
    from longtune.plan import plan_run

    backend = "flash" if backend_report(s.device, s.dtype)["flash"] == "usable" else "sdpa"
    config = with_overrides(run, {"scaling.num_workers": 1, "data.position_ids": "continuous",
                                  "attention.backend": backend, **settings})
    plan = plan_run(config, None, device=s.device)
    resident = sum(plan.breakdown.get(k, 0) for k in ("base_weights", "trainable_params", "optimizer_state"))
    row["predicted_gib"] = round((plan.peak_bytes - resident) / 2**30, 3)
    row["plan_phase"] = plan.peak_phase
    measured = row.get("peak_gib")
    row["measured/predicted"] = round(measured / row["predicted_gib"], 3) if measured and row["predicted_gib"] else None


def _step_row(loss_fn, block, params, optimizer, scheduler, run, autocast, s: Sizes, **what) -> dict[str, Any]:
    """tokens/s, step time and peak memory of the loop's optimizer step over ``block``."""
    from longtune.train.loop import optimizer_step

    losses = []

    def step():
        losses.append(optimizer_step(loss_fn, [block], params, optimizer, scheduler, run, autocast).mean)

    seconds, peak = _timed(step, s.device, reps=s.train_steps - 1)
    n = block["input_ids"].numel()
    return {**what, "tokens": n, "tokens_per_s": round(n / seconds), "step_s": round(seconds, 3),
            "peak_gib": round(peak / 2**30, 2) if peak is not None else None,
            "loss": float(f"{losses[-1]:.4g}"), "ok": all(map(math.isfinite, losses))}


def _watched(model) -> dict[str, torch.Tensor]:
    """One trained norm and the trained input embedding (PEFT's trainable copies)."""
    found = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or ".modules_to_save." not in name:
            continue
        if "embed_tokens" in name and "embedding" not in found:
            found["embedding"] = p
        elif "input_layernorm" in name and "norm" not in found:
            found["norm"] = p
    return found


# ---------------------------------------------------------------- 4. collectives


def collectives(s: Sizes, workdir: Path) -> list[dict[str, Any]]:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtune.adapters import training_hooks
    from longtune.config import load_config
    from longtune.distributed import all_reduce_sum, broadcast_, world_size
    from longtune.precision import resolve_precision
    from longtune.train.loop import (
        build_loss,
        build_model,
        build_optimizer,
        optimizer_step,
    )

    backend = "nccl" if s.device == "cuda" else "gloo"
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if s.device == "cuda" else "cpu")
    store = dist.HashStore()
    dist.init_process_group(backend, store=store, rank=0, world_size=1,
                            **({"device_id": device} if backend == "nccl" else {}))
    rows = []
    try:
        total = all_reduce_sum([1.5, 2.0], device)
        rows.append({"what": "all_reduce_sum", "backend": backend, "world": world_size(),
                     "ok": total == [1.5, 2.0]})
        scores = torch.arange(4.0, device=device)
        broadcast_(scores, device)
        rows.append({"what": "broadcast_", "backend": backend, "ok": scores.tolist() == [0.0, 1.0, 2.0, 3.0]})

        # the loop's step, LoRA² (its allocator broadcasts scores), inside the process group
        path = workdir / "tiny"
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**CPU.model)).save_pretrained(path)
        run = load_config(None, [
            f"model.name_or_path={path}", "model.target_context=64", "adapter.type=lora2",
            "adapter.rank=4", "adapter.pruning.target_rank=2", "train.max_steps=6",
            "train.warmup_steps=0", "train.batch_size_per_worker=1",
        ])
        model = build_model(run, str(path), device)
        # DDP wraps the loss module, whose forward runs the model (train/loss.py)
        ddp = torch.nn.parallel.DistributedDataParallel(build_loss(run, model),
                                                        device_ids=[device.index] if device.index is not None else None)
        params, optimizer, scheduler = build_optimizer(run, model)
        hooks = training_hooks(model, run.adapter, run.train.max_steps)
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(1, run.train.max_steps + 1):
            block = {"input_ids": torch.randint(0, CPU.model["vocab_size"], (1, 64), generator=g).to(device),
                     "position_ids": torch.arange(64)[None].to(device)}
            loss = optimizer_step(ddp, [block], params, optimizer, scheduler, run, resolve_precision(run.model, run.train, device.type).autocast(device),
                                  hooks, step)
            losses.append(loss.mean)
        kept = sum(hooks.allocator.rank_pattern().values())
        rows.append({"what": "optimizer_step + LoRA² allocator", "backend": backend,
                     "loss": float(f"{losses[-1]:.4g}"), "ranks_kept": kept,
                     "ok": all(map(math.isfinite, losses)) and kept == hooks.allocator.budget})
        del ddp, model, params, optimizer, scheduler, hooks
        rows += _fsdp_rows(s, run, path, device, backend, workdir)
        rows += _sequence_rows(s, run, path, device, backend)
    finally:
        dist.destroy_process_group()
    return rows


def _fsdp_rows(s: Sizes, run, path: Path, device, backend: str, workdir: Path) -> list[dict[str, Any]]:
    """The collectives section's LoRA² steps again under FSDP2 (a mesh of one), on the same
    blocks: losses near the unsharded model's from the same start (CUDA gathers the weights
    in bf16 where that one autocasts them), a checkpoint of step 3 resumed to equal steps
    4-6, and CPU offload."""
    from longtune.adapters import training_hooks
    from longtune.config import with_overrides
    from longtune.distributed import is_sharded, local_shard
    from longtune.precision import resolve_precision
    from longtune.train.checkpoint import TrainState, read_checkpoint, write_checkpoint
    from longtune.train.loop import build_optimizer, build_parallel, optimizer_step

    def start(config):
        torch.manual_seed(0)
        precision = resolve_precision(config.model, config.train, device.type)
        par = build_parallel(config, str(path), device, precision)
        params, optimizer, scheduler = build_optimizer(config, par.model)
        hooks = training_hooks(par.model, config.adapter, config.train.max_steps)
        par.model.train()
        return par, precision, params, optimizer, scheduler, hooks

    def steps(state, config, first: int, last: int, checkpoint_at: int | None = None) -> list[float]:
        par, precision, params, optimizer, scheduler, hooks = state
        g = torch.Generator().manual_seed(0)
        out = []
        for step in range(1, last + 1):
            block = {"input_ids": torch.randint(0, CPU.model["vocab_size"], (1, 64), generator=g).to(device),
                     "position_ids": torch.arange(64)[None].to(device)}  # the DDP row's blocks
            if step < first:
                continue
            out.append(optimizer_step(par.wrapped, [block], params, optimizer, scheduler, config,
                                      precision.autocast(device), hooks, step, par.grad_scaler(precision)).mean)
            if step == checkpoint_at:
                write_checkpoint(workdir / "fsdp-ckpt", par.model, optimizer, scheduler, TrainState(step=step),
                                 config.to_yaml(), hooks, parallel=par)
        return out

    near = 2e-2 if s.device == "cuda" else s.tolerance  # bf16 gathers vs autocast on CUDA
    ddp_losses = steps(start(run), run, 1, 6)  # one rank: the model unwrapped, the same seed
    fsdp = with_overrides(run, {"train.strategy": "fsdp"})
    state = start(fsdp)
    sharded = all(is_sharded(p) for p in state[2])
    losses = steps(state, fsdp, 1, 6, checkpoint_at=3)
    kept = sum(state[-1].allocator.rank_pattern().values())
    gap = max(abs(a - b) / abs(b) for a, b in zip(losses, ddp_losses))
    rows = [{"what": "fsdp optimizer_step + LoRA² allocator", "backend": backend, "loss": float(f"{losses[-1]:.4g}"),
             "vs_ddp": float(f"{gap:.2g}"), "ranks_kept": kept,
             "ok": sharded and all(map(math.isfinite, losses)) and kept == state[-1].allocator.budget and gap < near}]
    del state
    resumed = start(fsdp)
    at = read_checkpoint(workdir / "fsdp-ckpt", resumed[0].model, resumed[3], resumed[4], resumed[5],
                         resumed[0].grad_scaler(resumed[1]), parallel=resumed[0]).step
    again = steps(resumed, fsdp, 4, 6)
    gap = max(abs(a - b) / abs(b) for a, b in zip(again, losses[3:]))
    rows.append({"what": "fsdp sharded checkpoint resumed", "backend": backend, "resumed_at": at,
                 "vs_uninterrupted": float(f"{gap:.2g}"), "ok": at == 3 and gap < s.tolerance})
    del resumed
    offload = with_overrides(fsdp, {"train.fsdp.cpu_offload": True})
    state = start(offload)
    on_host = all(local_shard(p).device.type == "cpu" for p in state[2])
    off = steps(state, offload, 1, 6)
    gap = max(abs(a - b) / abs(b) for a, b in zip(off, losses))
    rows.append({"what": "fsdp cpu_offload", "backend": backend, "loss": float(f"{off[-1]:.4g}"),
                 "vs_fsdp": float(f"{gap:.2g}"), "shards_on_host": on_host,
                 "ok": on_host and all(map(math.isfinite, off)) and gap < near})
    return rows


def _sequence_rows(s: Sizes, run, path: Path, device, backend: str) -> list[dict[str, Any]]:
    """Sequence parallelism's code path with one rank per sequence (scaling.sequence_parallel
    reduces to P = 1 on one GPU): optimizer_step with a sequence group, the attention routed
    through sequence_parallel_s2_attention inside sharded_sequence, forward and recomputing
    backward; the losses of 3 plain-LoRA steps equal those without it from the same start."""
    from longtune.config import with_overrides
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_loss, build_model, build_optimizer, optimizer_step
    from longtune.train.sequence import SequenceGroup

    lora = with_overrides(run, {"adapter.type": "lora", "train.max_steps": 3})
    precision = resolve_precision(lora.model, lora.train, device.type)

    def losses(sequence) -> list[float]:
        torch.manual_seed(0)
        model = build_model(lora, str(path), device, precision)
        loss_fn = build_loss(lora, model)
        params, optimizer, scheduler = build_optimizer(lora, model)
        model.train()
        g = torch.Generator().manual_seed(0)
        out = []
        for step in range(1, 4):
            block = {"input_ids": torch.randint(0, CPU.model["vocab_size"], (1, 64), generator=g).to(device),
                     "position_ids": torch.arange(64)[None].to(device)}
            out.append(optimizer_step(loss_fn, [block], params, optimizer, scheduler, lora,
                                      precision.autocast(device), None, step, sequence=sequence).mean)
        return out

    plain = losses(None)
    sharded = losses(SequenceGroup(1, 0, (0,), None, device))
    gap = max(abs(a - b) / abs(b) for a, b in zip(sharded, plain))
    return [{"what": "sequence-parallel step, P = 1", "backend": backend, "loss": float(f"{sharded[-1]:.4g}"),
             "vs_plain": float(f"{gap:.2g}"), "ok": all(map(math.isfinite, sharded)) and gap <= s.tolerance}]


# ---------------------------------------------------------------- the run


SECTIONS = {
    "attention": lambda s, w: check_attention(s),
    "attention_speed": lambda s, w: attention_speed(s),
    "train_step": train_step,
    "collectives": collectives,
}


def environment(s: Sizes) -> dict[str, Any]:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "device": s.device}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        env["peft"] = "missing"
    if s.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    with contextlib.suppress(Exception):
        from longtune.attention.backends import backend_report

        env["backends"] = backend_report(s.device, s.dtype)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the reduced check on the CPU")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the reduced check", file=sys.stderr)
        return 2
    s = CPU if args.cpu else GPU
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result: dict[str, Any] = {"environment": environment(s), "sections": {}}
    print(_line("environment", result["environment"]), flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="longtune-gpu-check-") as tmp:
        for name in args.sections:
            t0 = time.perf_counter()
            try:
                rows = SECTIONS[name](s, Path(tmp))
                error = None
            except Exception as exc:  # one broken section must not hide the others' results
                rows, error = [], f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            ok = error is None and bool(rows) and all(r["ok"] for r in rows)
            result["sections"][name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 1),
                                        "rows": rows, "error": error}
            _print_section(name, result["sections"][name])
            if s.device == "cuda":
                torch.cuda.empty_cache()
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["ok"] = all(sec["ok"] for sec in result["sections"].values())
    write_json(args.out, result)
    print(f"gpu_check: {'all checks passed' if result['ok'] else 'FAILED'} in {result['seconds']} s; "
          f"results in {args.out}")
    return 0 if result["ok"] else 1


def _print_section(name: str, section: dict[str, Any]) -> None:
    print(f"\n== {name}: {'ok' if section['ok'] else 'FAILED'} ({section['seconds']} s)")
    if section["error"]:
        print(f"   error: {section['error']}")
    rows = section["rows"]
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    widths = {k: max(len(k), *(len(str(r.get(k, ""))) for r in rows)) for k in keys}
    print("   " + "  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("   " + "  ".join(str(r.get(k, "")).ljust(widths[k]) for k in keys))
    print(flush=True)


def _line(title: str, values: dict[str, Any]) -> str:
    return f"{title}: " + ", ".join(f"{k}={v}" for k, v in values.items())


if __name__ == "__main__":
    sys.exit(main())
