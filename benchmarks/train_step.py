"""Training-step speed and memory: S2-Attn vs full attention, and Ray Train's overhead.

    python benchmarks/train_step.py                     # contexts 4096, 8192, 16384
    python benchmarks/train_step.py --contexts 4096 --parts speed
    python benchmarks/train_step.py --parts fsdp        # DDP vs FSDP2, 2 gloo ranks (~3 min)
    python benchmarks/train_step.py --contexts 16384 --parts packed   # packed documents: S2 vs full

Part 1 — a seed-shaped Llama (hidden 256, 6 layers, 8 heads, vocab 8192, gradient
checkpointing on) with LoRA+ as `longtune finetune` trains it (position interpolation from
256 tokens, bf16 autocast where the CPU has it), one block of batch 1 per optimizer step,
with the chunked LM-head loss (train.chunked_loss, --chunk-tokens) off and on. S2-Attn and
full attention, chunked loss off and on, alternate on the same model in one process, so
machine noise slows all alike; tokens/s is the median over --reps steps (also per CPU
second of this process's threads, which other processes on its cores disturb less), and
the chunked loss's speed the median of its per-rep ratios. Peak memory is the rise of the peak resident
set during one step after a warm-up, in a fresh process per measurement (median of
--peak-reps).

Part 2 — Ray Train's overhead: the same optimizer steps (longtune.train.loop's own
functions, context --ray-context) timed in a plain loop in this process and inside a
TorchTrainer with one worker holding the same number of threads. Prints a table, writes JSON.

Part 3 (--parts fsdp, issue #16) — train.strategy=ddp against fsdp (reshard_after_forward
true, and false) on 2 gloo ranks of this machine (torch.multiprocessing, 127.0.0.1, no Ray,
the threads split between them), for a model whose weights dominate a rank's memory (a
Llama of hidden 1024, 6 layers, an untied 32k vocabulary: 544 MiB of fp32 weights; LoRA+,
gradient checkpointing, --fsdp-context tokens a block). Each rank builds the three cases
side by side with the loop's own functions (build_parallel, build_optimizer,
optimizer_step) and steps them in turn on the same blocks, so machine noise slows all
alike. Per rank: the tensors held between steps (this rank's part of the frozen base, the
trained parameters and AdamW's moments), the resident set the case added (built, one
warm-up step), the peak resident set's rise during one later step and their sum, the
step's wall-clock and CPU seconds (medians over --fsdp-reps; ratios to DDP the medians of
per-rep ratios), and the loss's largest relative difference from DDP's on the same steps.
Writes --fsdp-out. On CPUs the gathers run over gloo on loopback, unoverlapped: its step
times say what sharding costs here, not on GPUs with NCCL.

Part 4 (--parts packed) — a step on a packed block (documents of 300-3,000 tokens, as
`longtune prepare` packs short documents) against the same tokens as one document, S2-Attn
and full attention, chunked loss on: the four cases interleaved in one process, the cost the
median of per-rep packed/one ratios (issue #22's target: at most 1.1x); then the packed
step's peak, a fresh process per measurement. On the CPU's lean path each document of a
group runs the fused causal kernel on its own span (no mask). Writes --packed-out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import median, peak_rise_bytes, run_isolated, write_json  # noqa: E402
from longtune.config import Config, load_config  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=8192, max_position_embeddings=256)


def save_model(directory: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(directory)
    return str(directory)


def cpu_autocast(config: Config):
    """The autocast the training loop runs under on a CPU worker."""
    from longtune.precision import resolve_precision

    return resolve_precision(config.model, config.train, "cpu").autocast("cpu")


def config_for(model_dir: str, context: int, attention: str, *extra: str) -> Config:
    return load_config(None, [f"model.name_or_path={model_dir}", f"model.target_context={context}",
                              f"attention.type={attention}", "train.batch_size_per_worker=1",
                              "train.warmup_steps=0", *extra])


LOSSES = ("off", "on")  # train.chunked_loss


class Stepper:
    """One model, switchable between S2-Attn and full attention and between the stock loss
    (all logits at once) and the chunked one, stepping on a random block."""

    def __init__(self, model_dir: str, context: int, chunk_tokens: int, packed: bool = False):
        from longtune.attention import use_document_full_attention, use_s2_attention
        from longtune.train.loop import build_loss, build_model, build_optimizer
        from longtune.train.loss import LanguageModelLoss

        self.config = config_for(model_dir, context, "s2", f"train.loss_chunk_tokens={chunk_tokens}")
        self.model = build_model(self.config, model_dir, torch.device("cpu"))
        self.params, self.optimizer, self.scheduler = build_optimizer(self.config, self.model)
        self.autocast = cpu_autocast(self.config)
        self.losses = {"on": build_loss(self.config, self.model), "off": LanguageModelLoss(self.model, None)}
        assert self.losses["on"].chunked and not self.losses["off"].chunked
        self.switch = {"s2": lambda: use_s2_attention(self.model, 0.25),
                       "full": lambda: use_document_full_attention(self.model)}  # as the loop trains it
        gen = torch.Generator().manual_seed(0)
        vocab = self.model.get_base_model().config.vocab_size
        ids = torch.randint(0, vocab, (1, context), generator=gen)
        # the same tokens as one document (continuous positions) and as packed documents
        self.blocks = {False: {"input_ids": ids, "position_ids": torch.arange(context)[None]},
                       True: {"input_ids": ids, "position_ids": packed_positions(context)[None]}}
        self.packed = packed
        self.model.train()

    def step(self, method: str, loss: str, packed: bool | None = None) -> tuple[float, float]:
        """Wall-clock and CPU seconds (this process's threads) of one optimizer step, on the
        packed block or the one-document block (default: as built)."""
        from longtune.train.loop import optimizer_step

        block = self.blocks[self.packed if packed is None else packed]
        self.switch[method]()
        start, cpu = time.perf_counter(), time.process_time()
        optimizer_step(self.losses[loss], [block], self.params, self.optimizer, self.scheduler,
                       self.config, self.autocast)
        return time.perf_counter() - start, time.process_time() - cpu


CASES = [(m, loss) for m in ("full", "s2") for loss in LOSSES]


def speed_rows(model_dir: str, args) -> list[dict]:
    rows = []
    for context in args.contexts:
        stepper = Stepper(model_dir, context, args.chunk_tokens)
        times = {case: [] for case in CASES}
        for case in CASES:
            stepper.step(*case)  # warm-up
        for _ in range(args.reps):  # interleaved: machine noise slows every case alike
            for case in CASES:
                times[case].append(stepper.step(*case))
            print("  step s (CPU s): " + "  ".join(
                f"{m} {loss} {times[m, loss][-1][0]:.1f} ({times[m, loss][-1][1]:.1f})" for m, loss in CASES), flush=True)
        del stepper
        peaks = {case: [] for case in CASES}
        for _ in range(args.peak_reps):
            for case in CASES:
                argv = [__file__, "--_peak", *case, str(context), model_dir, str(args.chunk_tokens)]
                peaks[case].append(int(run_isolated(argv)))
        row = {"context": context, "chunk_tokens": args.chunk_tokens}
        for m, loss in CASES:
            row[f"{m}_{loss}_tokens_per_s"] = context / median(w for w, _ in times[m, loss])
            row[f"{m}_{loss}_tokens_per_cpu_s"] = context / median(c for _, c in times[m, loss])
            row[f"{m}_{loss}_peak_mib"] = median(peaks[m, loss]) / 2**20
        for m in ("full", "s2"):
            # each rep's on and off steps ran back to back: the median of their ratios is what
            # survives a machine whose load changes over minutes; CPU seconds (the process's
            # threads) are what survives other processes sharing its cores
            pairs = list(zip(times[m, "off"], times[m, "on"]))
            row[f"{m}_chunked_speed"] = median(off[0] / on[0] for off, on in pairs)
            row[f"{m}_chunked_cpu_speed"] = median(off[1] / on[1] for off, on in pairs)
            row[f"{m}_chunked_peak"] = row[f"{m}_on_peak_mib"] / row[f"{m}_off_peak_mib"]
        row["speedup"] = row["s2_on_tokens_per_s"] / row["full_on_tokens_per_s"]
        rows.append(row)
        print(f"{context:7d} " + " ".join(f"{row[f'{m}_{loss}_tokens_per_s']:8.0f}" for m, loss in CASES)
              + " " + " ".join(f"{row[f'{m}_{loss}_peak_mib']:8.0f}" for m, loss in CASES)
              + f" {row['full_chunked_peak']:6.2f} {row['s2_chunked_peak']:6.2f}"
              + f" {row['full_chunked_speed']:6.3f} {row['s2_chunked_speed']:6.3f}"
              + f" {row['full_chunked_cpu_speed']:6.3f} {row['s2_chunked_cpu_speed']:6.3f}", flush=True)
    return rows


def speed_header() -> str:
    cases = " ".join(f"{m + ' ' + loss:>8}" for m, loss in CASES)
    return (f"{'':7} {'tokens/s (chunked loss off/on)':^35} {'peak MiB (chunked loss off/on)':^35} "
            f"{'peak on/off':^13} {'tok/s on/off':^13} {'CPU-s off/on':^13}\n"
            f"{'context'} {cases} {cases} {'full':>6} {'s2':>6} {'full':>6} {'s2':>6} {'full':>6} {'s2':>6}")


def packed_positions(context: int) -> torch.Tensor:
    """[context] position ids of a packed block: documents of 300-3,000 tokens (seeded), as
    `longtune prepare` packs a corpus of short documents."""
    gen = torch.Generator().manual_seed(3)
    runs, total = [], 0
    while total < context:
        n = min(int(torch.randint(300, 3000, (1,), generator=gen)), context - total)
        runs.append(torch.arange(n))
        total += n
    return torch.cat(runs)


PACKED_CASES = [(m, packed) for m in ("full", "s2") for packed in (False, True)]


def packed_rows(model_dir: str, args) -> list[dict]:
    """A step on a packed block (documents of 300-3,000 tokens) against the same tokens as one
    document, S2 vs full attention, the chunked loss on: the four cases interleaved in one
    process (--reps, after a warm-up each), the cost the median of per-rep packed/one ratios;
    then the packed step's peak, a fresh process per measurement."""
    rows = []
    print(f"{'':8} {'':9} {'step s (one doc / packed)':^27} {'packed / one':^15} {'peak MiB (packed)':^27}")
    print(f"{'context':>8} {'documents':>9} {'full':>13} {'S2':>13} {'full':>7} {'S2':>7} "
          f"{'full':>9} {'S2':>8} {'S2 / full':>9}")
    for context in args.contexts:
        stepper = Stepper(model_dir, context, args.chunk_tokens)
        times = {case: [] for case in PACKED_CASES}
        for m, packed in PACKED_CASES:
            stepper.step(m, "on", packed)  # warm-up
        for _ in range(args.reps):  # interleaved: machine noise slows every case alike
            for m, packed in PACKED_CASES:
                times[m, packed].append(stepper.step(m, "on", packed)[0])
            print("  step s: " + "  ".join(f"{m} {'packed' if packed else 'one'} {times[m, packed][-1]:.2f}"
                                         for m, packed in PACKED_CASES), flush=True)
        del stepper
        peaks = {}
        for method in ("full", "s2"):
            argv = [__file__, "--_packed", method, str(context), model_dir, str(args.chunk_tokens)]
            peaks[method] = int(run_isolated(argv)) / 2**20
        docs = int((packed_positions(context) == 0).sum())
        row = {"context": context, "documents": docs, "full_peak_mib": peaks["full"], "s2_peak_mib": peaks["s2"],
               "s2_vs_full": peaks["s2"] / peaks["full"]}
        for m in ("full", "s2"):
            row[f"{m}_one_step_s"] = median(times[m, False])
            row[f"{m}_packed_step_s"] = median(times[m, True])
            row[f"{m}_packed_cost"] = median(p / o for o, p in zip(times[m, False], times[m, True]))
        rows.append(row)
        print(f"{context:8d} {docs:9d} {row['full_one_step_s']:6.2f}/{row['full_packed_step_s']:<6.2f} "
              f"{row['s2_one_step_s']:6.2f}/{row['s2_packed_step_s']:<6.2f} {row['full_packed_cost']:6.2f}x "
              f"{row['s2_packed_cost']:6.2f}x {peaks['full']:9.0f} {peaks['s2']:8.0f} {row['s2_vs_full']:9.2f}",
              flush=True)
    return rows


def measure_peak(method: str, loss: str, context: int, model_dir: str, chunk_tokens: int,
                 packed: bool = False) -> int:
    stepper = Stepper(model_dir, context, chunk_tokens, packed)
    stepper.step(method, loss)  # warm-up
    return peak_rise_bytes(lambda: stepper.step(method, loss))


# -------------------------------------------------------------------- where the peak is


PHASES = [  # in the order a step runs them; a layer's phases are maxima over the layers
    ("forward", "layers' forward (checkpointed: inputs kept)"),
    ("head", "LM head + loss (fwd; chunked: each chunk recomputed + bwd)"),
    ("recompute", "layer recompute: norm, q/k/v, RoPE"),
    ("attn_fwd", "attention kernel forward (recompute)"),
    ("mlp", "o_proj + MLP recompute and backward"),
    ("attn_bwd", "attention kernel backward"),
    ("qkv_bwd", "q/k/v, RoPE, norm backward"),
    ("optimizer", "optimizer step"),
]


class PhaseMeter:
    """Peak resident set of each phase of one step: at every phase boundary the peak since
    the last one is read and reset (VmHWM), as ``peak_rise_bytes`` does for a whole step.
    ``peak``: above the step's start (the step's peak is the largest); ``rise``: above the
    phase's own start (what the phase itself allocates on top of what it inherits)."""

    def __init__(self):
        self.base = None

    def mark(self, phase: str) -> None:
        from benchmarks._common import rss_kib

        if self.base is None:
            return
        hwm = rss_kib("VmHWM") * 1024
        peak, rise = self.peaks.setdefault(self.phase, [0, 0])
        self.peaks[self.phase] = [max(peak, hwm - self.base), max(rise, hwm - self.start)]
        Path("/proc/self/clear_refs").write_text("5")
        self.phase, self.start = phase, rss_kib("VmRSS") * 1024

    def measure(self, step) -> dict:
        from benchmarks._common import rss_kib

        self.peaks, self.phase = {}, "forward"
        self.base = self.start = rss_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")
        step()
        self.mark("end")
        self.base = None
        return {name: self.peaks.get(name, [0, 0]) for name, _ in PHASES}


def measure_phases(method: str, loss: str, context: int, model_dir: str, chunk_tokens: int) -> dict:
    """One step's per-phase peaks (bytes), after a warm-up: marks from module hooks (forward
    and recompute), gradient hooks on the attention function's output and query (its
    backward), the LM head's hook and the optimizer's step hook. Both attentions go through
    the same wrapper of transformers' attention function table, so their phases cut alike."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from longtune.attention.interface import ATTN_IMPLEMENTATION

    stepper = Stepper(model_dir, context, chunk_tokens)
    stepper.step(method, loss)  # warm-up (registers S2's attention function too)
    meter = PhaseMeter()

    def backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def wrap(attend):
        def attention(module, query, *args, **kwargs):
            if backward():
                meter.mark("attn_fwd")
            out = attend(module, query, *args, **kwargs)
            if backward():
                meter.mark("mlp")
            if out[0].requires_grad:  # checkpointing backpropagates through the first forward's graph
                out[0].register_hook(lambda _: meter.mark("attn_bwd"))
                query.register_hook(lambda _: meter.mark("qkv_bwd"))
            return out

        return attention

    for key in ("sdpa", ATTN_IMPLEMENTATION):
        ALL_ATTENTION_FUNCTIONS[key] = wrap(ALL_ATTENTION_FUNCTIONS[key])
    causal_lm = stepper.model.get_base_model()
    for layer in causal_lm.model.layers:
        layer.self_attn.register_forward_pre_hook(lambda *_: meter.mark("recompute") if backward() else None)
    causal_lm.lm_head.register_forward_pre_hook(lambda *_: meter.mark("head"))
    stepper.optimizer.register_step_pre_hook(lambda *_: meter.mark("optimizer"))
    return meter.measure(lambda: stepper.step(method, loss))


def phase_rows(model_dir: str, args) -> list[dict]:
    """Per-phase peaks of every case, each in a fresh process (as the step peaks are)."""
    import json

    rows = []
    for context in args.contexts:
        row = {"context": context, "chunk_tokens": args.chunk_tokens, "phases": {}}
        for m, loss in CASES:
            argv = [__file__, "--_phases", m, loss, str(context), model_dir, str(args.chunk_tokens)]
            row["phases"][f"{m}_{loss}"] = json.loads(run_isolated(argv))
        rows.append(row)
        print(phase_table(row), flush=True)
    return rows


def phase_table(row: dict) -> str:
    mib = 2**20
    names = [f"{m}_{loss}" for m, loss in CASES]
    lines = [f"{row['context']} tokens: peak MiB above the step's start (rise within the phase); * the step's peak",
             f"{'phase':58} " + " ".join(f"{n.replace('_', ' loss '):>18}" for n in names)]
    tops = {n: max(p for p, _ in row["phases"][n].values()) for n in names}
    for name, title in PHASES:
        cells = []
        for n in names:
            peak, rise = row["phases"][n][name]
            cells.append(f"{peak / mib:7.1f} ({rise / mib:6.1f}){'*' if peak == tops[n] else ' '}")
        lines.append(f"{title:58} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


# -------------------------------------------------------------------- Ray Train overhead


def _ray_loop(loop_config: dict) -> None:
    """The timed steps inside a Ray Train worker (the loop's functions, the worker's env)."""
    import ray.train
    import ray.train.torch

    torch.set_num_threads(loop_config["threads"])
    from longtune.train.loop import (
        build_loss,
        build_model,
        build_optimizer,
        optimizer_step,
    )

    config = Config.model_validate(loop_config["config"])
    model = build_model(config, loop_config["model_dir"], torch.device("cpu"))
    wrapped = ray.train.torch.prepare_model(build_loss(config, model), move_to_device=False)
    params, optimizer, scheduler = build_optimizer(config, model)
    autocast = cpu_autocast(config)
    shard = ray.train.get_dataset_shard("train")
    times = []
    batches = iter(shard.iter_torch_batches(batch_size=1))
    model.train()
    for i in range(loop_config["steps"]):
        start = time.perf_counter()
        optimizer_step(wrapped, [next(batches)], params, optimizer, scheduler, config, autocast)
        times.append(time.perf_counter() - start)
    # Train V2 keeps only the metrics reported with a checkpoint in the Result
    with tempfile.TemporaryDirectory() as directory:
        ray.train.report({"step_times": times}, checkpoint=ray.train.Checkpoint.from_directory(directory))


def plain_loop(config: Config, model_dir: str, blocks: list[dict], threads: int) -> list[float]:
    from longtune.train.loop import build_model, build_optimizer, optimizer_step

    torch.set_num_threads(threads)
    model = build_model(config, model_dir, torch.device("cpu"))
    params, optimizer, scheduler = build_optimizer(config, model)
    autocast = cpu_autocast(config)
    batches = iter({k: torch.tensor(v)[None] for k, v in b.items()} for b in blocks)
    model.train()
    times = []
    for _ in range(len(blocks)):
        start = time.perf_counter()
        optimizer_step(model, [next(batches)], params, optimizer, scheduler, config, autocast)
        times.append(time.perf_counter() - start)
    return times


def ray_overhead(model_dir: str, args) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    context, steps, warm = args.ray_context, args.ray_steps, 2
    config = config_for(model_dir, context, "s2")
    gen = torch.Generator().manual_seed(1)
    blocks = [{"input_ids": torch.randint(0, SHAPE["vocab_size"], (context,), generator=gen).tolist(),
               "position_ids": list(range(context))} for _ in range(steps)]
    threads = torch.get_num_threads()
    plain = plain_loop(config, model_dir, blocks, threads)[warm:]

    ray.init(num_cpus=threads + 1, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _ray_loop,
            train_loop_config={"config": config.to_dict(), "model_dir": model_dir, "steps": steps,
                               "threads": threads},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="overhead", storage_path=storage),
            datasets={"train": ray.data.from_items(blocks)},
        )
        in_ray = trainer.fit().metrics["step_times"][warm:]
    ray.shutdown()
    row = {"context": context, "steps": len(plain), "threads": threads,
           "plain_step_s": median(plain), "ray_step_s": median(in_ray)}
    row["overhead_pct"] = 100 * (row["ray_step_s"] / row["plain_step_s"] - 1)
    print(f"Ray Train overhead at {context} tokens, {threads} threads: plain {row['plain_step_s']:.3f} s/step, "
          f"TorchTrainer {row['ray_step_s']:.3f} s/step -> {row['overhead_pct']:+.1f}%")
    return row


# -------------------------------------------------------------------- DDP vs FSDP2 (#16)

# weights dominate a rank's memory: 143M parameters (544 MiB in fp32), 46% of them the
# untied embedding and head of a 32k vocabulary, against a 512-token block's activations
FSDP_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6, "num_attention_heads": 16,
              "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 512,
              "tie_word_embeddings": False}
# (name, train.strategy, train.fsdp.reshard_after_forward); fsdp_keep: layers gathered to the backward
FSDP_CASES = [("ddp", "ddp", True), ("fsdp", "fsdp", True), ("fsdp_keep", "fsdp", False)]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (this rank's shards of DTensors)."""
    from longtune.distributed import local_shard

    seen = {}
    for t in tensors:
        storage = local_shard(t).untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def tensor_bytes(model, optimizer) -> dict:
    """What a rank holds between steps, as tensor bytes: the frozen base (whole, and this
    rank's part), the trained parameters and AdamW's moments (this rank's part)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    moments = [v for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor) and v.numel() > 1]
    return {"base_whole_bytes": sum(p.numel() * p.element_size() for p in frozen),
            "base_rank_bytes": _storage_bytes(frozen),
            "trained_rank_bytes": _storage_bytes(trained),
            "adamw_rank_bytes": _storage_bytes(moments)}


def _fsdp_rank(rank: int, world: int, port: int, model_dir: str, primer_dir: str, vocab: int, context: int,
               reps: int, threads: int, out: str) -> None:
    """One of the gloo ranks: every case's model built side by side, then their optimizer
    steps alternated rep by rep on the same blocks, each step's time and peak rise taken.
    Every case is first built and stepped once on a tiny model (``primer_dir``), so the
    memory a process spends once (imports, caches, gloo's buffers) is no case's."""
    import gc
    import json
    import os

    import torch.distributed as dist

    from benchmarks._common import rss_kib
    from longtune.config import with_overrides
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_optimizer, build_parallel, optimizer_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own blocks, every case the same
    blocks = [{"input_ids": torch.randint(0, vocab, (1, context), generator=gen),
               "position_ids": torch.arange(context)[None]} for _ in range(reps + 1)]

    def build(name: str, path: str, ctx: int):
        """Case ``name``'s model at ``path`` and one optimizer step of it on a block."""
        strategy, reshard = next((s, r) for n, s, r in FSDP_CASES if n == name)
        config = with_overrides(config_for(path, ctx, "s2", "train.precision=fp32"),
                                {"train.strategy": strategy, "train.fsdp.reshard_after_forward": reshard})
        precision = resolve_precision(config.model, config.train, "cpu")
        torch.manual_seed(0)  # the same adapter initialisation (rank 0's) in every case
        par = build_parallel(config, path, device, precision)
        params, optimizer, scheduler = build_optimizer(config, par.model)
        par.model.train()
        autocast = precision.autocast(device)

        def step(block, into: list | None = None) -> None:
            """One optimizer step on ``block``; its wall-clock and CPU seconds and loss into ``into``."""
            start, cpu = time.perf_counter(), time.process_time()
            loss = optimizer_step(par.wrapped, [block], params, optimizer, scheduler, config, autocast)
            if into is not None:
                into.append((time.perf_counter() - start, time.process_time() - cpu, loss))

        return par, optimizer, step

    primer = {"input_ids": torch.randint(0, 64, (1, 64), generator=gen), "position_ids": torch.arange(64)[None]}
    for name, _, _ in FSDP_CASES:
        build(name, primer_dir, 64)[2](primer)
    runs, result = {}, {"rank": rank, "cases": {}}
    for name, _, _ in FSDP_CASES:
        gc.collect()
        before = rss_kib("VmRSS")
        par, optimizer, runs[name] = build(name, model_dir, context)
        runs[name](blocks[0])  # warm-up: AdamW's moments exist from here on, as in every later step
        gc.collect()
        held = (rss_kib("VmRSS") - before) * 1024
        result["cases"][name] = {"held_rss_bytes": held, **tensor_bytes(par.model, optimizer),
                                 "wall_s": [], "cpu_s": [], "rise_bytes": [], "loss": []}
        del par, optimizer
    for block in blocks[1:]:  # interleaved: machine noise slows every case alike
        for name, _, _ in FSDP_CASES:
            dist.barrier()  # every rank starts the step together: the wait is not the step's
            into = []
            rise = peak_rise_bytes(partial(runs[name], block, into))
            ((wall, cpu, loss),) = into
            case = result["cases"][name]
            case["wall_s"].append(wall)
            case["cpu_s"].append(cpu)
            case["rise_bytes"].append(rise)
            case["loss"].append(loss.mean)
        if rank == 0:
            print("  step s (CPU s): " + "  ".join(
                f"{n} {result['cases'][n]['wall_s'][-1]:.1f} ({result['cases'][n]['cpu_s'][-1]:.1f})"
                for n, _, _ in FSDP_CASES), flush=True)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def fsdp_rows(args, shape: dict) -> dict:
    """DDP against FSDP2 (reshard after forward, and not) on 2 gloo ranks of this machine."""
    import json
    import os
    import socket

    import torch.multiprocessing as mp
    from transformers import LlamaConfig, LlamaForCausalLM

    world = 2
    threads = max(1, torch.get_num_threads() // world)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).save_pretrained(Path(tmp) / "model")
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, vocab_size=64, max_position_embeddings=64,
                                     tie_word_embeddings=False)).save_pretrained(Path(tmp) / "primer")
        # the ranks' allocators return every large freed block (see run_isolated): the
        # resident set follows what is allocated
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        mp.spawn(_fsdp_rank, args=(world, port, str(Path(tmp) / "model"), str(Path(tmp) / "primer"),
                                   shape["vocab_size"], args.fsdp_context, args.fsdp_reps, threads, tmp),
                 nprocs=world, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for r in ranks:
        ddp = r["cases"]["ddp"]
        for name, strategy, reshard in FSDP_CASES:
            c = r["cases"][name]
            row = {"rank": r["rank"], "case": name, "strategy": strategy, "reshard_after_forward": reshard,
                   **{k: c[k] for k in ("base_whole_bytes", "base_rank_bytes", "trained_rank_bytes",
                                        "adamw_rank_bytes", "held_rss_bytes")},
                   "rise_bytes": median(c["rise_bytes"]), "step_s": median(c["wall_s"]),
                   "cpu_s": median(c["cpu_s"]), "wall_s_reps": c["wall_s"], "cpu_s_reps": c["cpu_s"],
                   "rise_bytes_reps": c["rise_bytes"], "loss_reps": c["loss"]}
            row["peak_bytes"] = row["held_rss_bytes"] + row["rise_bytes"]
            # each rep's steps ran back to back: the median of their ratios survives slow drifts
            row["step_vs_ddp"] = median(w / d for w, d in zip(c["wall_s"], ddp["wall_s"]))
            row["cpu_vs_ddp"] = median(w / d for w, d in zip(c["cpu_s"], ddp["cpu_s"]))
            row["peak_vs_ddp"] = row["peak_bytes"] / (ddp["held_rss_bytes"] + median(ddp["rise_bytes"]))
            row["loss_vs_ddp"] = max(abs(a - b) / abs(b) for a, b in zip(c["loss"], ddp["loss"]))
            rows.append(row)
    mib = 2**20
    print(f"{'':18} {'tensors held, MiB':^29} {'resident set, MiB':^23} {'step':^13} {'vs ddp':^20}\n"
          f"{'rank strategy reshard':18} {'base':>9} {'trained':>9} {'AdamW':>9} {'held':>7} {'rise':>7} "
          f"{'peak':>7} {'s':>6} {'CPU s':>6} {'peak':>6} {'step':>6} {'CPU s':>6} {'loss diff':>9}")
    for row in rows:
        reshard = "-" if row["strategy"] == "ddp" else str(row["reshard_after_forward"]).lower()
        print(f"{row['rank']:4d} {row['strategy']:8} {reshard:5} {row['base_rank_bytes'] / mib:9.0f} "
              f"{row['trained_rank_bytes'] / mib:9.1f} {row['adamw_rank_bytes'] / mib:9.1f} "
              f"{row['held_rss_bytes'] / mib:7.0f} {row['rise_bytes'] / mib:7.0f} {row['peak_bytes'] / mib:7.0f} "
              f"{row['step_s']:6.2f} {row['cpu_s']:6.2f} {row['peak_vs_ddp']:6.2f} {row['step_vs_ddp']:6.2f} "
              f"{row['cpu_vs_ddp']:6.2f} {row['loss_vs_ddp']:9.1e}")
    whole = rows[0]["base_whole_bytes"]
    shard = max(row["base_rank_bytes"] for row in rows if row["strategy"] == "fsdp")
    print(f"base weights: {whole / mib:.0f} MiB whole (every DDP rank), {shard / mib:.0f} MiB on an FSDP rank "
          f"({shard / whole:.2f} of it) at {world} ranks")
    return {"shape": shape, "context": args.fsdp_context, "world": world, "threads_per_rank": threads,
            "reps": args.fsdp_reps, "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peak-reps", type=int, default=1, help="isolated peak measurements per case (median)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="train.loss_chunk_tokens (default: the config's)")
    p.add_argument("--ray-context", type=int, default=4096)
    p.add_argument("--ray-steps", type=int, default=8)
    p.add_argument("--parts", nargs="+", default=["speed", "ray"], choices=["speed", "ray", "fsdp", "phases", "packed"])
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("--fsdp-context", type=int, default=512, help="--parts fsdp: tokens a block")
    p.add_argument("--fsdp-reps", type=int, default=3, help="--parts fsdp: timed steps per case (median)")
    p.add_argument("--fsdp-shape", nargs="*", default=[], metavar="KEY=INT",
                   help="--parts fsdp: LlamaConfig fields replacing the default shape's (a smaller model)")
    p.add_argument("--fsdp-out", default="benchmarks/results/train_step_fsdp.json")
    p.add_argument("--shape", nargs="*", default=[], metavar="KEY=INT",
                   help="parts speed/phases: LlamaConfig fields replacing the seed shape's (see --parts phases)")
    p.add_argument("--phases-out", default="benchmarks/results/train_step_phases.json")
    p.add_argument("--packed-out", default="benchmarks/results/train_step_packed.json")
    p.add_argument("--_peak", nargs=5, help=argparse.SUPPRESS)
    p.add_argument("--_packed", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--_phases", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._peak:
        method, loss, context, model_dir, chunk = args._peak
        print(measure_peak(method, loss, int(context), model_dir, int(chunk)))
        return
    if args._packed:
        method, context, model_dir, chunk = args._packed
        print(measure_peak(method, "on", int(context), model_dir, int(chunk), packed=True))
        return
    if args._phases:
        import json

        method, loss, context, model_dir, chunk = args._phases
        print(json.dumps(measure_phases(method, loss, int(context), model_dir, int(chunk))))
        return
    if args.chunk_tokens is None:
        args.chunk_tokens = Config().train.loss_chunk_tokens
    if "fsdp" in args.parts:
        shape = {**FSDP_SHAPE, **{k: int(v) for k, v in (kv.split("=", 1) for kv in args.fsdp_shape)}}
        print(f"DDP vs FSDP2, 2 gloo ranks: a Llama of {shape['num_hidden_layers']} layers, hidden "
              f"{shape['hidden_size']}, vocab {shape['vocab_size']} (untied), fp32, LoRA+, gradient "
              f"checkpointing, {args.fsdp_context} tokens a block, batch 1, torch {torch.__version__}")
        print(f"wrote {write_json(args.fsdp_out, fsdp_rows(args, shape))}")
        if not {"speed", "ray", "phases"} & set(args.parts):
            return
    SHAPE.update({k: int(v) for k, v in (kv.split("=", 1) for kv in args.shape)})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model")
        print(f"Training steps of a seed-shaped Llama ({SHAPE['num_hidden_layers']} layers, hidden "
              f"{SHAPE['hidden_size']}, vocab {SHAPE['vocab_size']}) with LoRA+, gradient checkpointing, "
              f"batch 1, torch {torch.__version__}, {torch.get_num_threads()} threads")
        rows, overhead = [], None
        if "packed" in args.parts:
            print(f"a packed block, chunked loss on (train.loss_chunk_tokens={args.chunk_tokens})")
            print(f"wrote {write_json(args.packed_out, {'shape': SHAPE, 'rows': packed_rows(model_dir, args)})}")
            if not {"speed", "ray", "phases"} & set(args.parts):
                return
        if "phases" in args.parts:
            print(f"where the peak is, train.loss_chunk_tokens={args.chunk_tokens}")
            phases = phase_rows(model_dir, args)
            print(f"wrote {write_json(args.phases_out, {'shape': SHAPE, 'phases': dict(PHASES), 'rows': phases})}")
            if not {"speed", "ray"} & set(args.parts):
                return
        if "speed" in args.parts:
            header = speed_header()
            print(f"train.loss_chunk_tokens={args.chunk_tokens}\n" + header + "\n" + "-" * len(header.splitlines()[-1]))
            rows = speed_rows(model_dir, args)
        if "ray" in args.parts:
            overhead = ray_overhead(model_dir, args)
    print(f"wrote {write_json(args.out, {'shape': SHAPE, 'rows': rows, 'ray_overhead': overhead})}")


if __name__ == "__main__":
    main()
