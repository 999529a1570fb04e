"""Helpers the benchmarks share: peak memory on the CPU, timings, writing results."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process, KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rise_bytes(step) -> int:
    """How far one call of ``step()`` raises the process's peak resident set above where
    it starts (VmHWM reset first). Call it after a warm-up step."""
    base = rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    step()
    return (rss_kib("VmHWM") - base) * 1024


def run_isolated(argv: list[str]) -> str:
    """Run a benchmark's measurement mode in a fresh process and return its stdout. A fixed
    mmap threshold makes glibc return every large block when freed, so the resident set
    follows what is allocated (its adaptive default would hide the peak)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run([sys.executable, *argv], check=True, capture_output=True, text=True, env=env)
    return done.stdout.strip().splitlines()[-1]


def median(values) -> float:
    return statistics.median(values)


def write_json(path: str | Path, payload: dict) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out)
    return out
