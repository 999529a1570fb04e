"""What another process's CPU time costs a training step on a machine whose cores all run the
step's torch threads: the plain loop of ray_overhead.py alone and beside a "burner" process
that spins in short bursts and sleeps between them, taking a known share of one core.

    python benchmarks/background_cpu.py                       # 8192 tokens, S2, 2 passes
    python benchmarks/background_cpu.py --burn 1000:10000 --passes 1
    python benchmarks/background_cpu.py --burn 1000:10000 1000:10000:idle --passes 1

Each ``--burn BURST:PERIOD[:POLICY]`` (microseconds) spins BURST of every PERIOD; the share of
a core it really took is measured (its CPU seconds over the run's wall clock), since sleeps
overrun. POLICY is the burner's scheduling: ``other`` (the default, as Ray's processes run),
``nice19``, ``batch`` (SCHED_BATCH: no wake-up preemption) or ``idle`` (SCHED_IDLE) — what
lowering Ray's processes would buy.
The runs alternate within each pass, the loop alone first and last, so a slower minute of the
machine slows them alike; a run's slowdown is against the mean of its pass's two lone runs.
Ray's processes are such background (README: Ray's overhead): this says what each 0.1 of a
core of them costs. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import median, write_json  # noqa: E402
from benchmarks.ray_overhead import job_settings, plain_loop, prepare, save_model  # noqa: E402

POLICIES = ("other", "nice19", "batch", "idle")

BURNER = r"""
import os, sys, time
burst, period, policy = float(sys.argv[1]) / 1e6, float(sys.argv[2]) / 1e6, sys.argv[3]
if policy == "nice19":
    os.nice(19)
elif policy in ("batch", "idle"):
    os.sched_setscheduler(0, getattr(os, "SCHED_" + policy.upper()), os.sched_param(0))
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < burst:
        pass
    time.sleep(max(0.0, period - burst))
"""


def beside_burner(burn: str | None, run):
    """``run()``'s result and the share of one core the burner took meanwhile (0 without)."""
    if burn is None:
        return run(), 0.0
    import psutil

    burst, period, *policy = burn.split(":")
    proc = subprocess.Popen([sys.executable, "-c", BURNER, burst, period, *(policy or ["other"])])
    try:
        watched = psutil.Process(proc.pid)
        cpu0, t0 = sum(watched.cpu_times()[:2]), time.perf_counter()
        result = run()
        share = (sum(watched.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0)
    finally:
        proc.kill()
        proc.wait()
    return result, share


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--attention", default="s2", choices=["s2", "full"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--burn", nargs="+", default=["1000:10000", "2000:10000", "200:2000"],
                   help="BURST:PERIOD[:POLICY] (microseconds; policy other|nice19|batch|idle), one run each")
    p.add_argument("--out", default="benchmarks/results/background_cpu.json")
    args = p.parse_args()
    for burn in args.burn:
        fields = burn.split(":")
        try:
            burst, period = (int(x) for x in fields[:2])
        except ValueError:
            p.error(f"--burn {burn!r}: expected BURST:PERIOD[:POLICY] in microseconds, e.g. 1000:10000")
        if len(fields) > 3 or (len(fields) == 3 and fields[2] not in POLICIES):
            p.error(f"--burn {burn!r}: the policy after the period must be one of {', '.join(POLICIES)}")
        if not 0 < burst < period:
            p.error(f"--burn {burn!r}: the burst must be positive and shorter than the period")

    tmp = Path(tempfile.mkdtemp(prefix="longtune-background-cpu-"))
    model_dir = save_model(tmp / "model")
    prepared = prepare(model_dir, args.context, tmp / "prepared")
    settings = job_settings(model_dir, args.context, args.attention, args.steps, args.log_every)
    print(f"The plain loop beside a burner: {args.context} tokens, {args.attention}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads, {args.passes} passes", flush=True)
    order = [None, *args.burn, None]
    rows = {burn: [] for burn in args.burn}
    alone = []
    for i in range(args.passes):
        lone = []
        measured = []
        for burn in order:
            result, share = beside_burner(burn, lambda: plain_loop(model_dir, settings, prepared, args.steps,
                                                                   args.log_every))
            step = median(result["step_s"])
            (lone.append(step) if burn is None else measured.append((burn, step, share)))
            print(f"  pass {i + 1}: {burn or 'alone'}: {step:.3f} s/step, burner {share:.3f} of a core", flush=True)
        base = sum(lone) / len(lone)
        alone.append(base)
        for burn, step, share in measured:
            rows[burn].append({"step_s": step, "core_share": share, "slowdown_pct": 100 * (step / base - 1)})
    print(f"\n{'burner':18} {'core share':>10} {'s/step':>7} {'slowdown':>9} {'slowdown / share':>16}")
    print(f"{'none':18} {'':>10} {median(alone):7.3f}")
    table = []
    for burn, runs in rows.items():
        share = median(r["core_share"] for r in runs)
        slow = median(r["slowdown_pct"] for r in runs)
        table.append({"burn": burn, "core_share": share, "step_s": median(r["step_s"] for r in runs),
                      "slowdown_pct": slow, "passes": runs})
        print(f"{burn:18} {share:10.3f} {table[-1]['step_s']:7.3f} {slow:+8.1f}% {slow / 100 / share:16.2f}")
    print(f"wrote {write_json(args.out, {'alone_step_s': alone, 'rows': table})}")


if __name__ == "__main__":
    main()
