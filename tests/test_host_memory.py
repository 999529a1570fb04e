"""train.retain_host_memory: glibc's thresholds, set in the training process (train/host_memory.py)."""

import ctypes
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
