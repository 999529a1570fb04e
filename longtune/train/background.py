"""A local Ray's own processes at idle CPU priority while its workers train.

On a machine whose cores all run the workers' torch threads, every slice of CPU another
process takes preempts one of those threads while the others wait for it at the next
barrier: 0.1 of a core of background costs a 2-core step ~15%, and a local Ray's own
processes (GCS, raylet, the driver's and the controller's core-worker threads) take ~0.11 of
a core (README: Ray's overhead). Under SCHED_IDLE the same background costs +0.4%
(benchmarks/background_cpu.py): the kernel runs it when a core would otherwise idle, which
a training step leaves often enough (optimizer steps, reports, data waits) for Ray's
heartbeats and reports to go through.

Only for a Ray this job's driver started itself (its raylet is the driver's child): a
cluster's processes are not the job's to reprioritise. What is lowered:
- every thread of every process under the driver, except the training workers' processes
  (this run's, and any other's: a search's concurrent trials) and the driver's main thread
  (it goes on after training: merging, evaluating, logging);
- in each training worker, its own Ray threads (``lower_own_ray_threads``);
- raylet only when this process may raise a priority back (root or CAP_SYS_NICE): a worker
  process raylet forks afterwards (a restarted worker, a later run's) inherits its policy,
  and ``restore_own_priority`` takes it back to normal only with that privilege.
Linux only (SCHED_IDLE); elsewhere, nothing.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Collection

_CAP_SYS_NICE = 23  # bit of /proc/self/status CapEff
_WORKER = "ray::RayTrainWo"  # a Ray Train worker's process name (15 characters of its title)


@dataclass(frozen=True)
class Lowered:
    """What ``lower_local_ray`` moved to SCHED_IDLE."""

    processes: tuple[str, ...]  # names, one per process with at least one thread lowered
    threads: int
    kept_raylet: bool  # raylet left as it was: this process could not restore a forked worker


def supported() -> bool:
    return hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_setscheduler")


def may_raise_priority() -> bool:
    """Whether this process may leave SCHED_IDLE (or lower its nice value) again: root,
    CAP_SYS_NICE, or an RLIMIT_NICE that allows nice 0."""
    if os.geteuid() == 0:
        return True
    try:
        import resource

        if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20:
            return True
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_NICE & 1)
    except OSError:
        pass
    return False


def started_local_ray(pid: int | None = None) -> bool:
    """Whether process ``pid`` (default: this one) started the Ray it uses: raylet is its child."""
    import psutil

    try:
        return any(_name(c) == "raylet" for c in psutil.Process(pid or os.getpid()).children())
    except psutil.Error:
        return False


def restore_own_priority() -> bool:
    """Put every thread of this process back on SCHED_OTHER if it inherited SCHED_IDLE from a
    raylet lowered earlier. False when some thread stays idle (no privilege to raise it)."""
    if not supported():
        return True
    restored = True
    for tid in threads(os.getpid()):
        try:
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except PermissionError:
            restored = False
        except (ProcessLookupError, OSError):
            pass  # a thread that ended meanwhile
    return restored


def lower_local_ray(driver_pid: int, keep: Collection[int]) -> Lowered:
    """Move the threads of the processes under ``driver_pid`` (the driver that started this
    local Ray) to SCHED_IDLE, leaving the processes in ``keep`` (the training workers) and the
    driver's main thread as they are; raylet too unless ``may_raise_priority()``."""
    import psutil

    if not supported():
        return Lowered((), 0, False)
    keep = set(keep)
    lower_raylet = may_raise_priority()
    names, count = [], 0
    try:
        root = psutil.Process(driver_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return Lowered((), 0, not lower_raylet)
    for proc in processes:
        name = _name(proc)
        # another run's training workers too (a search's concurrent trials): each keeps its own
        if proc.pid in keep or name.startswith(_WORKER) or (name == "raylet" and not lower_raylet):
            continue
        lowered = 0
        for tid in threads(proc.pid):
            if tid == driver_pid:  # the driver's main thread
                continue
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                lowered += 1
            except (ProcessLookupError, PermissionError, OSError):
                pass  # ended meanwhile, or another user's
        if lowered:
            names.append(name)
            count += lowered
    return Lowered(tuple(names), count, not lower_raylet)


# Threads of a training worker that its steps wait on: torch's distributed back ends
_STEP_THREADS = ("pt_", "gloo", "nccl", "c10d", "cuda")


def lower_own_ray_threads() -> int:
    """Move this worker's own Ray threads (core worker I/O, gRPC pollers and timers: named by
    Ray) to SCHED_IDLE; the calling thread, the threads named like it (torch's intra-op
    threads take their creator's name) and torch's distributed threads stay. Called from the
    training thread before its first parallel region. Returns how many were lowered."""
    if not supported():
        return 0
    me = threading.get_native_id()
    mine = _comm(os.getpid(), me)
    count = 0
    for tid in threads(os.getpid()):
        name = _comm(os.getpid(), tid)
        if tid == me or name in (mine, None) or name.startswith(_STEP_THREADS):
            continue
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            count += 1
        except (ProcessLookupError, PermissionError, OSError):
            pass
    return count


def _comm(pid: int, tid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def threads(pid: int) -> list[int]:
    """The thread ids of process ``pid``; none once it has ended."""
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # psutil.Error: gone, or not ours
        return "?"
