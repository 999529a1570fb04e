"""S2-Attn vs full causal attention: forward+backward time and peak memory; and packed rows,
before vs after (this code against an earlier commit's, in the same run).

Full attention is transformers' own ``sdpa_attention_forward`` (causal SDPA, output in
[batch, seq, heads, head_dim]), the call a model makes; S2-Attn returns the same layout.

    python benchmarks/attention.py                      # both suites, seq 4096, 8192, 16384
    python benchmarks/attention.py --suite unpacked --device cuda --backends sdpa flash varlen --dtype bfloat16
    python benchmarks/attention.py --suite packed --baseline 5939423 --layers 4 --docs 3
    python benchmarks/attention.py --suite documents --seqs 8192 16384 --docs 5

The documents suite times a block of ``--docs`` documents against the same inputs with
continuous positions (no document start), in S2-Attn training, full-attention training and
full-attention eval: what a document boundary costs (the target is at most 1.1x).

The packed suite runs what a model does with a packed block of ``--docs`` documents (no
padding): ``--layers`` attention calls sharing one ``position_ids`` tensor, as S2-Attn
fwd+bwd (training) and as full attention forward under no_grad (the held-out eval, which
routes eval-mode longtune_s2 layers to full attention), plus the unpacked S2 fwd+bwd (the
lean CPU path, which must not get slower). "before" is ``longtune/attention/s2.py`` as it was
at ``--baseline`` (read with ``git show``), "after" is the working tree's; the two alternate
step by step in one process, so the ratios hold on a busy machine.

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
from longtune.attention import s2 as current_s2  # noqa: E402
from longtune.attention import s2_attention  # noqa: E402
from longtune.attention.masks import clear_forward_cache  # noqa: E402


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


# ---------------------------------------------------------------- packed rows: before vs after


def load_baseline(rev: str, dest: Path):
    """``longtune/attention/s2.py`` at ``rev`` as a module of its own (it imports nothing from
    longtune on the CPU), or None when git cannot show it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "show", f"{rev}:longtune/attention/s2.py"], cwd=root,
                             check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"no baseline: git show {rev}:longtune/attention/s2.py failed ({e})")
        return None
    dest.write_text(src)
    return import_file(dest)


