"""train.retain_host_memory: glibc's thresholds, set in the training process (train/host_memory.py)."""

import ctypes
import os
import resource
import subprocess
import sys

import pytest

from longtune.config import ConfigError, load_config
from longtune.train.host_memory import on_glibc

glibc = pytest.mark.skipif(not on_glibc(), reason="the thresholds are glibc's")

# a fresh interpreter: mallopt is process-wide, and glibc's thresholds only ever rise in it
PROBE = """
import ctypes, sys, torch
from longtune.train.host_memory import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = retain_freed_memory() if sys.argv[1] == "retain" else None
before = libc.mallinfo2().hblks  # hblks: chunks glibc gave their own mmap (importing torch made some)
x = torch.empty(20 << 18)  # 20 MiB, under the 32 MiB threshold, over glibc's first one (128 KiB)
print(took, libc.mallinfo2().hblks - before)
"""


def _probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    took, mmapped = out.stdout.split()
    return took, int(mmapped)


@glibc
def test_retained_buffers_come_from_the_heap_not_their_own_mapping():
    assert _probe("retain") == ("True", 0)  # kept in the heap, so freeing it keeps its pages
    took, mmapped = _probe("default")  # glibc alone maps it, and unmaps it when it is freed
    assert took == "None" and mmapped == 1


def test_retain_host_memory_is_on_by_default_and_validated():
    assert load_config(None, []).train.retain_host_memory is True
    assert load_config(None, ["train.retain_host_memory=false"]).train.retain_host_memory is False
    with pytest.raises(ConfigError, match="retain_host_memory"):
        load_config(None, ["train.retain_host_memory=sometimes"])


def test_not_glibc_means_nothing_is_done(monkeypatch):
    from longtune.train import host_memory

    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    called = []
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: called.append(a))
    assert host_memory.retain_freed_memory() is False and not called


# a thread (as Ray Train's training thread) fills and frees a 96 MiB buffer, over a thread
# arena's 64 MiB heap and glibc's 32 MiB mmap cap: the minor faults of its last three rounds.
# malloc itself, not a tensor: a lone 96 MiB tensor refilled in a thread grew the heap by 96 MiB
# a round instead (strace: brk), its freed chunk not taken again for torch's aligned request
# (posix_memalign), while a training step's faults fall 7x (README: "Ray's overhead")
THREAD_PROBE = """
import ctypes, resource, sys, threading
from longtune.train.host_memory import retain_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "retain":
    retain_freed_memory()
faults = []
def rounds():
    for i in range(4):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buffer = libc.malloc(96 << 20)
        ctypes.memset(buffer, 1, 96 << 20)  # every page written
        libc.free(buffer)
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
t = threading.Thread(target=rounds)
t.start(); t.join()
print(sum(faults[1:]))
"""


def _thread_faults(mode: str, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", THREAD_PROBE, mode], check=True, capture_output=True, text=True,
                         env={**os.environ, **env})
    return int(out.stdout.split()[-1])


@glibc
def test_a_workers_training_thread_keeps_its_buffers_from_round_to_round():
    from longtune.train.host_memory import worker_env_vars

    env = worker_env_vars(retain=True, use_gpu=False)
    assert env == {"MALLOC_ARENA_MAX": "1"}
    pages = 3 * (96 << 20) // resource.getpagesize()
    # glibc alone: each round maps the buffer afresh and faults in every page
    assert _thread_faults("default", {}) >= pages // 2
    # retained, one arena: the first round's pages serve the next ones
    assert _thread_faults("retain", env) < pages // 20
    # retained in the thread's own arena: a 96 MiB buffer is still mapped and unmapped each round
    assert _thread_faults("retain", {}) >= pages // 2
    assert worker_env_vars(retain=True, use_gpu=True) == {} and worker_env_vars(retain=False, use_gpu=False) == {}
