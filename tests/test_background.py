"""longtune/train/background.py on real processes: a stand-in for a driver with a raylet-named
child, a "worker" child and another child, each a real process with real threads."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from longtune.config import load_config
from longtune.train import background

pytestmark = pytest.mark.skipif(not background.supported(), reason="SCHED_IDLE is Linux's")

# A "driver": one extra thread, and three children (each with a second thread) whose pids it
# prints; the first names itself raylet (/proc/self/comm, what psutil's name() reads).
DRIVER = r"""
import os, subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(600,), daemon=True).start()
CHILD = ("import sys, threading, time\n"
         "if sys.argv[1] == 'raylet':\n"
         "    open('/proc/self/comm', 'w').write('raylet')\n"
         "threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
         "print('ready', flush=True)\n"
         "time.sleep(600)\n")
children = [subprocess.Popen([sys.executable, "-c", CHILD, role], stdout=subprocess.PIPE, text=True)
            for role in ("raylet", "worker", "other")]
for c in children:
    c.stdout.readline()
print(" ".join(str(c.pid) for c in children), flush=True)
time.sleep(600)
"""


def policies(pid: int) -> dict[int, int]:
    return {int(t): os.sched_getscheduler(int(t)) for t in os.listdir(f"/proc/{pid}/task")}


@pytest.fixture
def driver():
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        raylet, worker, other = (int(p) for p in proc.stdout.readline().split())
        yield proc.pid, raylet, worker, other
    finally:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_lowering_a_local_ray_leaves_the_workers_and_the_drivers_main_thread(driver):
    driver_pid, raylet, worker, other = driver
    assert background.started_local_ray(driver_pid)
    assert not background.started_local_ray(worker)

    lowered = background.lower_local_ray(driver_pid, keep=[worker])

    threads = policies(driver_pid)
    assert threads.pop(driver_pid) == os.SCHED_OTHER  # the main thread goes on after training
    assert set(threads.values()) == {os.SCHED_IDLE} and len(threads) >= 1
    assert set(policies(worker).values()) == {os.SCHED_OTHER}
    assert set(policies(other).values()) == {os.SCHED_IDLE} and len(policies(other)) >= 2
    if background.may_raise_priority():  # root here: raylet too, its forked workers restore
        assert set(policies(raylet).values()) == {os.SCHED_IDLE} and not lowered.kept_raylet
        assert "raylet" in lowered.processes
    else:
        assert set(policies(raylet).values()) == {os.SCHED_OTHER} and lowered.kept_raylet
    assert lowered.threads == len(threads) + len(policies(other)) + (0 if lowered.kept_raylet else len(policies(raylet)))


def test_a_process_forked_at_idle_priority_takes_normal_priority_back():
    """What a worker restarted by a lowered raylet does first (train_loop): every thread
    back on SCHED_OTHER, where this process may raise it; else it says it could not."""
    code = (
        "import os, threading, time\n"
        "from longtune.train import background\n"
        "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
        "threading.Thread(target=time.sleep, args=(30,), daemon=True).start()  # inherits idle\n"
        "time.sleep(0.1)\n"
        "before = {os.sched_getscheduler(int(t)) for t in os.listdir('/proc/self/task')}\n"
        "ok = background.restore_own_priority()\n"
        "after = {os.sched_getscheduler(int(t)) for t in os.listdir('/proc/self/task')}\n"
        "print(sorted(before), ok, sorted(after), background.may_raise_priority())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 1)
    assert out[0] == f"[{os.SCHED_IDLE}]"
    if background.may_raise_priority():
        assert out[1].strip() == f"True [{os.SCHED_OTHER}] True"
    else:
        assert out[1].strip() == f"False [{os.SCHED_IDLE}] False"


def test_a_run_lowers_only_a_ray_its_driver_started():
    """The driver's pid goes to the workers only for a local Ray this process started (its
    raylet is a child) and only with scaling.local_ray_idle_priority on."""
    from longtune.train.trainer import _local_ray_driver

    on = load_config(None, [])
    off = load_config(None, ["scaling.local_ray_idle_priority=false"])
    assert on.scaling.local_ray_idle_priority
    # this test process may hold the suite's local Ray already (the ray_local fixture)
    assert _local_ray_driver(on) == (os.getpid() if background.started_local_ray() else None)
    assert _local_ray_driver(off) is None
    child = subprocess.Popen([sys.executable, "-c", "open('/proc/self/comm','w').write('raylet');"
                              "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while not background.started_local_ray() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _local_ray_driver(on) == os.getpid()
        assert _local_ray_driver(off) is None
    finally:
        child.kill()
        child.wait()