def import_file(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("longtune_baseline_s2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packed_positions(seq, docs, device, seed=0):
    """[1, seq] positions of ``docs`` documents of random lengths, restarting at each start."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(seq - 1, generator=g)[: docs - 1].add(1).tolist())
    bounds = [0, *cuts, seq]
    return torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])])[None].to(device)


def packed_inputs(seq, args):
    dtype = getattr(torch, args.dtype)
    layers = [[x.detach().requires_grad_() for x in make_inputs(seq, args.heads, args.head_dim, dtype, args.device, seed=i)]
              for i in range(args.layers)]
    return layers, packed_positions(seq, args.docs, args.device)


def run_layers(layers, attend, train):
    """``attend(q, k, v)`` over ``len(layers)`` attention layers of one forward; ``train``:
    with a backward through all of them, else under no_grad (the held-out eval)."""
    clear_forward_cache()  # what the model's forward hooks do; the baseline has no cache
    if not train:
        with torch.no_grad():
            for q, k, v in layers:
                attend(q, k, v)
        return
    outs = [attend(q, k, v)[0] for q, k, v in layers]
    torch.stack([o.sum() for o in outs]).sum().backward()
    for q, k, v in layers:
        q.grad = k.grad = v.grad = None


def packed_step(impl, mode, layers, pos, ratio):
    """One forward (and backward for training) of ``len(layers)`` attention layers."""
    g = int(layers[0][0].shape[2] * ratio)
    if mode == "eval":
        return run_layers(layers, lambda q, k, v: impl.full_attention(q, k, v, position_ids=pos), train=False)
    positions = pos if mode == "s2 packed" else None
    run_layers(layers, lambda q, k, v: impl.s2_attention(q, k, v, group_size=g, position_ids=positions), train=True)


PACKED_MODES = ("s2 packed", "eval", "s2 unpacked")


def packed_peak_here(which, mode, seq, args):
    impl = current_s2 if which == "after" else import_file(Path(args.baseline_file))
    layers, pos = packed_inputs(seq, args)
    packed_step(impl, mode, layers, pos, args.ratio)  # warm-up
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        packed_step(impl, mode, layers, pos, args.ratio)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return peak_rise_bytes(lambda: packed_step(impl, mode, layers, pos, args.ratio))


def packed_suite(args):
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="longtune-bench-"))
    baseline = load_baseline(args.baseline, tmp / "baseline_s2.py")
    impls = {"after": current_s2} if baseline is None else {"before": baseline, "after": current_s2}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"\nPacked rows: {args.layers} layers sharing position_ids, {args.docs} documents a row, batch 1, "
          f"{args.heads} heads, head_dim {args.head_dim}, ratio {args.ratio}, {args.dtype}, {args.device}; "
          f"before = s2.py at {args.baseline}")
    header = (f"{'mode':12} {'seq':>6} {'before ms':>10} {'after ms':>10} {'speedup':>8} "
              f"{'before MiB':>11} {'after MiB':>10} {'mem ratio':>9}")
    print(header)
    print("-" * len(header))
    rows = []
    for mode in args.modes:
        for seq in args.seqs:
            layers, pos = packed_inputs(seq, args)
            times = {name: [] for name in impls}
            for impl in impls.values():  # warm-up
                packed_step(impl, mode, layers, pos, args.ratio)
            for _ in range(args.reps):
                for name, impl in impls.items():
                    sync()
                    t0 = time.perf_counter()
                    packed_step(impl, mode, layers, pos, args.ratio)
                    sync()
                    times[name].append(time.perf_counter() - t0)
            del layers, pos
            mem = {}
            for name in impls:
                if args.device == "cuda":
                    mem[name] = packed_peak_here(name, mode, seq, args)
                else:
                    mem[name] = int(run_isolated([
                        __file__, "--_packed_peak", name, mode, str(seq), "--baseline-file", str(tmp / "baseline_s2.py"),
                        "--dtype", args.dtype, "--heads", str(args.heads), "--head-dim", str(args.head_dim),
                        "--ratio", str(args.ratio), "--layers", str(args.layers), "--docs", str(args.docs),
                        "--device", args.device]))
            row = dict(mode=mode, seq=seq, after_ms=median(times["after"]) * 1e3, after_peak_mib=mem["after"] / 2**20)
            if "before" in impls:
                row.update(before_ms=median(times["before"]) * 1e3, before_peak_mib=mem["before"] / 2**20)
                row.update(speedup=row["before_ms"] / row["after_ms"],
                           mem_ratio=row["before_peak_mib"] / max(row["after_peak_mib"], 1e-9))
            rows.append(row)
            print(f"{mode:12} {seq:6d} {_cell(row, 'before_ms', '10.1f'):>10} {row['after_ms']:10.1f} "
                  f"{_cell(row, 'speedup', '7.2f'):>7}x {_cell(row, 'before_peak_mib', '11.1f'):>11} "
                  f"{row['after_peak_mib']:10.1f} {_cell(row, 'mem_ratio', '8.2f'):>8}x")
    return rows


# ---------------------------------------------------------------- documents: a packed block vs one without

DOCUMENT_MODES = ("s2 train", "full train", "full eval")


def document_step(mode, layers, pos, ratio):
    """``len(layers)`` attention calls sharing ``pos`` (training: forward and backward)."""
    g = int(layers[0][0].shape[2] * ratio)
    if mode == "s2 train":
        attend = lambda q, k, v: s2_attention(q, k, v, group_size=g, position_ids=pos)  # noqa: E731
    else:
        attend = lambda q, k, v: current_s2.full_attention(q, k, v, position_ids=pos)  # noqa: E731
    run_layers(layers, attend, train=mode != "full eval")


def documents_suite(args):
    """A block holding ``--docs`` documents (positions restart at each) against the same
    block with continuous positions (one document), same inputs, interleaved step by step.
    The target: the packed block costs at most 1.1x."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"\nDocuments: {args.layers} layers sharing position_ids, a block of {args.docs} documents against one "
          f"without document starts, batch 1, {args.heads} heads, head_dim {args.head_dim}, ratio {args.ratio}, "
          f"{args.dtype}, {args.device}, {torch.get_num_threads()} threads")
    header = f"{'mode':11} {'seq':>6} {'one doc ms':>11} {'packed ms':>10} {'packed / one':>12}"
    print(header)
    print("-" * len(header))
    rows = []
    for mode in args.document_modes:
        for seq in args.seqs:
            layers, packed = packed_inputs(seq, args)
            cases = {"one": torch.arange(seq, device=args.device)[None], "packed": packed}
            times = {name: [] for name in cases}
            for pos in cases.values():  # warm-up
                document_step(mode, layers, pos, args.ratio)
            for _ in range(args.reps):
                for name, pos in cases.items():
                    sync()
                    t0 = time.perf_counter()
                    document_step(mode, layers, pos, args.ratio)
                    sync()
                    times[name].append(time.perf_counter() - t0)
            pairs = list(zip(times["one"], times["packed"]))
            row = dict(mode=mode, seq=seq, docs=args.docs, one_ms=median(times["one"]) * 1e3,
                       packed_ms=median(times["packed"]) * 1e3,
                       packed_vs_one=median(p / o for o, p in pairs))  # per-rep ratios: noise cancels
            rows.append(row)
            print(f"{mode:11} {seq:6d} {row['one_ms']:11.1f} {row['packed_ms']:10.1f} {row['packed_vs_one']:11.2f}x",
                  flush=True)
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", default=["sdpa"], choices=["sdpa", "flash", "varlen"])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--suite", default="all", choices=["all", "unpacked", "packed", "documents"])
    p.add_argument("--baseline", default="5939423", help="git revision whose s2.py is 'before' (packed suite)")
    p.add_argument("--layers", type=int, default=4, help="attention layers per forward (packed suite)")
    p.add_argument("--docs", type=int, default=3, help="documents per packed row (packed suite)")
    p.add_argument("--modes", nargs="+", default=list(PACKED_MODES), choices=PACKED_MODES, help="packed suite modes")
    p.add_argument("--document-modes", nargs="+", default=list(DOCUMENT_MODES), choices=DOCUMENT_MODES,
                   help="documents suite modes")
    p.add_argument("--out", default="benchmarks/results/attention.json")
    p.add_argument("--_peak", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--_packed_peak", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--baseline-file", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args._peak:
        print(measure_peak_here(args._peak[0], int(args._peak[1]), args, args.backends[0]))
        return
    if args._packed_peak:
        which, mode, seq = args._packed_peak
        print(packed_peak_here(which, mode, int(seq), args))
        return

    meta = dict(heads=args.heads, head_dim=args.head_dim, ratio=args.ratio, dtype=args.dtype,
                device=args.device, torch=torch.__version__, threads=torch.get_num_threads(), reps=args.reps)
    payload = {"meta": meta}
    if args.suite in ("all", "unpacked"):
        payload["rows"] = unpacked_suite(args)
    if args.suite in ("all", "packed"):
        meta.update(baseline=args.baseline, layers=args.layers, docs=args.docs)
        payload["packed_rows"] = packed_suite(args)
    if args.suite in ("all", "documents"):
        meta.update(layers=args.layers, docs=args.docs)
        payload["document_rows"] = documents_suite(args)
    print(f"wrote {write_json(args.out, payload)}")


def unpacked_suite(args):
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
    return rows


if __name__ == "__main__":
    main()
