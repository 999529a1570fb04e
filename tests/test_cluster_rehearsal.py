"""The cluster path end to end on this machine (clusters/rehearse.py --nodes 2 --s3): a Ray
head with token authentication and a second node joined with `ray start --address`, an
S3-compatible store and an MLflow server with authentication, all on loopback; `ray job
submit --working-dir .` of prepare_data.py and finetune.py through s3://, a node lost
mid-run, and a teardown that leaves none of our processes behind. The jobs use a tiny model
and corpus; the whole test takes about five minutes on a 2-core machine (it is the suite's
one multi-node test: the single-node `python clusters/rehearse.py` path is the same
LocalCluster without the second node and the store)."""

from __future__ import annotations

import socket
from pathlib import Path

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


def test_two_nodes_with_an_object_store_survive_a_lost_node(tmp_path, tiny_model_dir, corpus_dir):
    """`clusters/rehearse.py --nodes 2 --s3`, with a tiny model: two Ray nodes, one training
    worker on each; the corpus, prepared data, checkpoints, export and MLflow's artifacts in
    an S3-compatible store (moto, authentication enforced); node 2 killed after the first
    checkpoint and started again; MLflow with authentication."""
    rehearse = load_rehearse()
    result = rehearse.rehearse_cluster(
        [f"model.name_or_path={tiny_model_dir}", "model.target_context=128", "data.min_doc_chars=100",
         "data.eval_fraction=0.2", "train.warmup_steps=0", "train.batch_size_per_worker=1",
         "eval.loss_blocks=2", "eval.before_after=false", "tracking.system_metrics=false"],
        tmp_path / "rehearsal", corpus=Path(corpus_dir), run_name="two-nodes", max_steps=20, checkpoint_every=5,
        export=False,  # the export to and from a bucket: tests/test_storage.py, in seconds
    )
    assert rehearse.cluster_problems(result, export=False) == []
    # the refusal names what to do
    assert "shared storage (s3://" in result.jobs["local-storage"][1]
    # node 2 went after the checkpoint at step 5 and training went on; resumed from a
    # checkpoint at most one interval back, the steps after it redone and not logged again
    assert "ray::RayTrainWorker" in result.killed.values()  # one training worker ran on node 2
    assert result.killed_at_step > 5
    assert result.resumed_from_step in (5, 10, 15)
    assert 0 <= result.killed_at_step - result.resumed_from_step <= 5
    assert result.redone_steps >= result.killed_at_step - result.resumed_from_step
    assert sorted(result.steps_logged) == list(range(1, 21))  # every step, each once
    assert set(result.steps_logged.values()) == {1}
    keys = result.store_keys
    assert any(k.startswith("prepared/") and k.endswith("manifest.json") for k in keys)
    assert any(k.startswith("checkpoints/two-nodes/checkpoint_") and k.endswith("state.json") for k in keys)
    assert {"adapter", "config.yaml"} <= set(result.run["artifacts"])
    assert result.unauthenticated_mlflow_status == 401  # MLflow's account is required
    assert result.unauthenticated_ray_status == 401  # and Ray's token
    assert result.leaked == []
    # nothing of ours is left: no raylet, GCS, dashboard, worker, driver or MLflow server
    assert len(result.processes) >= 8  # the tree was found: GCS, raylets, dashboard, agents, ...
    assert not rehearse.still_running(result.processes)
