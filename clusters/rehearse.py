"""A cluster rehearsal on this machine, no cloud: the path of clusters/*.yaml, end to end.

    python clusters/rehearse.py [KEY=VALUE ...]

does what `ray up` + `ray job submit` do on a cluster, locally: starts an MLflow tracking
server (SQLite, local artifacts: the stand-in for the bucket) and a Ray head with token
authentication and MLFLOW_TRACKING_URI in its environment, as the cluster YAMLs' head does;
submits `python pipelines/finetune.py KEY=VALUE ...` with `ray job submit --working-dir .`;
checks that the job succeeded and that its MLflow run finished; then stops exactly the
processes it started. With no arguments the job is the embedded default recipe.

Everything it starts is its own: a fresh token (never ~/.ray/auth_token), free ports, its own
Ray temp directory (so no other program's `ray.init()` finds this cluster through
/tmp/ray/ray_current_cluster), and it never runs `ray stop`, which would stop every Ray on
the machine. tests/test_cluster_rehearsal.py runs it with a tiny model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `ray` and `mlflow`, next to this Python


class RehearsalError(RuntimeError):
    """A step of the rehearsal failed; the message says which and shows the relevant log."""


@dataclass
class Rehearsal:
    job_status: str
    submit_returncode: int
    job_seconds: float
    unauthenticated_status: int  # what the job server answers a request without the token
    run: dict | None  # the job's MLflow run: name, status, metric keys
    log_tail: str
    leftover_pids: list[int] = field(default_factory=list)  # outlived their parent; stopped
    processes: list[tuple[int, float]] = field(default_factory=list)  # (pid, start time) of all ours


def free_ports(n: int) -> list[int]:
    """n distinct ports that are free right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the rehearsal itself dies (Linux), so a killed
    test run cannot leave a Ray head behind. `ray start --block` then stops its processes."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _http(url: str, token: str | None = None, timeout: float = 5.0) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalCluster:
    """An MLflow server and a `ray start --head --block` on this machine, both ours alone.

    Use as a context manager; on exit every process it started, and every process those
    started, is stopped (SIGTERM, then SIGKILL by PID) and its temp directory removed."""

    def __init__(self, workdir: Path, num_cpus: int = 4, start_timeout: float = 120.0):
        self.workdir = Path(workdir)
        self.num_cpus = num_cpus
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(32)
        self.mlflow_port, self.gcs_port, self.dashboard_port, *self._other_ports = free_ports(10)
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self._procs: list[subprocess.Popen] = []
        self._mlflow: subprocess.Popen | None = None
        self._temp_dir: str | None = None
        self.leftover_pids: list[int] = []
        self.processes: list[tuple[int, float]] = []  # every process we started, found at exit

    # ------------------------------------------------------------------ environment

    def client_env(self) -> dict[str, str]:
        """What `ray job submit` needs: the token (ours, not ~/.ray/auth_token) and token mode."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def _head_env(self) -> dict[str, str]:
        env = self.client_env()
        # As on the cluster head: job drivers inherit the tracking server's address.
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        # A job's `python` is this environment's Python, as the image's is on a cluster.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        # Stop at once on SIGTERM instead of draining for up to 30 s (nothing to drain here).
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    # ------------------------------------------------------------------ start

    def __enter__(self) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under
        # the 107-byte AF_UNIX limit: a short directory under /tmp, not pytest's tmp_path.
        self._temp_dir = tempfile.mkdtemp(prefix="ltr-", dir="/tmp")
        try:
            self._start_mlflow()
            self._start_ray()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_mlflow(self) -> None:
        log = self.workdir / "mlflow-server.log"
        cmd = [
            str(BIN / "mlflow"), "server",
            "--backend-store-uri", f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
            "--artifacts-destination", str((self.workdir / "mlflow-artifacts").resolve()),
            "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
        ]
        self._mlflow = self._spawn(cmd, log, env=self.client_env())
        self._wait(lambda: _http(f"{self.tracking_uri}/health")[0] == 200, "the MLflow server", log)

    def _start_ray(self) -> None:
        log = self.workdir / "ray-head.log"
        client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = self._other_ports
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block",
            "--temp-dir", self._temp_dir,
            # Ray replaces 127.0.0.1 with the machine's address for its own services; the
            # dashboard, which takes jobs, listens on loopback only.
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--num-cpus", str(self.num_cpus), "--disable-usage-stats",
            "--port", str(self.gcs_port), "--dashboard-port", str(self.dashboard_port),
            # Every port Ray would otherwise take at a fixed default (52365, 10001, ...), where
            # another Ray on this machine may already be.
            "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env),
            "--metrics-export-port", str(metrics),
            "--node-manager-port", str(node_manager),
            "--object-manager-port", str(object_manager),
        ]
        self._spawn(cmd, log, env=self._head_env())
        # Up when the job server answers an authenticated request.
        self._wait(lambda: _http(f"{self.dashboard_url}/api/jobs/", self.token)[0] == 200, "the Ray head", log)

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.workdir, start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 (a prctl call, no locks taken)
            )
        self._procs.append(proc)
        return proc

    def _wait(self, ready, what: str, log: Path) -> None:
        proc = self._procs[-1]
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RehearsalError(f"{what} exited with code {proc.returncode}:\n{_tail(log)}")
            try:
                if ready():
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        raise RehearsalError(f"{what} did not come up in {self.start_timeout:.0f} s:\n{_tail(log)}")

    # ------------------------------------------------------------------ jobs

    def submit(self, entrypoint: list[str], submission_id: str, timeout: float) -> tuple[int, str]:
        """`ray job submit --working-dir <repo> -- ENTRYPOINT` against this head, following the
        logs to the end. Returns the CLI's exit code (0 = the job succeeded) and its output."""
        cmd = [
            str(BIN / "ray"), "job", "submit", "--address", self.dashboard_url,
            "--submission-id", submission_id, "--working-dir", ".", "--", *entrypoint,
        ]
        try:
            done = subprocess.run(
                cmd, cwd=ROOT, env=self.client_env(), capture_output=True, text=True, timeout=timeout,
                check=False,  # the exit code is the job's outcome, reported to the caller
            )
        except subprocess.TimeoutExpired as exc:
            _http_post(f"{self.dashboard_url}/api/jobs/{submission_id}/stop", self.token)
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
            raise RehearsalError(f"job {submission_id} did not finish in {timeout:.0f} s:\n{output[-4000:]}") from None
        return done.returncode, done.stdout + done.stderr

    def job_status(self, submission_id: str) -> str:
        code, body = _http(f"{self.dashboard_url}/api/jobs/{submission_id}", self.token)
        if code != 200:
            raise RehearsalError(f"job server answered {code} for job {submission_id}: {body[:500]}")
        return json.loads(body)["status"]

    # ------------------------------------------------------------------ stop

    def __exit__(self, *exc) -> None:
        # Everything our processes started, found now, while the tree is intact: Ray's workers
        # start their own sessions, so a process group would miss them.
        tree = []
        for proc in self._procs:
            tree += _descendants(proc.pid)
        self.processes = [(p.pid, p.create_time()) for p in tree if _alive(p)]
        self.processes += [(p.pid, _create_time(p.pid)) for p in self._procs if p.poll() is None]
        for proc in reversed(self._procs):  # Ray first, then the MLflow server it reports to
            _stop(proc, group=proc is self._mlflow)
        # Give the rest a moment to exit on their own (Ray's workers notice the raylet is
        # gone), then stop by PID whatever has not; those PIDs are reported.
        self.leftover_pids = _stop_all(tree)
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen, group: bool) -> None:
    """SIGTERM, SIGKILL after a minute. `ray start --block` stops Ray's processes itself on
    SIGTERM; `mlflow server` does not stop its uvicorn workers, so with `group` the signal
    goes to the process's whole group (its own: start_new_session)."""
    if proc.poll() is not None:
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig) if group else proc.send_signal(sig)

    send(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=10)


