"""What Ray costs a user: the `longtune finetune` job against the same steps on the same blocks
in a plain loop in one process.

    python benchmarks/ray_overhead.py                            # 8192 tokens, S2-Attn and full
    python benchmarks/ray_overhead.py --context 2048 --attention s2 --steps 24

The job is started the way a user starts it (``python pipelines/finetune.py KEY=VALUE ...``
in a subprocess: a local Ray, one TorchTrainer worker holding the machine's threads, Ray Data
streaming a prepared dataset, MLflow on a SQLite store), on a seed-shaped Llama (hidden 256,
6 layers, 8 heads, vocab 4096, LoRA+, gradient checkpointing, bf16 autocast where the CPU has
it) and blocks prepared from the embedded stdlib corpus by `longtune prepare` (documents
packed, positions restarting at each). Its step time is what it logs to MLflow
(``train/step_time_s``: each log window's wall-clock over its steps; eval and checkpoints
excluded, as the loop excludes them), the first window left out as warm-up. The plain loop
runs the loop's own functions (build_model, build_loss, build_optimizer, optimizer_step) on
the first ``--steps`` blocks of the same parquet files in the same order, with the same
threads, its first window left out alike. The two alternate ``--passes`` times, so a slower
minute of the machine slows both; the overhead is the median of the per-pass ratios.

While the job trains, the CPU seconds of every other process of the machine's user (the Ray
head's processes, the driver, the worker's own non-torch threads) are sampled, to say where a
2-core machine's time goes. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._common import median, write_json  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=4096, max_position_embeddings=256)


def save_model(directory: Path) -> str:
    """A random seed-shaped Llama with longtune's seed tokenizer beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from longtune.seed import seed_tokenizer

    tokenizer = seed_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": len(tokenizer)})).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def prepare(model_dir: str, context: int, out: Path) -> Path:
    cmd = [sys.executable, "pipelines/prepare_data.py", "--tokenizer", model_dir, "--context-length", str(context),
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out


def job_settings(model_dir: str, context: int, attention: str, steps: int, log_every: int) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"model.target_context={context}", f"attention.type={attention}",
            f"train.max_steps={steps}", f"train.log_every={log_every}", f"train.checkpoint_every={steps}",
            "train.warmup_steps=0", "train.batch_size_per_worker=1", "eval.before_after=false",
            "scaling.num_workers=1", f"scaling.cpus_per_worker={torch.get_num_threads()}"]


class CpuSampler:
    """CPU seconds of this user's processes, by name, between start() and stop()."""

    def __init__(self, skip: set[int]):
        self.skip, self.start_times, self.end_times = skip, {}, {}

    @staticmethod
    def _snapshot(skip) -> dict[tuple[int, str], float]:
        import psutil

        out = {}
        for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times", "username"]):
            if p.info["pid"] in skip or p.info["username"] != psutil.Process().username():
                continue
            t = p.info["cpu_times"]
            if t is None:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            name = p.info["name"]
            if "ray::" in cmd or name.startswith("ray::"):
                name = cmd.split()[0] if cmd else name
            elif "finetune.py" in cmd:
                name = "driver (pipelines/finetune.py)"
            out[(p.info["pid"], name)] = t.user + t.system
        return out

    def start(self):
        self.start_times = self._snapshot(self.skip)

    def stop(self) -> dict[str, float]:
        self.end_times = self._snapshot(self.skip)
        # by pid: a Ray worker's title changes with the task it runs (ray::IDLE ->
        # ray::RayTrainWorker...), and a process first seen at the end started in the window
        started = {pid: t for (pid, _), t in self.start_times.items()}
        by_name: dict[str, float] = {}
        for (pid, name), end in self.end_times.items():
            by_name[name] = by_name.get(name, 0.0) + end - started.get(pid, 0.0)
        return dict(sorted(by_name.items(), key=lambda kv: -kv[1]))


