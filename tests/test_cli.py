"""The `longtune` command and the pipelines/ entry points, run as a user runs them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longtune.cli import COMMANDS, main
from longtune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "prepare": "prepare_data.py",
    "finetune": "finetune.py",
    "evaluate": "evaluate.py",
    "tune": "tune.py",
    "export": "export.py",
    "replicate": "replicate.py",
}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_longtune_help_lists_the_subcommands():
    result = run("-m", "longtune.cli", "--help")
    assert result.returncode == 0
    for name in PIPELINES:
        assert re.search(rf"^\s+{name}\s", result.stdout, re.M), name


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["longtune"] == "longtune.cli:main"
    assert set(project["optional-dependencies"]) >= {"gpu", "dev"}


@pytest.mark.parametrize("name,script", PIPELINES.items())
def test_every_entry_point_has_help(name, script):
    result = run(f"pipelines/{script}", "--help")
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout and "KEY=VALUE" in result.stdout


def test_bad_value_prints_one_line_and_exits_nonzero():
    result = run("pipelines/finetune.py", "attention.group_size_ratio=1.5")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "longtune finetune: config error: attention.group_size_ratio must be in (0, 1], got 1.5"
    )
    assert "Traceback" not in result.stderr


def test_bad_config_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: many\n")
    result = run("pipelines/finetune.py", "--config", str(bad))
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "train.max_steps" in result.stderr


def test_validation_happens_before_ray_starts(monkeypatch, capsys):
    import ray

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before validation"))
    assert main(["prepare", "data.min_doc_chars=-5"]) == 2
    assert "data.min_doc_chars" in capsys.readouterr().err


def test_unknown_flag_is_refused():
    result = run("pipelines/finetune.py", "--max-steps", "3")
    assert result.returncode == 2 and "unrecognized arguments: --max-steps" in result.stderr


def test_print_config_shows_the_resolved_config():
    result = run("pipelines/prepare_data.py", "--source", "a/", "b.jsonl", "--context-length", "64",
                 "train.max_steps=3", "--print-config")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["data"]["sources"] == ["a/", "b.jsonl"] and shown["data"]["context_length"] == 64
    assert shown["train"]["max_steps"] == 3


def test_print_config_of_a_recipe_round_trips(tmp_path):
    recipe = ROOT / "pipelines" / "configs" / "llama2-7b-32k.yaml"
    result = run("pipelines/finetune.py", "--config", str(recipe), "--print-config")
    assert result.returncode == 0
    out = tmp_path / "resolved.yaml"
    out.write_text(result.stdout)
    assert load_config(out) == load_config(recipe)


def test_every_command_runs_and_an_unbuilt_one_would_say_so():
    assert [c.name for c in COMMANDS if c.run is None] == []
    from longtune.cli import Command, NotImplementedYet, run_command

    with pytest.raises(NotImplementedYet, match=r"longtune later: not implemented yet \(issue #99 is open\)"):
        run_command(Command("later", "a job of a future issue", 99), load_config(None, []))


def test_readme_and_ci_run_the_same_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    test_command = ci_commands[-1]
    assert test_command == "bash dev.sh test"
    assert f"\n{test_command}\n" in readme


def test_overrides_after_a_multi_value_flag_are_not_swallowed():
    result = run("pipelines/evaluate.py", "--lengths", "256", "512", "eval.passkey_trials=3", "--print-config")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["eval"]["lengths"] == [256, 512] and shown["eval"]["passkey_trials"] == 3
    result = run("pipelines/prepare_data.py", "--source", "a/", "b/", "train.max_steps=7", "--print-config")
    shown = yaml.safe_load(result.stdout)
    assert shown["data"]["sources"] == ["a/", "b/"] and shown["train"]["max_steps"] == 7
