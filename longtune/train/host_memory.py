"""glibc's malloc, told to keep the host memory a training step frees for the next one.

A CPU step allocates and frees the same large buffers every step (activations, a chunk's
logits, gradients: up to tens of MiB each). glibc returns them to the kernel — munmap for
chunks over its mmap threshold (which it caps at 32 MiB, so a larger buffer always gets its
own mapping), trimming the heap top past its trim threshold, and, in a thread's own arena,
deleting a whole 64 MiB heap as soon as it is free — and every page is faulted in and zeroed
again at the next step: 150-300k minor faults a step at 8192 tokens. So, in each CPU worker:

- no chunk gets its own mapping (M_MMAP_MAX 0): every buffer comes from the heap, and a freed
  one stays there for the next step, up to the trim threshold (1 GiB) at the heap's top;
- the threads allocate from the main arena, whose heap grows without a size cap (one arena:
  ``MALLOC_ARENA_MAX=1`` in the worker's environment, ``worker_env_vars``). Ray Train runs the
  training function in a thread of its worker, and a thread's arena is chosen at its first
  malloc, before that function runs: only the environment glibc reads at start-up reaches it.
  A thread's own arena cannot hold a buffer over 64 MiB and maps it whatever M_MMAP_MAX says.

Measured on a 2-core machine (8192 tokens, S2-Attn, the plain loop, each case in a fresh
process, medians of two alternating rounds: benchmarks/host_memory.py; README: "Ray's
overhead"): in a thread 2.525 s a step and 270k minor faults with glibc's defaults, 2.358 s
(-6.6%) and 33k with both of the above; in the main thread 2.445 s and 2.241 s (-8.3%). The
finetune job: 3.246 s a step with glibc's defaults, 2.686 s.

The cost: freed memory stays in the process (up to the trim threshold at the top, and all of
it inside the heap), so the resident set keeps nearer the step's peak between steps; threads
share one arena's lock (torch's intra-op threads allocate little). On a GPU the step's buffers
live in PyTorch's own caching allocator and none of this is done. Elsewhere than glibc (musl,
macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# glibc caps the mmap threshold at HEAP_MAX_SIZE / 2: 32 MiB on 64-bit; a larger value is refused
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def on_glibc() -> bool:
    """Whether this process's C library is glibc, whose mallopt parameters these are."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


# glibc reads it at start-up (a tunable's alias): the worker's threads share the main arena
ONE_ARENA = {"MALLOC_ARENA_MAX": "1"}


def worker_env_vars(retain: bool, use_gpu: bool) -> dict[str, str]:
    """Environment variables for the training workers' processes (Ray Train's
    ``worker_runtime_env``): one malloc arena for CPU workers that retain freed memory."""
    return dict(ONE_ARENA) if retain and not use_gpu else {}


def retain_freed_memory() -> bool:
    """Stop glibc mapping chunks of their own (M_MMAP_MAX 0), set its mmap threshold to 32 MiB
    and its trim threshold to 1 GiB for this process (which also ends glibc's own adjusting of
    both). True when glibc took all three; False, doing nothing, where the C library is not
    glibc."""
    if not on_glibc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    took = (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            and mallopt(_M_MMAP_MAX, 0) == 1)
    if not took:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD=%d, M_TRIM_THRESHOLD=%d, M_MMAP_MAX=0): freed host "
                    "memory is returned to the kernel as before", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return took
