"""What Ray costs a user: the `longtune finetune` job against the same steps on the same blocks
in a plain loop in a process of its own.

    python benchmarks/ray_overhead.py                            # 8192 tokens, S2-Attn and full
    python benchmarks/ray_overhead.py --context 2048 --attention s2 --steps 24

The job is started the way a user starts it (``python pipelines/finetune.py KEY=VALUE ...``
in a subprocess: a local Ray, one TorchTrainer worker holding the machine's threads and
reading its share of a prepared dataset itself, MLflow on a SQLite store), on a seed-shaped Llama (hidden 256,
6 layers, 8 heads, vocab 4096, LoRA+, gradient checkpointing, bf16 autocast where the CPU has
it) and blocks prepared from the embedded stdlib corpus by `longtune prepare` (documents
packed, positions restarting at each). Its step time is what it logs to MLflow
(``train/step_time_s``: each log window's wall-clock over its steps; eval and checkpoints
excluded, as the loop excludes them), the first window left out as warm-up. The plain loop
runs the loop's own functions (build_model, build_loss, build_optimizer, optimizer_step) on
the first ``--steps`` blocks of the same parquet files in the same order, with the same
threads, its first window left out alike, in a fresh process each pass as the job's worker is
(in the benchmark's own process a later pass would run on the heap the earlier ones grew).
The two alternate ``--passes`` times, so a slower minute of the machine slows both; the
overhead is the median of the per-pass ratios.

Between the two, ``--ray-train`` runs the plain loop inside a bare TorchTrainer (one worker
with the same CPUs, the blocks read from the parquet files by the worker itself: no Ray Data,
no longtune loop, no MLflow), which says how much of the job's cost is Ray Train's processes
alone; ``--dashboard`` adds a job run with scaling.local_dashboard=true, the dashboard's cost;
``--ray-data`` one with data.prepared_reader=ray_data (Ray Data's streaming split feeds the
worker, as before that setting); ``--normal-priority`` one with
scaling.local_ray_idle_priority=false (Ray's own processes at normal CPU priority);
``--default-malloc`` one with train.retain_host_memory=false, glibc's own thresholds (the
plain loop and the bare TorchTrainer follow train.retain_host_memory, as the job's worker does).

While the job trains, the CPU seconds of every other process of the machine's user (the Ray
head's processes, the driver, the worker's own non-torch threads) are sampled, to say where a
2-core machine's time goes, and every run counts how often its training process's threads
were preempted (involuntary context switches a second). Prints a table and writes JSON.
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


def preemptions(pid: int | str = "self") -> dict[str, int]:
    """Involuntary context switches of each thread of process ``pid`` so far, by thread id."""
    counts = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except FileNotFoundError:  # the thread ended
            continue
        counts[tid] = int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    return counts


def preempted_since(before: dict[str, int], pid: int | str = "self") -> int:
    """Preemptions of ``pid``'s threads since ``before`` (``preemptions``): a thread that
    ended in between takes its count along, so each thread's own difference is summed."""
    return sum(n - before.get(tid, 0) for tid, n in preemptions(pid).items())


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
        # the training worker, whose preemptions stop() counts
        self.worker = next((pid for pid, name in self.start_times if name.startswith("ray::RayTrainWorker")), None)
        self.worker_preempted = preemptions(self.worker) if self.worker else {}
        self.started = time.perf_counter()

    def stop(self) -> dict[str, float]:
        self.end_times = self._snapshot(self.skip)
        if self.worker:  # the training worker's preemptions a second over the window
            self.preempted_per_s = preempted_since(self.worker_preempted, self.worker) / (
                time.perf_counter() - self.started)
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
            "wall_s": wall, "cpu": cpu, "preempted_per_s": getattr(sampler, "preempted_per_s", None)}


