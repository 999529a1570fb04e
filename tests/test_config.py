"""The typed config: defaults, YAML, overrides, and every validation error path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from longtune.config import (
    SEED_MODEL,
    Config,
    ConfigError,
    from_dict,
    load_config,
    reference_markdown,
    with_overrides,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_recipe():
    c = Config()
    assert c.model.name_or_path == SEED_MODEL and c.model.target_context == 1024
    assert (c.adapter.type, c.adapter.rank, c.adapter.alpha) == ("lora_plus", 8, 16)
    assert (c.attention.type, c.attention.group_size_ratio, c.attention.shift) == ("s2", 0.25, "split")
    assert c.train.betas == (0.9, 0.95) and c.train.warmup_steps == 20
    assert c.context_length == c.model.target_context


def test_yaml_then_overrides_later_wins(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n  lr: 1.0e-3\nadapter:\n  rank: 4\n")
    c = load_config(path, ["train.max_steps=50", "adapter.rank=16", "attention.group_size=512"])
    assert c.train.max_steps == 50 and c.adapter.rank == 16 and c.train.lr == 1e-3
    assert c.attention.group_size == 512


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("train.lr=1e-4", ("train", "lr"), 1e-4),
        ("train.max_grad_norm=null", ("train", "max_grad_norm"), None),
        ("tracking.enabled=false", ("tracking", "enabled"), False),
        ("eval.lengths=[128, 256]", ("eval", "lengths"), [128, 256]),
        ("data.sources=[a.txt, s3://b/c]", ("data", "sources"), ["a.txt", "s3://b/c"]),
        ("model.name_or_path=meta-llama/Llama-2-7b-hf", ("model", "name_or_path"), "meta-llama/Llama-2-7b-hf"),
        ("adapter.pruning.target_rank=2", ("adapter", "pruning", "target_rank"), 2),
    ],
)
def test_override_values_are_typed(override, key, value):
    node = load_config(None, [override])
    for part in key:
        node = getattr(node, part)
    assert node == value


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["attention.group_size_ratio=1.5"], "attention.group_size_ratio must be in (0, 1], got 1.5"),
        (["attention.group_size_ratio=0"], "attention.group_size_ratio must be in (0, 1], got 0"),
        (["attention.group_size=255"], "attention.group_size must be even"),
        (["attention.shift=diagonal"], "attention.shift: input should be 'split' or 'roll', got 'diagonal'"),
        (["train.max_steps=-1"], "train.max_steps: input should be greater than 0, got -1"),
        (["train.lr=fast"], "train.lr: input should be a valid number"),
        (["train.betas=[1.5, 0.9]"], "train.betas must be two numbers in [0, 1), got [1.5, 0.9]"),
        (["data.sources=[]"], "data.sources must list at least one"),
        (["data.eval_fraction=1"], "data.eval_fraction: input should be less than 1, got 1"),
        (["eval.lengths=[256, -1]"], "lengths must be positive token counts"),
        (["adapter.type=lora3"], "adapter.type: input should be 'lora_plus', 'lora', 'lora2' or 'adalora'"),
        (["adapter.type=lora2", "adapter.rank=4", "adapter.pruning.target_rank=8"],
         "adapter.pruning.target_rank must be <= adapter.rank (4) for adapter.type=lora2, got 8"),
        (["tune.search_space={train.lr: [1, 2]}"], "tune.search_space.train.lr must be one of"),
        (["scaling.num_workers=0"], "scaling.num_workers: input should be greater than 0, got 0"),
        (["train.colour=blue"], "unknown config key 'train.colour'"),
        (["optimizer.lr=1"], "unknown config key 'optimizer'"),
        (["max_steps=3"], "must be dotted"),
        (["train.max_steps"], "must look like section.key=value"),
        (["train.max_steps.x=1"], "train.max_steps: input should be a valid integer, got {'x': 1}"),
    ],
)
def test_validation_errors_name_field_value_and_rule(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'model.size'"):
        load_config(write(tmp_path, "model:\n  size: 7b\n"))


def test_missing_file_bad_yaml_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+\)"):
        load_config(write(tmp_path, "train:\n  lr: [1, 2\n"))
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == Config()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_parses(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_default_yaml_states_the_defaults():
    """pipelines/configs/default.yaml is the embedded recipe written out: it must not drift
    from the schema's defaults, which are what `python pipelines/finetune.py` runs."""
    assert load_config(ROOT / "pipelines" / "configs" / "default.yaml") == Config()


def test_llama_recipe_has_the_longlora_paper_settings():
    c = load_config(ROOT / "pipelines" / "configs" / "llama2-7b-32k.yaml")
    assert (c.model.original_context, c.model.target_context) == (4096, 32768)
    assert (c.adapter.type, c.adapter.rank, c.adapter.alpha) == ("lora_plus", 8, 16)
    assert c.train.lr == 2e-5 and c.train.warmup_steps == 20 and c.train.max_steps == 1000
    assert c.train.betas == (0.9, 0.95) and c.train.weight_decay == 0.0
    assert c.scaling.num_workers * c.train.grad_accum_steps * c.train.batch_size_per_worker == 64
    assert c.attention.group_size_ratio == 0.25 and c.model.gradient_checkpointing


def test_round_trip_through_yaml(tmp_path):
    c = load_config(None, ["train.max_steps=7", "adapter.type=lora2", "eval.lengths=[64]"])
    again = load_config(write(tmp_path, c.to_yaml()))
    assert again == c
    assert from_dict(yaml.safe_load(c.to_yaml())) == c


def test_flat_and_with_overrides():
    c = Config()
    flat = c.flat()
    assert flat["attention.group_size_ratio"] == 0.25 and flat["adapter.pruning.beta1"] == 0.85
    assert isinstance(flat["tune.search_space"], dict)
    trial = with_overrides(c, {"adapter.rank": 32, "train.lr": 3e-4})
    assert trial.adapter.rank == 32 and trial.train.lr == 3e-4 and c.adapter.rank == 8
    with pytest.raises(ConfigError, match="greater than 0"):
        with_overrides(c, {"adapter.rank": 0})


def test_readme_configuration_reference_is_in_sync():
    readme = (ROOT / "README.md").read_text()
    begin, end = "<!-- config-reference:begin -->\n", "<!-- config-reference:end -->"
    assert begin in readme and end in readme, "README.md lacks the config reference markers"
    documented = readme.split(begin, 1)[1].split(end, 1)[0]
    assert documented == reference_markdown(), (
        "README.md's configuration reference is stale: regenerate it with "
        "`python -c 'from longtune.config import reference_markdown; print(reference_markdown(), end=\"\")'`"
    )
