"""What glibc's handling of a CPU step's freed buffers costs, in the main thread and in a
thread (where Ray Train runs the training function), with and without train.retain_host_memory.

    python benchmarks/host_memory.py                       # 8192 tokens, S2-Attn, 3 rounds
    python benchmarks/host_memory.py --context 2048 --rounds 1 --steps 8

Each case runs the plain loop of benchmarks/ray_overhead.py (the loop's own functions on the
blocks `longtune prepare` packed from the stdlib corpus; a seed-shaped Llama, LoRA+, gradient
checkpointing, bf16 autocast where the CPU has it, the machine's threads) in a fresh process:

- ``main, glibc defaults`` / ``main, retained``: in the process's main thread;
- ``thread, glibc defaults``: in a thread, as in a Ray Train worker with the setting off;
- ``thread, retained, own arena``: retain_freed_memory() but the thread keeps its own arena;
- ``thread, retained, one arena``: what a CPU worker gets (MALLOC_ARENA_MAX=1 in its
  environment, longtune/train/host_memory.py).

The cases alternate ``--rounds`` times, so a slower minute slows them all; per case the median
over rounds of its mean step time (first log window left out) and of its minor page faults a
step. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import median, write_json  # noqa: E402

# name: (where the loop runs, train.retain_host_memory, one malloc arena)
CASES = {
    "main, glibc defaults": ("main", False, False),
    "main, retained": ("main", True, False),
    "thread, glibc defaults": ("thread", False, False),
    "thread, retained, own arena": ("thread", True, False),
    "thread, retained, one arena": ("thread", True, True),
}


def measure(model_dir: str, prepared: str, context: int, steps: int, log_every: int, where: str, retain: bool) -> dict:
    from benchmarks.ray_overhead import job_settings, plain_loop

    settings = job_settings(model_dir, context, "s2", steps, log_every) + [f"train.retain_host_memory={retain}"]
    result: dict = {}

    def run() -> None:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = plain_loop(model_dir, settings, Path(prepared), steps, log_every)
        result.update(step_s=sum(out["step_s"]) / len(out["step_s"]),
                      faults_per_step=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / steps)

    if where == "thread":
        worker = threading.Thread(target=run, name="TrainingThread")
        worker.start()
        worker.join()
    else:
        run()
    result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/host_memory.json")
    p.add_argument("--_measure", nargs=4, metavar=("MODEL", "PREPARED", "WHERE", "RETAIN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2 * args.log_every:
        p.error(f"--steps ({args.steps}) must be at least 2 x --log-every ({args.log_every}): the first window is warm-up")
    if args._measure:
        model_dir, prepared, where, retain = args._measure
        print(json.dumps(measure(model_dir, prepared, args.context, args.steps, args.log_every, where, retain == "1")))
        return

    import torch

    from benchmarks.ray_overhead import prepare, save_model
    from longtune.train.host_memory import on_glibc, worker_env_vars

    if not on_glibc():
        raise SystemExit("benchmarks/host_memory.py measures glibc's malloc; this C library is not glibc")
    tmp = Path(tempfile.mkdtemp(prefix="longtune-host-memory-"))
    model_dir = save_model(tmp / "model")
    prepared = prepare(model_dir, args.context, tmp / "prepared")
    print(f"Host memory: the plain loop, {args.context} tokens, S2-Attn, {args.steps} steps, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in CASES}
    for i in range(args.rounds):
        for name, (where, retain, one_arena) in CASES.items():
            env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
            if one_arena:
                env.update(worker_env_vars(retain=True, use_gpu=False))
            cmd = [sys.executable, __file__, "--context", str(args.context), "--steps", str(args.steps),
                   "--log-every", str(args.log_every), "--_measure", model_dir, str(prepared), where, str(int(retain))]
            out = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONWARNINGS": "ignore"}, check=True,
                                 capture_output=True, text=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = results[name][-1]
            print(f"  round {i + 1} {name}: {r['step_s']:.3f} s/step, {r['faults_per_step']:,.0f} faults/step",
                  flush=True)
    rows = [{"case": name, "context": args.context, "steps": args.steps, "rounds": args.rounds,
             "step_s": median(r["step_s"] for r in runs), "faults_per_step": median(r["faults_per_step"] for r in runs),
             "max_rss_mib": median(r["max_rss_mib"] for r in runs), "runs": runs} for name, runs in results.items()]
    print(f"\n{'case':<30} {'s/step':>7} {'faults/step':>12} {'max RSS MiB':>12}")
    for row in rows:
        print(f"{row['case']:<30} {row['step_s']:7.3f} {row['faults_per_step']:12,.0f} {row['max_rss_mib']:12,.0f}")
    write_json(args.out, {"rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
