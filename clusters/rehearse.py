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


class ObjectStore:
    """An S3-compatible object store on loopback: moto's server mode, which checks every
    request's signature against its IAM users, with one user (full access), its keys and one
    bucket. The stand-in for S3 or MinIO: clients reach it through AWS_ENDPOINT_URL and the
    standard AWS credential variables (``env()``), exactly as they would reach MinIO.

    Use as a context manager; on exit the server stops (its data lives in its memory only)."""

    BOOTSTRAP_REQUESTS = 3  # unauthenticated: create the user, its policy, its keys

    def __init__(self, workdir: Path, bucket: str = "longtune-rehearsal", start_timeout: float = 60.0):
        self.workdir = Path(workdir)
        self.bucket = bucket
        self.start_timeout = start_timeout
        (self.port,) = free_ports(1)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = self.secret_key = ""
        self._proc: subprocess.Popen | None = None

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def env(self) -> dict[str, str]:
        """What every client of the store needs: the same variables a MinIO user sets."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            # no instance-metadata lookups on a machine that is no EC2 instance
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def __enter__(self) -> ObjectStore:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = self.workdir / "object-store.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.BOOTSTRAP_REQUESTS)  # then every request is checked
        with open(log, "wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
            )
        try:
            deadline = time.monotonic() + self.start_timeout
            while _http_or_none(f"{self.endpoint}/moto-api/") is None:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RehearsalError(f"the object store did not come up:\n{_tail(log)}")
                time.sleep(0.3)
            self._bootstrap()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _bootstrap(self) -> None:
        import boto3

        anonymous = {"aws_access_key_id": "bootstrap", "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1", **anonymous)
        iam.create_user(UserName="longtune")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="longtune", PolicyName="all", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="longtune")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        self.client().create_bucket(Bucket=self.bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)

    def upload_dir(self, local: Path, prefix: str) -> str:
        """Copy a local directory below ``prefix`` in the bucket; its s3:// URI."""
        client = self.client()
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return self.uri(prefix)

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [o["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix) for o in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            _stop(self._proc, group=True)


def _http_or_none(url: str) -> int | None:
    try:
        return _http(url, timeout=2)[0]
    except OSError:
        return None


class LocalCluster:
    """An MLflow server (with authentication) and a `ray start --head --block` on this
    machine, all ours alone; with ``nodes=2`` a second Ray node joins the head (`ray start
    --address`, its own temp directory and ports), and with ``store`` every process gets the
    object store's endpoint and credentials, and MLflow keeps its artifacts there.

    Use as a context manager; on exit every process it started, and every process those
    started, is stopped (SIGTERM, then SIGKILL by PID) and its temp directories removed."""

    def __init__(self, workdir: Path, num_cpus: int = 4, start_timeout: float = 120.0, *,
                 nodes: int = 1, node_cpus: int | None = None, store: ObjectStore | None = None):
        self.workdir = Path(workdir)
        self.num_cpus = num_cpus
        self.node_cpus = node_cpus or num_cpus
        self.nodes = nodes
        self.store = store
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(32)
        # the secret a user would put in the cluster's secret store: ours, never a default
        self.mlflow_user, self.mlflow_password = "rehearsal", secrets.token_urlsafe(24)
        self.mlflow_port, self.gcs_port, self.dashboard_port, *self._other_ports = free_ports(10)
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        self._procs: list[subprocess.Popen] = []
        self._mlflow: subprocess.Popen | None = None
        self._temp_dirs: list[str] = []
        self._node_procs: dict[int, subprocess.Popen] = {}  # node number (2, ...) -> its `ray start`
        self._killed: list = []  # processes of nodes we killed (psutil), for the final check
        self.leftover_pids: list[int] = []
        self.processes: list[tuple[int, float]] = []  # every process we started, found at exit

    # ------------------------------------------------------------------ environment

    def client_env(self) -> dict[str, str]:
        """What `ray job submit` needs: the token (ours, not ~/.ray/auth_token) and token mode."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        return env

    def mlflow_credentials(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_USERNAME": self.mlflow_user, "MLFLOW_TRACKING_PASSWORD": self.mlflow_password}

    def _node_env(self) -> dict[str, str]:
        """The environment of every Ray node, as the cluster YAMLs set it: the tracking
        server's address and account, and the object store's endpoint and credentials."""
        env = self.client_env()
        # As on the cluster head: job drivers inherit the tracking server's address.
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        env.update(self.mlflow_credentials())
        if self.store is not None:
            env.update(self.store.env())
        # A job's `python` is this environment's Python, as the image's is on a cluster.
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        # Stop at once on SIGTERM instead of draining for up to 30 s (nothing to drain here).
        env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
        # A node that stops answering is dead after 3 missed 1 s health checks (Ray's
        # defaults: 5 missed 3 s checks), so a lost node costs seconds, not half a minute.
        env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
                   RAY_health_check_failure_threshold="3")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    _head_env = _node_env

    # ------------------------------------------------------------------ start

    def __enter__(self) -> LocalCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) must stay under
        # the 107-byte AF_UNIX limit: a short directory under /tmp, not pytest's tmp_path.
        self._temp_dirs.append(tempfile.mkdtemp(prefix="ltr-", dir="/tmp"))
        try:
            self._start_mlflow()
            self._start_ray()
            for node in range(2, self.nodes + 1):
                self.start_node(node)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_mlflow(self) -> None:
        log = self.workdir / "mlflow-server.log"
        artifacts = self.store.uri("mlflow-artifacts") if self.store else str((self.workdir / "mlflow-artifacts").resolve())
        # the head's server as the cluster YAMLs start it: clusters/mlflow_server.py, the
        # basic-auth app with the account from the secret
        cmd = [
            sys.executable, str(ROOT / "clusters" / "mlflow_server.py"),
            "--backend-store-uri", f"sqlite:///{(self.workdir / 'mlflow.db').resolve()}",
            "--artifacts-destination", artifacts, "--auth-dir", str((self.workdir / "mlflow-auth").resolve()),
            "--host", "127.0.0.1", "--port", str(self.mlflow_port), "--workers", "1",
        ]
        env = {**self.client_env(), **self.mlflow_credentials(), **(self.store.env() if self.store else {})}
        self._mlflow = self._spawn(cmd, log, env=env)
        self._wait(lambda: _http(f"{self.tracking_uri}/health")[0] == 200, "the MLflow server", log)

    def _start_ray(self) -> None:
        log = self.workdir / "ray-head.log"
        client, agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = self._other_ports
        cmd = [
            str(BIN / "ray"), "start", "--head", "--block",
            "--temp-dir", self._temp_dirs[0],
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
        self._spawn(cmd, log, env=self._node_env())
        # Up when the job server answers an authenticated request.
        self._wait(lambda: _http(f"{self.dashboard_url}/api/jobs/", self.token)[0] == 200, "the Ray head", log)

    # ------------------------------------------------------------------ more nodes

    def start_node(self, node: int) -> None:
        """Node ``node`` (2, 3, ...) joins the head: `ray start --address`, as a cluster's
        worker node does, with its own temp directory and ports, ``node_cpus`` CPUs and a
        resource ``rehearsal_node_<node>`` naming it. Returns once the head counts it alive."""
        log = self.workdir / f"ray-node-{node}.log"
        temp_dir = tempfile.mkdtemp(prefix=f"ltr{node}-", dir="/tmp")
        self._temp_dirs.append(temp_dir)
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        cmd = [
            str(BIN / "ray"), "start", "--address", f"127.0.0.1:{self.gcs_port}", "--block",
            "--temp-dir", temp_dir, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(self.node_cpus), "--resources", json.dumps({f"rehearsal_node_{node}": 1}),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        ]
        alive_before = self.alive_nodes()
        self._node_procs[node] = self._spawn(cmd, log, env=self._node_env())
        self._wait(lambda: self.alive_nodes() > alive_before, f"Ray node {node}", log)

    def alive_nodes(self) -> int:
        code, body = _http(f"{self.dashboard_url}/api/v0/nodes?limit=100", self.token)
        if code != 200:
            return 0
        nodes = json.loads(body)["data"]["result"]["result"]
        return sum(1 for n in nodes if n.get("state") == "ALIVE")

    def kill_node(self, node: int) -> dict[int, str]:
        """The node dies at once, as a machine that loses power: SIGKILL to its `ray start`,
        its raylet and every process they started (training worker, Ray Data tasks), and to
        nothing else. Returns their PIDs and names (``ray::RayTrainWorker``, ...)."""
        import psutil

        proc = self._node_procs[node]
        victims = [psutil.Process(proc.pid), *_descendants(proc.pid)]
        names = {}
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                names[victim.pid] = victim.name()
        for victim in victims:
            with contextlib.suppress(psutil.Error):
                victim.kill()
        psutil.wait_procs(victims, timeout=10)
        self._killed += victims
        return names

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
        for temp_dir in self._temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


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


def mlflow_run(tracking_uri: str, run_name: str, credentials: dict[str, str] | None = None,
               artifacts: bool = True) -> dict | None:
    """The newest MLflow run called `run_name` in any experiment, or None. ``credentials``:
    MLFLOW_TRACKING_USERNAME/PASSWORD of a server with authentication."""
    from mlflow import MlflowClient

    os.environ.update(credentials or {})  # MLflow's client reads its account from the environment
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
        "artifacts": sorted(a.path for a in client.list_artifacts(run.info.run_id)) if artifacts else [],
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
        run = mlflow_run(cluster.tracking_uri, run_name, cluster.mlflow_credentials())
    return Rehearsal(
        job_status=status, submit_returncode=code, job_seconds=seconds,
        unauthenticated_status=unauthenticated, run=run, log_tail=output[-6000:],
        leftover_pids=cluster.leftover_pids, processes=cluster.processes,
    )


@dataclass
class ClusterRehearsal:
    """What the two-node rehearsal with an object store saw, job by job."""

    jobs: dict[str, tuple[int, str]]  # job -> (ray job submit exit code, output)
    run: dict | None  # the finetune job's MLflow run
    steps_logged: dict[int, int]  # train/loss: step -> how many times it is in the history
    killed_at_step: int | None  # the last step MLflow had when node 2 was killed
    killed: dict[int, str]  # PID -> name of every process of node 2 that was killed
    resumed_from_step: int | None
    redone_steps: int | None
    checkpoint_every: int
    store_keys: list[str]  # every object in the bucket at the end
    unauthenticated_mlflow_status: int  # what the MLflow server answers a request without the account
    unauthenticated_ray_status: int  # what the job server answers a request without the token
    leaked: list[str]  # where a credential was found: params, tags, artifacts, job output
    leftover_pids: list[int] = field(default_factory=list)
    processes: list[tuple[int, float]] = field(default_factory=list)


def stdlib_corpus(target: Path, files: int = 120) -> Path:
    """A corpus directory of this Python's own standard-library modules (the first ``files``
    of them by name): the data the rehearsal uploads to the bucket."""
    root = Path(os.__file__).parent
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(root.glob("*.py"))[:files]:
        shutil.copyfile(path, target / path.name)
    return target


def rehearse_cluster(overrides: list[str], workdir: Path, corpus: Path | None = None, run_name: str = "rehearsal",
                     *, lose_node: bool = True, export: bool = True, max_steps: int = 20, checkpoint_every: int = 5,
                     job_timeout: float = 900.0) -> ClusterRehearsal:
    """The cluster path across two Ray nodes with an S3-compatible store (``--nodes 2 --s3``):

    1. the corpus goes into the bucket; 2. a finetune with a local train.storage_path is
    refused (two nodes); 3. `prepare_data.py` reads s3://.../corpus and writes the prepared
    dataset to s3://.../prepared; 4. `finetune.py` trains two workers, one per node, from
    it, with checkpoints in s3://.../checkpoints, and (``lose_node``) node 2 is killed once
    the first checkpoint is in and training has gone on, then started again; 5. `export.py`
    merges the final checkpoint from the bucket and writes the model to s3://.../export
    (unless not ``export``). MLflow runs with authentication and keeps its artifacts in the
    bucket."""
    workdir = Path(workdir).resolve()
    corpus = corpus or stdlib_corpus(workdir / "corpus")
    jobs: dict[str, tuple[int, str]] = {}
    with ObjectStore(workdir) as store, \
            LocalCluster(workdir, num_cpus=3, node_cpus=3, nodes=2, store=store) as cluster:
        # Each node fits one training worker (2 of its 3 CPUs) and never two; the third CPU
        # of each node is Ray Data's.
        scaling = ["scaling.num_workers=2", "scaling.cpus_per_worker=2"]

        def submit(job: str, script: str, args: list[str], submission_id: str | None = None) -> tuple[int, str]:
            jobs[job] = cluster.submit(["python", f"pipelines/{script}", *args],
                                       submission_id or f"{job}-{secrets.token_hex(4)}", job_timeout)
            return jobs[job]

        corpus_uri = store.upload_dir(corpus, "corpus")
        prepared, checkpoints = store.uri("prepared"), store.uri("checkpoints")
        submit("local-storage", "finetune.py", [
            *overrides, *scaling, f"data.sources=[{corpus_uri}]", f"train.storage_path={workdir / 'local-checkpoints'}",
            "train.run_name=refused", "train.max_steps=1",
        ])
        code, _ = submit("prepare", "prepare_data.py", [*overrides, f"data.sources=[{corpus_uri}]",
                                                          f"data.prepared_path={prepared}"])
        if code != 0:
            raise RehearsalError(f"prepare_data.py failed:\n{jobs['prepare'][1][-4000:]}")

        finetune_id = f"finetune-{secrets.token_hex(4)}"
        watcher = _NodeLoss(cluster, run_name, checkpoint_every, finetune_id) if lose_node else None
        if watcher:
            watcher.start()
        submit("finetune", "finetune.py", submission_id=finetune_id, args=[
            *overrides, *scaling, f"data.prepared_path={prepared}", f"train.storage_path={checkpoints}",
            f"train.run_name={run_name}", f"train.max_steps={max_steps}", f"train.checkpoint_every={checkpoint_every}",
            "train.log_every=1", "train.max_failures=2",
        ])
        if watcher:
            watcher.stop()
            if watcher.error:
                raise RehearsalError(f"losing node 2 failed: {watcher.error}")
        final = _last_checkpoint(store, f"checkpoints/{run_name}")
        if final and export:
            submit("export", "export.py", [
                *overrides, f"model.adapter_path={store.uri(final)}", f"export.output_dir={store.uri('export')}",
            ])
        run = mlflow_run(cluster.tracking_uri, run_name, cluster.mlflow_credentials())
        counts, resumed, redone = _step_counts(cluster, run)
        unauthenticated = _http(f"{cluster.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1")[0]
        unauthenticated_ray = _http(f"{cluster.dashboard_url}/api/jobs/")[0]
        secrets_to_find = [cluster.mlflow_password, store.secret_key]
        leaked = _leaks(cluster, run, jobs, secrets_to_find, store)
        keys = store.keys()
    return ClusterRehearsal(
        jobs=jobs, run=run, steps_logged=counts, killed_at_step=watcher.killed_at_step if watcher else None,
        killed=watcher.killed if watcher else {}, resumed_from_step=resumed, redone_steps=redone,
        checkpoint_every=checkpoint_every, store_keys=keys, unauthenticated_mlflow_status=unauthenticated,
        unauthenticated_ray_status=unauthenticated_ray,
        leaked=leaked, leftover_pids=cluster.leftover_pids, processes=cluster.processes,
    )


def _last_checkpoint(store: ObjectStore, prefix: str) -> str | None:
    """The key prefix of the checkpoint with the highest step below ``prefix``."""
    best: tuple[int, str] | None = None
    for key in store.keys(f"{prefix}/"):
        if key.endswith("/state.json"):
            step = json.loads(store.read(key))["step"]
            if best is None or step > best[0]:
                best = (step, key.removesuffix("/state.json"))
    return best[1] if best else None


class _NodeLoss:
    """In the background: once the run's MLflow history is past its first checkpoint (so the
    checkpoint is registered and training goes on), kill node 2; once the head counts it
    dead, start it again."""

    def __init__(self, cluster: LocalCluster, run_name: str, checkpoint_every: int, submission_id: str):
        import threading

        self.cluster, self.run_name, self.after = cluster, run_name, checkpoint_every
        self.submission_id = submission_id
        self.killed_at_step: int | None = None
        self.killed: dict[int, str] = {}
        self._run_id: str | None = None  # the run, once it exists
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=180)

    def _last_step(self) -> int | None:
        if self._run_id is None:
            run = mlflow_run(self.cluster.tracking_uri, self.run_name, self.cluster.mlflow_credentials(),
                             artifacts=False)
            if run is None:
                return None
            self._run_id = run["run_id"]
        history = _client(self.cluster).get_metric_history(self._run_id, "train/loss")
        return max((m.step for m in history), default=None)

    def _run(self) -> None:
        try:
            while not self._stop.wait(1.0):
                step = self._last_step()
                if step is not None and step > self.after:
                    self.killed = self.cluster.kill_node(2)
                    self.killed_at_step = step
                    break
            else:
                return
            deadline = time.monotonic() + 120
            while self.cluster.alive_nodes() > 1:
                if time.monotonic() > deadline:
                    raise RehearsalError("the head still counts node 2 alive 120 s after it was killed")
                time.sleep(0.5)
            self.cluster.start_node(2)
            # This thread stays until the job ends: the node's `ray start` gets SIGTERM when
            # the thread that started it exits (PR_SET_PDEATHSIG follows the thread).
            self._stop.wait()
        except Exception as exc:  # noqa: BLE001 (reported by the rehearsal)
            self.error = f"{type(exc).__name__}: {exc}"
            # the job would wait for node 2 forever: stop it
            _http_post(f"{self.cluster.dashboard_url}/api/jobs/{self.submission_id}/stop", self.cluster.token)


def _client(cluster: LocalCluster):
    from mlflow import MlflowClient

    os.environ.update(cluster.mlflow_credentials())  # MLflow's client reads its account from here
    return MlflowClient(cluster.tracking_uri)


def _step_counts(cluster: LocalCluster, run: dict | None) -> tuple[dict[int, int], int | None, int | None]:
    if run is None:
        return {}, None, None
    client = _client(cluster)
    counts: dict[int, int] = {}
    for m in client.get_metric_history(run["run_id"], "train/loss"):
        counts[m.step] = counts.get(m.step, 0) + 1
    resumed = [m.value for m in client.get_metric_history(run["run_id"], "train/resumed_from_step")]
    redone = [m.value for m in client.get_metric_history(run["run_id"], "train/redone_steps")]
    return counts, int(resumed[-1]) if resumed else None, int(redone[-1]) if redone else None


def _leaks(cluster: LocalCluster, run: dict | None, jobs: dict[str, tuple[int, str]], values: list[str],
           store: ObjectStore) -> list[str]:
    """Where any of ``values`` appears: the run's params and tags, the jobs' output, and every
    object in the bucket (MLflow's artifacts, checkpoints, prepared data, the export). The
    bucket is read directly: MLflow's client downloads artifacts through presigned URLs,
    which moto's signature checks do not accept (real S3 and MinIO do)."""
    found = [f"job {name} output" for name, (_, out) in jobs.items() if any(v in out for v in values)]
    if run is not None:
        data = _client(cluster).get_run(run["run_id"]).data
        for kind, items in (("param", data.params), ("tag", data.tags)):
            found += [f"{kind} {k}" for k, v in items.items() if any(s in f"{k}={v}" for s in values)]
    for key in store.keys():
        body = store.read(key)
        if any(v.encode() in body for v in values):
            found.append(f"object {key}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="section.key=value for pipelines/finetune.py")
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "rehearsal"),
                        help="MLflow database, artifacts, checkpoints and logs (default: %(default)s)")
    parser.add_argument("--run-name", default="rehearsal")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                        help="2: a second Ray node joins, one training worker on each (needs --s3)")
    parser.add_argument("--s3", action="store_true",
                        help="an S3-compatible store on loopback for the corpus, the prepared data, the "
                        "checkpoints, the export and MLflow's artifacts")
    parser.add_argument("--keep-node", action="store_true", help="with --nodes 2: do not kill node 2 mid-run")
    parser.add_argument("--corpus", type=Path, help="with --s3: a directory of text files to upload "
                        "(default: 120 of this Python's standard-library modules)")
    args = parser.parse_args(argv)
    if args.nodes == 2 or args.s3:
        if not (args.nodes == 2 and args.s3):
            parser.error("--nodes 2 and --s3 go together: a run on two nodes needs shared storage")
        return _main_cluster(args)

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