def _http_post(url: str, token: str) -> None:
    request = urllib.request.Request(url, method="POST", headers={"Authorization": f"Bearer {token}"})
    with contextlib.suppress(OSError):
        urllib.request.urlopen(request, timeout=10).close()


def _alive(process) -> bool:
    import psutil

    try:
        process.create_time()
        return True
    except psutil.Error:
        return False


def _create_time(pid: int) -> float:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def still_running(processes: list[tuple[int, float]]) -> list[int]:
    """Those of (pid, start time) that still run: same PID and same start time, so a PID the
    system has since given to another program does not count."""
    import psutil

    running = []
    for pid, started in processes:
        try:
            process = psutil.Process(pid)
            if process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE:
                running.append(pid)
        except psutil.Error:
            pass
    return running


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop_all(processes: list, grace: float = 10.0) -> list[int]:
    """Wait up to `grace` seconds for `processes` to exit, then stop those still running
    (psutil checks each is the same process, not a reused PID). Returns their PIDs."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(still, timeout=grace)
    return [p.pid for p in alive]


def mlflow_run(tracking_uri: str, run_name: str) -> dict | None:
    """The newest MLflow run called `run_name` in any experiment, or None."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments, filter_string=f"attributes.run_name = '{run_name}'", order_by=["start_time DESC"]
    )
    if not runs:
        return None
    run = runs[0]
    return {
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "metrics": sorted(run.data.metrics),
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)),
    }