def plain_loop(model_dir: str, settings: list[str], prepared: Path, steps: int, log_every: int) -> dict:
    """The loop's own functions on the prepared blocks in file order, in this process: each
    log window's mean step time, the first window dropped (as for the job), and how often
    this process's threads were preempted a second over those windows."""
    import pyarrow.parquet as pq

    from longtune.config import load_config
    from longtune.precision import resolve_precision
    from longtune.train.host_memory import retain_freed_memory
    from longtune.train.loop import build_loss, build_model, build_optimizer, optimizer_step

    config = load_config(None, settings)
    if config.train.retain_host_memory:  # as train_loop does
        retain_freed_memory()
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
    measured_from, preempted = 0.0, {}
    for i, block in enumerate(blocks, 1):
        optimizer_step(loss, [block], params, optimizer, scheduler, config, autocast)
        if i % log_every == 0 or i == steps:
            windows.append((time.perf_counter() - start) / (log_every if i % log_every == 0 else i % log_every))
            start = time.perf_counter()
            if len(windows) == 1:  # the warm-up window ends: count from here
                measured_from, preempted = start, preemptions()
    measured_s = time.perf_counter() - measured_from
    return {"step_s": windows[1:], "preempted_per_s": preempted_since(preempted) / measured_s}


def ray_train_loop(model_dir: str, settings: list[str], prepared: Path, steps: int, log_every: int) -> dict:
    """``plain_loop`` inside a bare TorchTrainer (one worker, the job's CPUs, the local Ray
    the job would start): Ray Train's processes without Ray Data, longtune's loop or MLflow.
    Run in a fresh process (``--_only ray_train``), so that no Ray outlives it."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from longtune.config import load_config
    from longtune.runtime import init_ray

    config = load_config(None, settings)
    init_ray(config)
    out = Path(tempfile.mkdtemp(prefix="longtune-ray-train-")) / "result.json"

    def train_fn():
        torch.set_num_threads(int(config.scaling.cpus_per_worker))  # as train_loop does
        out.write_text(json.dumps(plain_loop(model_dir, settings, prepared, steps, log_every)))

    from longtune.train.host_memory import worker_env_vars

    TorchTrainer(train_fn, scaling_config=ScalingConfig(
        num_workers=1, resources_per_worker={"CPU": config.scaling.cpus_per_worker}),
        run_config=RunConfig(name=f"ray-train-only-{os.getpid()}", storage_path=str(out.parent),
                             # the job's worker environment (one malloc arena, train/host_memory.py)
                             worker_runtime_env={"env_vars": worker_env_vars(config.train.retain_host_memory, False)})
                 ).fit()
    return json.loads(out.read_text())


RUNS = ("plain", "ray_train", "job", "job_normal_priority", "job_ray_data", "job_dashboard", "job_malloc")
LABELS = {"plain": "plain loop", "ray_train": "bare TorchTrainer", "job": "finetune job",
          "job_normal_priority": "job, Ray at normal priority", "job_ray_data": "job, Ray Data reads", "job_dashboard": "job + dashboard",
          "job_malloc": "job, glibc defaults"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--attention", nargs="+", default=["s2", "full"], choices=["s2", "full"])
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--ray-train", action="store_true", help="also the plain loop in a bare TorchTrainer")
    p.add_argument("--dashboard", action="store_true", help="also the job with scaling.local_dashboard=true")
    p.add_argument("--ray-data", action="store_true",
                   help="also the job with data.prepared_reader=ray_data (Ray Data streams the blocks)")
    p.add_argument("--normal-priority", action="store_true",
                   help="also the job with scaling.local_ray_idle_priority=false (Ray's processes compete)")
    p.add_argument("--default-malloc", action="store_true",
                   help="also the job with train.retain_host_memory=false (glibc's own malloc thresholds)")
    p.add_argument("--out", default="benchmarks/results/ray_overhead.json")
    # the measurement modes the plain loop and --ray-train run in, each in a fresh process
    p.add_argument("--_only", nargs=4, metavar=("RUN", "MODEL", "PREPARED", "ATTENTION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2 * args.log_every:
        p.error(f"--steps ({args.steps}) must be at least 2 x --log-every ({args.log_every}): the first window is warm-up")
    if args._only:
        run, model_dir, prepared, attention = args._only
        settings = job_settings(model_dir, args.context, attention, args.steps, args.log_every)
        measure = {"plain": plain_loop, "ray_train": ray_train_loop}[run]
        print(json.dumps(measure(model_dir, settings, Path(prepared), args.steps, args.log_every)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="longtune-ray-overhead-"))
    model_dir = save_model(tmp / "model")
    prepared = prepare(model_dir, args.context, tmp / "prepared")
    threads = torch.get_num_threads()
    runs = [r for r in RUNS if {"ray_train": args.ray_train, "job_dashboard": args.dashboard,
                                "job_malloc": args.default_malloc, "job_ray_data": args.ray_data,
                                "job_normal_priority": args.normal_priority}.get(r, True)]
    print(f"Ray's overhead: `longtune finetune` (1 worker, {threads} CPUs) vs a plain loop, {args.context} tokens, "
          f"{args.steps} steps, log every {args.log_every}, {args.passes} passes, {threads} threads, "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for attention in args.attention:
        settings = job_settings(model_dir, args.context, attention, args.steps, args.log_every)
        settings.append(f"data.prepared_path={prepared}")
        results: dict[str, list[dict]] = {r: [] for r in runs}
        for i in range(args.passes):
            for run in runs:  # one after the other, so a slower minute of the machine slows them all
                if run in ("plain", "ray_train"):  # a fresh process, as the job's worker is
                    line = subprocess.run(
                        [sys.executable, __file__, "--context", str(args.context), "--steps", str(args.steps),
                         "--log-every", str(args.log_every), "--_only", run, model_dir, str(prepared), attention],
                        cwd=ROOT, check=True, capture_output=True, text=True,
                        env={**os.environ, "PYTHONWARNINGS": "ignore"}).stdout.strip().splitlines()[-1]
                    result = json.loads(line)
                else:
                    extra = {"job_dashboard": ["scaling.local_dashboard=true"],
                             "job_ray_data": ["data.prepared_reader=ray_data"],
                             "job_normal_priority": ["scaling.local_ray_idle_priority=false"],
                             "job_malloc": ["train.retain_host_memory=false"]}.get(run, [])
                    result = run_job(settings + extra, args.steps, tmp / "mlflow.db", f"{attention}-{run}-{i}",
                                     sample=True)
                results[run].append(result)
            plain = median(results["plain"][-1]["step_s"])
            print(f"  {attention} pass {i + 1}: " + ", ".join(
                f"{LABELS[r]} {median(results[r][-1]['step_s']):.3f} s/step"
                + (f" ({100 * (median(results[r][-1]['step_s']) / plain - 1):+.1f}%)" if r != "plain" else "")
                for r in runs) + f"; the job's step {median(results['job'][-1]['data_wait_s']):.3f} s waiting for "
                f"data, job wall {results['job'][-1]['wall_s']:.0f} s", flush=True)
        row = {"attention": attention, "context": args.context, "steps": args.steps, "threads": threads}
        for run in runs:
            row[f"{run}_step_s"] = median(s for r in results[run] for s in r["step_s"])
            rates = [r["preempted_per_s"] for r in results[run] if r.get("preempted_per_s") is not None]
            row[f"{run}_preempted_per_s"] = median(rates) if rates else None
            if run != "plain":  # the median of the per-pass ratios
                row[f"{run}_overhead_pct"] = 100 * (median(
                    median(r["step_s"]) / median(pl["step_s"]) for r, pl in zip(results[run], results["plain"])) - 1)
        row["overhead_pct"] = row["job_overhead_pct"]
        row["job_wall_s"] = median(j["wall_s"] for j in results["job"])
        row["other_cpu_s"] = results["job"][0]["cpu"]
        for run in ("job_dashboard", "job_ray_data", "job_normal_priority"):
            if run in runs:
                row[f"other_cpu_s_{run[4:]}"] = results[run][0]["cpu"]
        rows.append(row)
    print(f"\n{'attention':9} {'context':>7} {'run':28} {'s/step':>7} {'overhead':>9} {'preempted/s':>11}")
    for r in rows:
        for run in runs:
            over = f"{r[run + '_overhead_pct']:+8.1f}%" if run != "plain" else f"{'':9}"
            rate = r[f"{run}_preempted_per_s"]
            print(f"{r['attention']:9} {r['context']:7d} {LABELS[run]:28} {r[run + '_step_s']:7.3f} {over} "
                  f"{rate if rate is None else round(rate):>11}")
    for r in rows:
        for key, what in (("other_cpu_s", "job"), ("other_cpu_s_ray_data", "job, Ray Data reads"),
                          ("other_cpu_s_dashboard", "job + dashboard"),
                          ("other_cpu_s_normal_priority", "job, Ray at normal priority")):
            top = list(r.get(key, {}).items())[:10]
            if top:
                total = sum(v for k, v in r[key].items() if not k.startswith("ray::RayTrainWorker"))
                print(f"CPU seconds while the {r['attention']} {what} trained, by process (all but the worker: "
                      f"{total:.1f}): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    print(f"wrote {write_json(args.out, {'rows': rows})}")


if __name__ == "__main__":
    main()
