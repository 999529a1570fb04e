"""The cluster head's MLflow server with authentication (clusters/mlflow_server.py), started on
loopback as the YAMLs start it: no account, no server; a request without the account is
refused; longtune logs with the account from MLFLOW_TRACKING_USERNAME/PASSWORD, says in one
line when they are wrong, and writes the password nowhere."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import environment, load_script

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "clusters" / "mlflow_server.py"


def run_server_script(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    return subprocess.run(
        [sys.executable, str(SERVER), "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
         "--artifacts-destination", str(tmp_path / "art"), "--auth-dir", str(tmp_path / "auth")],
        env={**base, **env}, capture_output=True, text=True, timeout=60, check=False,
    )


def test_no_account_no_server(tmp_path):
    done = run_server_script({}, tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "mlflow_server: MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD not set: the tracking "
        "server's account comes from the cluster's secret (clusters/README.md, 'MLflow credentials'); "
        "no default is used"
    ]
    short = run_server_script({"MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": "short"}, tmp_path)
    assert short.returncode == 2 and "is 5 characters; use at least 12" in short.stderr
    assert not (tmp_path / "auth").exists()  # nothing written for a server that never started


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A basic-auth MLflow server on a free loopback port; (url, user, password)."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    (port,) = load_script("clusters/rehearse.py").free_ports(1)
    user, password = "longtune", secrets.token_urlsafe(18)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
         "--artifacts-destination", str(tmp / "artifacts"), "--auth-dir", str(tmp / "auth"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url, user, password
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn workers
        proc.wait(timeout=60)
        log.close()


def test_a_request_without_the_account_is_refused(auth_server):
    url, _, _ = auth_server
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert err.value.code == 401


def test_longtune_logs_with_the_account_and_writes_the_password_nowhere(auth_server, tmp_path):
    from mlflow import MlflowClient

    from longtune.config import load_config
    from longtune.tracking import start_job_run

    url, user, password = auth_server
    config = load_config(None, [f"tracking.tracking_uri={url}", "tracking.system_metrics=false"])
    with environment({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}):
        tracker = start_job_run(config, "authenticated", job="finetune")
        tracker.log_metrics({"loss": 1.5}, 1)
        tracker.end_run("FINISHED")
        client = MlflowClient(url)
        run = client.get_run(tracker.run_id)
        files = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path)))
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == 1.5
    everything = [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    everything += [p.read_text(errors="replace") for p in files.rglob("*") if p.is_file()]
    assert everything and not [text for text in everything if password in text]


def test_a_wrong_password_is_one_line_naming_the_fix(auth_server):
    from longtune.config import load_config
    from longtune.tracking import TrackingError, start_job_run

    url, user, _ = auth_server
    config = load_config(None, [f"tracking.tracking_uri={url}", "tracking.system_metrics=false"])
    with environment({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}):
        with pytest.raises(TrackingError) as err:
            start_job_run(config, "refused", job="finetune")
    assert str(err.value) == (
        f"the MLflow server at {url} refused the account 'longtune' (HTTP 401): set MLFLOW_TRACKING_USERNAME "
        "and MLFLOW_TRACKING_PASSWORD to the server's account (clusters/README.md, 'MLflow credentials')"
    )