def rehearse(overrides: list[str], workdir: Path, run_name: str = "rehearsal", num_cpus: int = 4,
             job_timeout: float = 1800.0) -> Rehearsal:
    """The whole rehearsal: start, submit `pipelines/finetune.py OVERRIDES`, check, stop."""
    workdir = Path(workdir).resolve()
    # Absolute, as the job runs in Ray's copy of the working dir; a local path stands in for
    # the bucket the cluster YAMLs use.
    overrides = [f"train.storage_path={workdir / 'checkpoints'}", f"train.run_name={run_name}", *overrides]
    submission_id = f"rehearsal-{secrets.token_hex(4)}"
    with LocalCluster(workdir, num_cpus=num_cpus) as cluster:
        unauthenticated, _ = _http(f"{cluster.dashboard_url}/api/jobs/")
        start = time.monotonic()
        code, output = cluster.submit(["python", "pipelines/finetune.py", *overrides], submission_id, job_timeout)
        seconds = time.monotonic() - start
        status = cluster.job_status(submission_id)
        run = mlflow_run(cluster.tracking_uri, run_name)
    return Rehearsal(
        job_status=status, submit_returncode=code, job_seconds=seconds,
        unauthenticated_status=unauthenticated, run=run, log_tail=output[-6000:],
        leftover_pids=cluster.leftover_pids, processes=cluster.processes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="section.key=value for pipelines/finetune.py")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "rehearsal"),
                        help="MLflow database, artifacts, checkpoints and logs (default: %(default)s)")
    parser.add_argument("--run-name", default="rehearsal")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        result = rehearse(args.overrides, Path(args.workdir), args.run_name, args.num_cpus)
    except RehearsalError as err:
        print(f"rehearsal failed: {err}", file=sys.stderr)
        return 1
    print(result.log_tail)
    print(f"\njob: {result.job_status} (ray job submit exit code {result.submit_returncode}) "
          f"in {result.job_seconds:.0f} s; rehearsal {time.monotonic() - started:.0f} s in all")
    print(f"request without the token: HTTP {result.unauthenticated_status}")
    print(f"MLflow run: {json.dumps(result.run, indent=1) if result.run else 'none found'}")
    if result.leftover_pids:
        print(f"stopped processes that outlived Ray's shutdown: {result.leftover_pids}")
    left = still_running(result.processes)
    if left:
        print(f"still running after the rehearsal (stop them by PID): {left}", file=sys.stderr)
    ok = result.job_status == "SUCCEEDED" and result.run is not None and result.run["status"] == "FINISHED"
    ok = ok and not left
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