def cluster_problems(result: ClusterRehearsal, lose_node: bool = True, export: bool = True) -> list[str]:
    """What the two-node rehearsal got wrong, one line each; empty when it all held."""
    problems = []
    if result.unauthenticated_ray_status != 401:
        problems.append(f"the job server answered a request without the token with HTTP {result.unauthenticated_ray_status}")
    code, out = result.jobs.get("local-storage", (0, ""))
    if code == 0 or "is local, but the cluster has 2 nodes" not in out:
        problems.append(f"a local train.storage_path on two nodes was not refused (exit code {code}):\n{out[-2000:]}")
    for job in ("prepare", "finetune", *(("export",) if export else ())):
        if result.jobs.get(job, (1, ""))[0] != 0:
            problems.append(f"job {job} failed:\n{result.jobs.get(job, (1, 'never submitted'))[1][-3000:]}")
    if result.run is None or result.run["status"] != "FINISHED":
        problems.append(f"the finetune run did not finish in MLflow: {result.run}")
    twice = sorted(step for step, n in result.steps_logged.items() if n > 1)
    if twice:
        problems.append(f"steps logged more than once: {twice}")
    if lose_node:
        if result.killed_at_step is None:
            problems.append("node 2 was never killed (the run ended before its first checkpoint was passed)")
        elif "ray::RayTrainWorker" not in result.killed.values():
            problems.append(f"no training worker ran on node 2 (its processes: {sorted(set(result.killed.values()))})")
        elif result.resumed_from_step is None:
            problems.append("the run did not resume from a checkpoint after node 2 was lost")
        elif result.killed_at_step - result.resumed_from_step > result.checkpoint_every:
            problems.append(f"resumed from step {result.resumed_from_step} after being at step "
                            f"{result.killed_at_step}: more than one checkpoint interval redone")
    if export and not any(k.startswith("export/") and k.endswith("longtune_export.json") for k in result.store_keys):
        problems.append("no export in the bucket")
    if not any(k.startswith("mlflow-artifacts/") for k in result.store_keys):
        problems.append("no MLflow artifacts in the bucket")
    if result.unauthenticated_mlflow_status != 401:
        problems.append(f"MLflow answered a request without credentials with HTTP {result.unauthenticated_mlflow_status}")
    if result.leaked:
        problems.append(f"a credential appears in: {', '.join(result.leaked)}")
    left = still_running(result.processes)
    if left:
        problems.append(f"still running after the rehearsal (stop them by PID): {left}")
    return problems


def _main_cluster(args) -> int:
    started = time.monotonic()
    try:
        result = rehearse_cluster(args.overrides, Path(args.workdir), args.corpus, args.run_name,
                                  lose_node=not args.keep_node)
    except RehearsalError as err:
        print(f"rehearsal failed: {err}", file=sys.stderr)
        return 1
    print(result.jobs.get("finetune", (0, ""))[1][-4000:])
    for job, (code, _) in result.jobs.items():
        print(f"job {job}: exit code {code}")
    if result.killed_at_step is not None:
        print(f"node 2 killed at step {result.killed_at_step} ({len(result.killed)} processes, a training "
              f"worker among them: {'ray::RayTrainWorker' in result.killed.values()}); resumed "
              f"from step {result.resumed_from_step}, steps redone: {result.redone_steps}")
    print(f"steps in MLflow: {len(result.steps_logged)}, each once: {all(n == 1 for n in result.steps_logged.values())}")
    print(f"objects in the bucket: {len(result.store_keys)}; MLflow without credentials: HTTP "
          f"{result.unauthenticated_mlflow_status}; rehearsal {time.monotonic() - started:.0f} s in all")
    problems = cluster_problems(result, lose_node=not args.keep_node)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
