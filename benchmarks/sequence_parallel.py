"""Sequence-parallel S2-Attn (scaling.sequence_parallel, issue #17): memory and time per rank.

    python benchmarks/sequence_parallel.py                          # P = 1, 2, 4 at 8k-32k (~10 min)
    python benchmarks/sequence_parallel.py --contexts 8192 --sizes 1 2

A seed-shaped Llama (hidden 256, 6 layers, 8 heads, vocab 8192, the one benchmarks/train_step.py
uses) with LoRA+ as `longtune finetune` trains it: gradient checkpointing, the chunked loss,
S2-Attn with groups of a quarter of the block, one block of batch 1 per optimizer step. For
each number of ranks P sharing the block (--sizes) and each block length (--contexts), P
gloo ranks on this machine (torch.multiprocessing, 127.0.0.1, no Ray) build the model with
the loop's own functions (build_parallel, build_optimizer) and run optimizer_step with
their sequence group, on the same block for every P. Per rank: the resident set the model
and its optimizer hold after a warm-up step, the peak resident set's rise during one later
step (glibc returning every large freed block, as in train_step.py) and their sum, the
step's wall-clock and CPU seconds (medians over --reps), the halo bytes it sent (forward,
recompute and backward) against the formula, and the first step's loss against P = 1's at
the same length (the same block, the same initial weights: it must agree).

Then, at a per-rank budget of the P = 1 peak at the shortest context (+ --budget-slack),
the longest measured context each P trains within it.

This machine has 2 cores: with P ranks their threads share them, so wall-clock times at
P > 1 say what one core per rank costs, not what P GPUs would; CPU seconds per rank are the
fairer column. Combinations whose per-rank tokens exceed --max-rank-tokens are skipped.
Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import median, peak_rise_bytes, rss_kib, write_json  # noqa: E402
from benchmarks.train_step import SHAPE, config_for, save_model  # noqa: E402

MIB = 2**20


def _rank_main(rank: int, world: int, port: int, model_dir: str, context: int, reps: int, threads: int,
               out: str) -> None:
    import gc

    import torch.distributed as dist

    from longtune.attention.sequence_parallel import HALO_TRAFFIC
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_optimizer, build_parallel, optimizer_step
    from longtune.train.sequence import sequence_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    config = config_for(model_dir, context, "s2", f"scaling.num_workers={world}",
                        f"scaling.sequence_parallel={world}", "train.precision=fp32")
    gen = torch.Generator().manual_seed(0)  # the same blocks for every P
    blocks = [{"input_ids": torch.randint(0, SHAPE["vocab_size"], (1, context), generator=gen),
               "position_ids": torch.arange(context)[None]} for _ in range(reps + 1)]
    gc.collect()
    before = rss_kib("VmRSS")
    torch.manual_seed(0)
    par = build_parallel(config, model_dir, device, resolve_precision(config.model, config.train, "cpu"))
    params, optimizer, scheduler = build_optimizer(config, par.model)
    par.model.train()
    sequence = sequence_group(world, device)
    autocast = resolve_precision(config.model, config.train, "cpu").autocast(device)
    times, rises, losses = [], [], []

    def step(block) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        loss = optimizer_step(par.wrapped, [block], params, optimizer, scheduler, config, autocast,
                              sequence=sequence)
        times.append((time.perf_counter() - start, time.process_time() - cpu))
        losses.append((loss.loss_sum, loss.tokens))

    step(blocks[0])  # warm-up: AdamW's moments exist from here on
    gc.collect()
    held = (rss_kib("VmRSS") - before) * 1024
    traffic = dict(HALO_TRAFFIC)
    for block in blocks[1:]:
        dist.barrier()
        rises.append(peak_rise_bytes(lambda: step(block)))
    per_step = {k: (HALO_TRAFFIC[k] - traffic[k]) / reps for k in HALO_TRAFFIC}
    result = {"rank": rank, "held_bytes": held, "rise_bytes": median(rises), "wall_s": median(t for t, _ in times[1:]),
              "cpu_s": median(c for _, c in times[1:]), "loss_sum": losses[0][0], "tokens": losses[0][1],
              "halo_per_step": per_step}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def halo_formula(shape: dict, context: int, batch: int = 1, element_bytes: int = 4) -> int:
    """Bytes one rank sends one way per layer and exchange: 2 (k, v) x B x the shifted heads'
    kv heads x G/2 x head_dim (see longtune/attention/sequence_parallel.py)."""
    h, hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    rep, hu = h // hkv, h // 2
    shifted = hkv - hu // rep if hu % rep == 0 else h - hu
    g = context // 4
    return 2 * batch * shifted * (g // 2) * (shape["hidden_size"] // h) * element_bytes


def measure(model_dir: str, size: int, context: int, reps: int) -> list[dict]:
    import torch.multiprocessing as mp

    threads = max(1, (os.cpu_count() or 2) // size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # the resident set follows what is allocated
        mp.spawn(_rank_main, args=(size, port, model_dir, context, reps, threads, tmp), nprocs=size, join=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=2, help="measured steps after the warm-up (median)")
    p.add_argument("--max-rank-tokens", type=int, default=8192, help="skip combinations above this per rank")
    p.add_argument("--budget-slack", type=float, default=0.10, help="per-rank budget: P=1's peak x (1 + this)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sequence_parallel.json"))
    args = p.parse_args()
    layers = SHAPE["num_hidden_layers"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(Path(tmp) / "model")
        print(f"{'P':>2} {'tokens':>7} {'/rank':>6} {'held':>6} {'rise':>6} {'peak':>6} {'step s':>7} {'CPU s':>6} "
              f"{'halo KiB/layer':>15} {'formula':>8} {'loss vs P=1':>11}")
        reference: dict[int, float] = {}
        for context in args.contexts:
            for size in args.sizes:
                if context // size > args.max_rank_tokens or (context // 4) % 2:
                    continue
                ranks = measure(model_dir, size, context, args.reps)
                loss = sum(r["loss_sum"] for r in ranks) / sum(r["tokens"] for r in ranks)
                if size == 1:
                    reference[context] = loss
                # forward direction, per layer: the first forward and the recompute each exchange once
                fwd = max(r["halo_per_step"]["forward"] for r in ranks) / (2 * layers)
                row = {"sequence_parallel": size, "context": context, "rank_tokens": context // size,
                       "held_mib": max(r["held_bytes"] for r in ranks) / MIB,
                       "rise_mib": max(r["rise_bytes"] for r in ranks) / MIB,
                       "peak_mib": max(r["held_bytes"] + r["rise_bytes"] for r in ranks) / MIB,
                       "step_s": max(r["wall_s"] for r in ranks), "cpu_s": max(r["cpu_s"] for r in ranks),
                       "halo_forward_bytes_per_layer": fwd,
                       "halo_formula_bytes": halo_formula(SHAPE, context) if size > 1 else 0,
                       "halo_backward_bytes_per_step": max(r["halo_per_step"]["backward"] for r in ranks),
                       "loss": loss,
                       "loss_vs_p1": abs(loss - reference[context]) / reference[context] if context in reference else None,
                       "ranks": ranks}
                rows.append(row)
                rel = "-" if row["loss_vs_p1"] is None else f"{row['loss_vs_p1']:.1e}"
                print(f"{size:2d} {context:7d} {context // size:6d} {row['held_mib']:6.0f} {row['rise_mib']:6.0f} "
                      f"{row['peak_mib']:6.0f} {row['step_s']:7.2f} {row['cpu_s']:6.2f} "
                      f"{fwd / 1024:15.1f} {row['halo_formula_bytes'] / 1024:8.1f} {rel:>11}", flush=True)
    shortest = min(r["context"] for r in rows if r["sequence_parallel"] == 1)
    budget = next(r["peak_mib"] for r in rows if r["sequence_parallel"] == 1 and r["context"] == shortest)
    budget *= 1 + args.budget_slack
    longest = {}
    for size in sorted({r["sequence_parallel"] for r in rows}):
        fits = [r["context"] for r in rows if r["sequence_parallel"] == size and r["peak_mib"] <= budget]
        longest[size] = max(fits) if fits else None
    print(f"per-rank budget {budget:.0f} MiB (P=1 at {shortest} tokens + {args.budget_slack:.0%}): longest context "
          + ", ".join(f"P={k}: {v}" for k, v in longest.items()))
    write_json(args.out, {"shape": SHAPE, "reps": args.reps, "rows": rows, "budget_mib": budget,
                          "longest_context_within_budget": longest})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
