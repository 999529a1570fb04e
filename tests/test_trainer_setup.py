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
