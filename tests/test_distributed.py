"""longtune/distributed.py: every collective on the worker's device, and only there.

On CPU the process group is gloo, which takes CPU tensors; NCCL, on every GPU run, takes only
tensors on the rank's GPU. These tests make the CPU suite catch what only a GPU would show:
a collective called anywhere else, or a tensor built off the worker's device."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import longtune
from longtune import distributed

PACKAGE = Path(longtune.__file__).parent
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather",
    "scatter", "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv",
    "batch_isend_irecv", "P2POp", "all_gather_single",
}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), filename=str(path))


def test_no_collective_outside_the_distributed_module():
    offenders = []
    for path, tree in _sources():
        if path == Path(distributed.__file__):
            continue
        for node in _calls(tree):
            name = _dotted(node.func)
            if name.rsplit(".", 1)[-1] in COLLECTIVES and ("dist." in name or "distributed." in name):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {name}")
        for node in ast.walk(tree):  # `from torch.distributed import all_reduce` hides the prefix
            if isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
                imported = {a.name for a in node.names} & COLLECTIVES
                if imported and path != Path(distributed.__file__):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {sorted(imported)}")
    assert not offenders, "collectives belong in longtune/distributed.py: " + ", ".join(offenders)


def test_every_torch_load_names_where_tensors_go():
    """A bare torch.load puts tensors saved from cuda:0 on cuda:0 again, on every rank."""
    offenders = [
        f"{path.relative_to(PACKAGE)}:{node.lineno}"
        for path, tree in _sources() for node in _calls(tree)
        if _dotted(node.func) == "torch.load" and "map_location" not in {k.arg for k in node.keywords}
    ]
    assert not offenders, "torch.load without map_location: " + ", ".join(offenders)


@pytest.fixture
def recorded(monkeypatch):
    """Pretend a process group is up; record the tensors handed to its collectives."""
    seen: list[torch.Tensor] = []
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: seen.append(t))
    monkeypatch.setattr(distributed.dist, "broadcast", lambda t, src=0, group=None: seen.append(t))
    return seen


def test_reductions_build_their_tensors_on_the_workers_device(recorded):
    # "meta" stands in for a GPU: any device but the CPU shows where the tensor was built
    out = distributed.summed([1.5, 2.0], torch.device("meta"))
    assert [t.device.type for t in recorded] == ["meta"]
    assert out.device.type == "meta" and out.dtype == torch.float64 and out.shape == (2,)


def test_a_tensor_off_the_workers_device_is_refused_with_the_reason(recorded):
    with pytest.raises(RuntimeError, match="worker's device is meta"):
        distributed.broadcast_(torch.zeros(3), torch.device("meta"))
    with pytest.raises(RuntimeError, match="worker's device is meta"):  # sequence parallelism's halo
        distributed.exchange([(torch.zeros(3), 1)], [], torch.device("meta"))
    assert recorded == []
    distributed.broadcast_(torch.zeros(3), torch.device("cpu"))
    assert len(recorded) == 1


def test_without_a_process_group_values_pass_through():
    assert distributed.all_reduce_sum([3, 4.5], "cpu") == [3.0, 4.5]
    assert distributed.gathered_ints(41, "cpu") == [41]
    assert distributed.world_size() == 1
