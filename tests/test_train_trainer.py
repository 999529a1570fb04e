"""Checks the driver makes before a run starts (pure functions; no cluster needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from longtune.train.trainer import TrainingSetupError, _storage_path


def cluster(n_nodes: int):
    return SimpleNamespace(nodes=lambda: [{"Alive": True}] * n_nodes + [{"Alive": False}])


def test_local_storage_on_one_node_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _storage_path(None, cluster(1)) == str(tmp_path / "outputs" / "ray")
    assert (tmp_path / "outputs" / "ray").is_dir()


def test_object_store_is_used_as_is():
    assert _storage_path("s3://bucket/ckpt", cluster(4)) == "s3://bucket/ckpt"


def test_local_storage_on_several_nodes_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("LONGTUNE_STORAGE_IS_SHARED", raising=False)
    with pytest.raises(TrainingSetupError, match=r"is local, but the cluster has 3 nodes.*s3://"):
        _storage_path(str(tmp_path), cluster(3))
    monkeypatch.setenv("LONGTUNE_STORAGE_IS_SHARED", "1")  # an NFS mount on every node
    assert _storage_path(str(tmp_path), cluster(3)) == str(tmp_path)


# ------------------------------------------------------------------ the data each worker gets


def _split_ids(data_config, ds) -> list[list[int]]:
    """Each of two workers' rows, read at once from Ray Train's split of ``ds``."""
    from concurrent.futures import ThreadPoolExecutor

    (a, b) = [s["train"] for s in data_config.configure({"train": ds}, world_size=2, worker_handles=None,
                                                        worker_node_ids=None)]
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda it: [row["id"] for row in it.iter_rows()], (a, b)))


def test_every_run_splits_the_blocks_between_workers_alike(ray_local):
    """What makes a resumed run skip exactly the blocks it trained on: the same rows reach
    each worker, in the same order, on every run (Ray's own default differs run to run)."""
    import ray

    from longtune.train.trainer import ingest_config

    def jitter(batch):  # defined here: Ray's workers cannot import a test module
        import random
        import time

        time.sleep(random.random() * 0.05)  # tasks finish in any order, as on a busy cluster
        return batch

    ds = ray.data.range(96, override_num_blocks=24).map_batches(jitter, batch_size=None)
    first = _split_ids(ingest_config(), ds)
    assert sorted(first[0] + first[1]) == list(range(96)) and len(first[0]) == len(first[1])
    for _ in range(2):
        assert _split_ids(ingest_config(), ds) == first
