"""Probes: objects a run hands to every worker's loop, called after each optimizer step.

They watch or disturb a run from outside the loop body, so tests (and people debugging a
cluster run) can see which blocks each rank trained on, or kill a worker at a chosen step,
without a branch for it in the loop. A probe must pickle (Ray ships it to the workers).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch


class StepProbe(Protocol):
    def after_step(self, rank: int, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        """Called on every rank after optimizer step ``step`` (counted from 1), with the
        micro-batches that step trained on."""


def block_digest(input_ids: torch.Tensor) -> str:
    """A short stable id of one block's tokens."""
    return hashlib.sha1(input_ids.to("cpu", torch.int64).numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class RecordBlocks:
    """Append, per rank, one JSON line per step to ``<directory>/rank<r>.jsonl``:
    ``{"step": s, "blocks": [digest, ...]}`` in the order the blocks were trained on. A
    restarted worker appends: the last line of a step is the one its run kept."""

    directory: str

    def after_step(self, rank: int, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        blocks = [block_digest(row) for batch in micro_batches for row in batch["input_ids"]]
        path = Path(self.directory) / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": step, "blocks": blocks}) + "\n")


@dataclass(frozen=True)
class KillOnce:
    """Kill the worker of ``rank`` right after step ``step``, on the first attempt only (the
    ``marker`` file records it): what a lost node or a hardware fault does to a run."""

    step: int
    marker: str
    rank: int = 0

    def after_step(self, rank: int, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        marker = Path(self.marker)
        if rank == self.rank and step == self.step and not marker.exists():
            marker.write_text(str(step))
            os._exit(1)


def read_records(directory: str | os.PathLike[str], field: str | None = "blocks") -> dict[int, dict[int, object]]:
    """A recording probe's files as {rank: {step: record[field]}} (``RecordBlocks``: the
    blocks; ``RecordWorkerSetup``: ``field=None``, the whole record), the last record of each
    step winning."""
    out: dict[int, dict[int, list[str]]] = {}
    for path in sorted(Path(directory).glob("rank*.jsonl")):
        rank = int(path.stem.removeprefix("rank"))
        steps = out.setdefault(rank, {})
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]] = record if field is None else record[field]
    return out


@dataclass(frozen=True)
class RecordWorkerSetup:
    """Append, per rank, one JSON line per step to ``<directory>/rank<r>.jsonl``: the CPU
    scheduling policy of the training thread, those of this worker's threads and of the
    threads of each other process under ``driver_pid`` (the driver that started the local
    Ray), by process name, and the worker's malloc arena limit: ``{"step": s,
    "training_thread": "other", "worker": ["idle", "other"], "ray": {"gcs_server": ["idle"],
    ...}, "malloc_arena_max": "1"}``. What scaling.local_ray_idle_priority
    (train/background.py) and train.retain_host_memory (train/host_memory.py) do, seen from
    inside the run."""

    directory: str
    driver_pid: int

    def after_step(self, rank: int, step: int, micro_batches: list[dict[str, torch.Tensor]]) -> None:
        import psutil

        others: dict[str, set[str]] = {}
        for proc in psutil.Process(self.driver_pid).children(recursive=True):
            if proc.pid == os.getpid():
                continue
            try:
                name = proc.name()
            except psutil.Error:
                continue
            others.setdefault(name, set()).update(_policies(proc.pid))
        record = {"step": step, "training_thread": _policy(threading.get_native_id()),
                  "worker": sorted(_policies(os.getpid())),
                  "ray": {k: sorted(v) for k, v in others.items() if v},
                  "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX")}
        path = Path(self.directory) / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")


# os.SCHED_* values by name: 0 "other", 3 "batch", 5 "idle", ...
_POLICY_NAMES = {getattr(os, n): n.removeprefix("SCHED_").lower() for n in dir(os)
                 if n.startswith("SCHED_") and n != "SCHED_RESET_ON_FORK" and isinstance(getattr(os, n), int)}


def _policy(tid: int) -> str | None:
    """Thread ``tid``'s scheduling policy: "other", "idle", "batch", ...; None if it ended."""
    try:
        return _POLICY_NAMES.get(os.sched_getscheduler(tid), "?")
    except OSError:
        return None


def _policies(pid: int) -> set[str]:
    """The scheduling policies of process ``pid``'s threads."""
    from longtune.train.background import threads

    return {p for p in (_policy(t) for t in threads(pid)) if p is not None}
