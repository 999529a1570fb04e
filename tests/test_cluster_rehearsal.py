"""The cluster path end to end on this machine (clusters/rehearse.py): `ray start --head` with
token authentication and an MLflow server, `ray job submit --working-dir .` of
pipelines/finetune.py, the job's MLflow run, and a teardown that leaves none of our processes
behind. The job is the embedded default recipe with a tiny model and a tiny corpus, so that
it takes about a minute (the seed model alone takes minutes to build on a cold cache)."""

from __future__ import annotations

import socket

import pytest
from conftest import load_script

pytestmark = pytest.mark.slow


def load_rehearse():
    return load_script("clusters/rehearse.py")


def test_free_ports_are_distinct_and_bindable():
    rehearse = load_rehearse()
    ports = rehearse.free_ports(10)
    assert len(set(ports)) == 10
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_rehearsal_submits_the_default_recipe_and_cleans_up(tmp_path, tiny_model_dir, corpus_dir):
    rehearse = load_rehearse()
    workdir = tmp_path / "rehearsal"

    result = rehearse.rehearse(
        [
            # the embedded default, made small: a tiny model and corpus, two steps
            f"model.name_or_path={tiny_model_dir}", "model.target_context=128",
            f"data.sources=[{corpus_dir}]", "data.min_doc_chars=100", "data.eval_fraction=0.2",
            "train.max_steps=2", "train.warmup_steps=0", "train.log_every=1", "train.checkpoint_every=2",
            "train.batch_size_per_worker=1", "eval.loss_blocks=2", "eval.before_after=false",
            "tracking.system_metrics=false",
        ],
        workdir,
        run_name="rehearsal",
        job_timeout=600,
    )

    assert result.job_status == "SUCCEEDED", result.log_tail
    assert result.submit_returncode == 0
    assert result.unauthenticated_status == 401  # token authentication is on
    run = result.run
    assert run is not None, "no MLflow run named rehearsal"
    assert run["status"] == "FINISHED"
    assert {"train/loss", "eval/loss", "train/tokens_per_s"} <= set(run["metrics"])
    assert {"adapter", "config.yaml"} <= set(run["artifacts"])  # through the server's artifact proxy
    # the job ran in the working dir it uploaded and wrote where it was told
    assert list((workdir / "checkpoints" / "rehearsal").glob("checkpoint_*/adapter/adapter_config.json"))
    assert (workdir / "mlflow.db").is_file()

    # nothing of ours is left: no raylet, GCS, dashboard, worker, driver or MLflow server
    assert len(result.processes) >= 8  # the tree was found: GCS, raylet, dashboard, agents, ...
    assert not rehearse.still_running(result.processes)
