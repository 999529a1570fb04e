"""Training-step speed and memory: S2-Attn vs full attention, and Ray Train's overhead.

    python benchmarks/train_step.py                     # contexts 4096, 8192, 16384
    python benchmarks/train_step.py --contexts 4096 --parts speed

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
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
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

    def __init__(self, model_dir: str, context: int, chunk_tokens: int):
        from longtune.attention import use_full_attention, use_s2_attention
        from longtune.train.loop import build_loss, build_model, build_optimizer
        from longtune.train.loss import LanguageModelLoss

        self.config = config_for(model_dir, context, "s2", f"train.loss_chunk_tokens={chunk_tokens}")
        self.model = build_model(self.config, model_dir, torch.device("cpu"))
        self.params, self.optimizer, self.scheduler = build_optimizer(self.config, self.model)
        self.autocast = cpu_autocast(self.config)
        self.losses = {"on": build_loss(self.config, self.model), "off": LanguageModelLoss(self.model, None)}
        assert self.losses["on"].chunked and not self.losses["off"].chunked
        self.switch = {"s2": lambda: use_s2_attention(self.model, 0.25),
                       "full": lambda: use_full_attention(self.model)}
        gen = torch.Generator().manual_seed(0)
        self.block = {"input_ids": torch.randint(0, SHAPE["vocab_size"], (1, context), generator=gen),
                      "position_ids": torch.arange(context)[None]}
        self.model.train()

    def step(self, method: str, loss: str) -> tuple[float, float]:
        """Wall-clock and CPU seconds (this process's threads) of one optimizer step."""
        from longtune.train.loop import optimizer_step

        self.switch[method]()
        start, cpu = time.perf_counter(), time.process_time()
        optimizer_step(self.losses[loss], [self.block], self.params, self.optimizer, self.scheduler,
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


def measure_peak(method: str, loss: str, context: int, model_dir: str, chunk_tokens: int) -> int:
    stepper = Stepper(model_dir, context, chunk_tokens)
    stepper.step(method, loss)  # warm-up
    return peak_rise_bytes(lambda: stepper.step(method, loss))


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--peak-reps", type=int, default=1, help="isolated peak measurements per case (median)")
    p.add_argument("--chunk-tokens", type=int, default=None, help="train.loss_chunk_tokens (default: the config's)")
    p.add_argument("--ray-context", type=int, default=4096)
    p.add_argument("--ray-steps", type=int, default=8)
    p.add_argument("--parts", nargs="+", default=["speed", "ray"], choices=["speed", "ray"])
    p.add_argument("--out", default="benchmarks/results/train_step.json")
    p.add_argument("--_peak", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._peak:
        method, loss, context, model_dir, chunk = args._peak
        print(measure_peak(method, loss, int(context), model_dir, int(chunk)))
        return
    if args.chunk_tokens is None:
        args.chunk_tokens = Config().train.loss_chunk_tokens
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model")
        print(f"Training steps of a seed-shaped Llama ({SHAPE['num_hidden_layers']} layers, hidden "
              f"{SHAPE['hidden_size']}, vocab {SHAPE['vocab_size']}) with LoRA+, gradient checkpointing, "
              f"batch 1, torch {torch.__version__}, {torch.get_num_threads()} threads")
        rows, overhead = [], None
        if "speed" in args.parts:
            header = speed_header()
            print(f"train.loss_chunk_tokens={args.chunk_tokens}\n" + header + "\n" + "-" * len(header.splitlines()[-1]))
            rows = speed_rows(model_dir, args)
        if "ray" in args.parts:
            overhead = ray_overhead(model_dir, args)
    print(f"wrote {write_json(args.out, {'shape': SHAPE, 'rows': rows, 'ray_overhead': overhead})}")


if __name__ == "__main__":
    main()