def run_job(settings: list[str], steps: int, store: Path, run_name: str, sample: bool) -> dict:
    """The finetune job; its logged step times (first window dropped) and, while it trained,
    the CPU seconds of the machine's other processes."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "pipelines/finetune.py", *settings, f"train.run_name={run_name}",
           f"train.storage_path={store.parent / 'ray_results'}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = CpuSampler({os.getpid()})
    lines, cpu = [], {}
    last = f"step={steps} "
    start = time.perf_counter()
    for line in proc.stdout:  # the loop's log lines: "[longtune] step=4  loss=...  step_time_s=..."
        lines.append(line)
        if sample and "step_time_s=" in line:
            if not sampler.start_times:  # the first window has ended: sample the steady state
                sampler.start()
            elif last in line:  # the last step: training is over
                cpu = sampler.stop()
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"finetune job failed (exit {proc.returncode}):\n" + "".join(lines[-40:]))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.mlflow.runName = '{run_name}'")
    def history(name: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(runs[0].info.run_id, name), key=lambda m: m.step)]

    return {"step_s": history("train/step_time_s")[1:], "data_wait_s": history("train/data_wait_s")[1:],
            "wall_s": wall, "cpu": cpu}


def plain_loop(model_dir: str, settings: list[str], prepared: Path, steps: int, log_every: int) -> list[float]:
    """The loop's own functions on the prepared blocks in file order, in this process: each
    log window's mean step time, the first window dropped (as for the job)."""
    import pyarrow.parquet as pq

    from longtune.config import load_config
    from longtune.precision import resolve_precision
    from longtune.train.loop import build_loss, build_model, build_optimizer, optimizer_step

    config = load_config(None, settings)
    manifest = json.loads((prepared / "manifest.json").read_text())
    blocks = []
    for f in manifest["splits"]["train"]["files"]:
        table = pq.read_table(prepared / f)
        for row in table.to_pylist():
            blocks.append({k: torch.tensor(v)[None] for k, v in row.items() if isinstance(v, list)})
            if len(blocks) == steps:
                break
        if len(blocks) == steps:
            break
    device = torch.device("cpu")
    model = build_model(config, model_dir, device)
    loss = build_loss(config, model)
    params, optimizer, scheduler = build_optimizer(config, model)
    autocast = resolve_precision(config.model, config.train, "cpu").autocast(device)
    model.train()
    windows, start = [], time.perf_counter()
    for i, block in enumerate(blocks, 1):
        optimizer_step(loss, [block], params, optimizer, scheduler, config, autocast)
        if i % log_every == 0 or i == steps:
            windows.append((time.perf_counter() - start) / (log_every if i % log_every == 0 else i % log_every))
            start = time.perf_counter()
    return windows[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--attention", nargs="+", default=["s2", "full"], choices=["s2", "full"])
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/ray_overhead.json")
    args = p.parse_args()
    if args.steps < 2 * args.log_every:
        p.error(f"--steps ({args.steps}) must be at least 2 x --log-every ({args.log_every}): the first window is warm-up")

    tmp = Path(tempfile.mkdtemp(prefix="longtune-ray-overhead-"))
    model_dir = save_model(tmp / "model")
    prepared = prepare(model_dir, args.context, tmp / "prepared")
    threads = torch.get_num_threads()
    print(f"Ray's overhead: `longtune finetune` (1 worker, {threads} CPUs) vs a plain loop, {args.context} tokens, "
          f"{args.steps} steps, log every {args.log_every}, {args.passes} passes, {threads} threads, "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for attention in args.attention:
        settings = job_settings(model_dir, args.context, attention, args.steps, args.log_every)
        settings.append(f"data.prepared_path={prepared}")
        ratios, jobs, plains = [], [], []
        for i in range(args.passes):
            job = run_job(settings, args.steps, tmp / "mlflow.db", f"{attention}-{i}", sample=i == 0)
            plain = plain_loop(model_dir, settings, prepared, args.steps, args.log_every)
            jobs.append(job)
            plains.append(plain)
            ratios.append(median(job["step_s"]) / median(plain))
            print(f"  {attention} pass {i + 1}: job {median(job['step_s']):.3f} s/step, plain "
                  f"{median(plain):.3f} s/step ({100 * (ratios[-1] - 1):+.1f}%), of the job's step "
                  f"{median(job['data_wait_s']):.3f} s waiting for data, job wall {job['wall_s']:.0f} s",
                  flush=True)
        row = {"attention": attention, "context": args.context, "steps": args.steps, "threads": threads,
               "job_step_s": median(s for j in jobs for s in j["step_s"]),
               "plain_step_s": median(s for pl in plains for s in pl),
               "overhead_pct": 100 * (median(ratios) - 1), "job_wall_s": median(j["wall_s"] for j in jobs),
               "other_cpu_s": jobs[0]["cpu"]}
        rows.append(row)
    print(f"\n{'attention':9} {'context':>7} {'plain s/step':>12} {'job s/step':>10} {'overhead':>9} {'job wall s':>10}")
    for r in rows:
        print(f"{r['attention']:9} {r['context']:7d} {r['plain_step_s']:12.3f} {r['job_step_s']:10.3f} "
              f"{r['overhead_pct']:+8.1f}% {r['job_wall_s']:10.0f}")
    for r in rows:
        top = list(r["other_cpu_s"].items())[:8]
        if top:
            print(f"CPU seconds while the {r['attention']} job trained, by process: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in top))
    print(f"wrote {write_json(args.out, {'rows': rows})}")


if __name__ == "__main__":
    main()
