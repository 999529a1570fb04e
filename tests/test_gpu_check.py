"""benchmarks/gpu_check.py, in its reduced CPU form, run as a user runs it: so the one
command that proves the GPU path cannot rot between the times a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_reduced_check_passes_every_section_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and set(result["sections"]) == {"attention", "attention_speed", "train_step", "collectives"}
    fsdp = {r["what"]: r for r in result["sections"]["collectives"]["rows"] if r["what"].startswith("fsdp")}
    assert set(fsdp) == {"fsdp optimizer_step + LoRA² allocator", "fsdp sharded checkpoint resumed", "fsdp cpu_offload"}
    for name, section in result["sections"].items():
        assert section["ok"] and section["rows"] and section["error"] is None, name
    attention = result["sections"]["attention"]["rows"]
    assert {(r["shift"], r["case"]) for r in attention} >= {("split", "packed documents"), ("roll", "padding")}
    (trainables,) = [r for r in result["sections"]["train_step"]["rows"] if r.get("attention") == "trainables"]
    assert trainables["dtypes"] == "float32" and trainables["moved_norm"] > 0  # a bf16 base, fp32 trainables
    assert "all checks passed" in done.stdout


def test_without_cuda_the_full_check_says_to_use_cpu(monkeypatch, capsys):
    import torch

    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "run with --cpu" in capsys.readouterr().err
