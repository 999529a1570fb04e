"""S2-Attn vs full causal attention: forward+backward time and peak memory.

Full attention is transformers' own ``sdpa_attention_forward`` (causal SDPA, output in
[batch, seq, heads, head_dim]), the call a model makes; S2-Attn returns the same layout.

    python benchmarks/attention.py                      # seq 4096, 8192, 16384 on this machine
    python benchmarks/attention.py --device cuda --backends sdpa flash --dtype bfloat16

Inputs have transformers' layout (q/k/v [batch, heads, seq, head_dim] views of a
[batch, seq, heads, head_dim] projection), batch 1, 8 heads, head_dim 64, groups of 1/4 of
the sequence. At ratio 1/4 S2-Attn does a quarter of causal attention's work, so 4x is the
ceiling. Timings interleave the two methods in one process, so a noisy machine slows both
alike; the ratio is what to read. Peak memory on CPU is the rise of the process's peak
resident set (VmHWM, reset after a warm-up step) in a fresh subprocess per measurement; on CUDA,
torch.cuda.max_memory_allocated. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import median, peak_rise_bytes, run_isolated, write_json  # noqa: E402
from longtune.attention import s2_attention  # noqa: E402


def make_inputs(seq, heads, head_dim, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    # [B, N, H, D] projections viewed as [B, H, N, D], as q_proj(...).view(...).transpose(1, 2)
    qkv = torch.randn(3, 1, seq, heads, head_dim, generator=g, dtype=dtype, device=device)
    return [x.transpose(1, 2).requires_grad_() for x in qkv.unbind(0)]


class _Attention(torch.nn.Module):
    is_causal = True  # what transformers' sdpa function reads from the attention module


_MODULE = _Attention()


def step(method, q, k, v, ratio, backend):
    if method == "full":  # exactly what a transformers 5 model calls for full attention
        out, _ = sdpa_attention_forward(_MODULE, q, k, v, None)
    else:
        out, _ = s2_attention(q, k, v, group_size=int(q.shape[2] * ratio), backend=backend)
    out.sum().backward()


def _leaf_inputs(seq, heads, head_dim, dtype, device):
    return [x.detach().requires_grad_() for x in make_inputs(seq, heads, head_dim, dtype, device)]


def time_pair(seq, args, backend):
    """Median seconds of fwd+bwd for full and s2, interleaved."""
    q, k, v = _leaf_inputs(seq, args.heads, args.head_dim, getattr(torch, args.dtype), args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = {"full": [], "s2": []}
    for method in ("full", "s2"):  # warm-up
        step(method, q, k, v, args.ratio, backend)
    for _ in range(args.reps):
        for method in ("full", "s2"):
            q.grad = k.grad = v.grad = None
            sync()
            t0 = time.perf_counter()
            step(method, q, k, v, args.ratio, backend)
            sync()
            times[method].append(time.perf_counter() - t0)
    return {m: median(t) for m, t in times.items()}


def measure_peak_here(method, seq, args, backend):
    """Peak extra bytes of one fwd+bwd beyond the inputs (run in a fresh process on CPU)."""
    dtype = getattr(torch, args.dtype)
    if args.device == "cuda":
        q, k, v = _leaf_inputs(seq, args.heads, args.head_dim, dtype, "cuda")
        step(method, q, k, v, args.ratio, backend)  # warm-up: kernels, workspaces
        q.grad = k.grad = v.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(method, q, k, v, args.ratio, backend)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    q, k, v = _leaf_inputs(seq, args.heads, args.head_dim, dtype, "cpu")
    step(method, q, k, v, args.ratio, backend)  # warm-up: thread pools, one-time buffers
    q.grad = k.grad = v.grad = None
    return peak_rise_bytes(lambda: step(method, q, k, v, args.ratio, backend))


def measure_peak(method, seq, args, backend):
    if args.device == "cuda":
        return measure_peak_here(method, seq, args, backend)
    return int(run_isolated([__file__, "--_peak", method, str(seq), "--backends", backend,
                             "--dtype", args.dtype, "--heads", str(args.heads),
                             "--head-dim", str(args.head_dim), "--ratio", str(args.ratio)]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=["sdpa"], choices=["sdpa", "flash"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/attention.json")
    p.add_argument("--_peak", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._peak:
        print(measure_peak_here(args._peak[0], int(args._peak[1]), args, args.backends[0]))
        return

    rows = []
    header = f"{'backend':8} {'seq':>6} {'full ms':>9} {'s2 ms':>9} {'speedup':>8} {'full MiB':>9} {'s2 MiB':>9}"
    print(f"S2-Attn vs causal SDPA (transformers' sdpa_attention_forward), fwd+bwd, batch 1, {args.heads} heads, head_dim {args.head_dim}, "
          f"ratio {args.ratio}, {args.dtype}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for backend in args.backends:
        for seq in args.seqs:
            t = time_pair(seq, args, backend)
            mem = {m: measure_peak(m, seq, args, backend) for m in ("full", "s2")}
            row = dict(
                backend=backend, seq=seq, full_ms=t["full"] * 1e3, s2_ms=t["s2"] * 1e3,
                speedup=t["full"] / t["s2"], full_peak_mib=mem["full"] / 2**20,
                s2_peak_mib=mem["s2"] / 2**20,
            )
            rows.append(row)
            print(f"{backend:8} {seq:6d} {row['full_ms']:9.1f} {row['s2_ms']:9.1f} "
                  f"{row['speedup']:7.2f}x {row['full_peak_mib']:9.1f} {row['s2_peak_mib']:9.1f}")
    meta = dict(heads=args.heads, head_dim=args.head_dim, ratio=args.ratio, dtype=args.dtype,
                device=args.device, torch=torch.__version__, threads=torch.get_num_threads(), reps=args.reps)
    print(f"wrote {write_json(args.out, {'meta': meta, 'rows': rows})}")


if __name__ == "__main__":
    main()
