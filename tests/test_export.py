"""longtune export: a trained LoRA+ adapter merged into its base, saved as a plain HF model
that loads with the extended context and computes what base + adapter computed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from longtune.adapters import apply_adapter, save_adapter
from longtune.cli import main
from longtune.config import AdapterConfig, load_config
from longtune.export import MARKER, PEFT_NAME_PARTS, ExportError, export_model
from longtune.models import load_model
from conftest import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL, TARGET = 64, 128  # the tiny bases are trained at 64 tokens and extended x2
ARCHS = ["llama", "mistral", "qwen2", "llama_tied"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core box they spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def export_config(model_dir, adapter, out, *extra: str):
    return load_config(None, [
        f"model.name_or_path={model_dir}", f"model.target_context={TARGET}",
        f"model.adapter_path={adapter}", f"export.output_dir={out}", *extra,
    ])


def ids_at(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def build_trained(arch: str, root: Path, tokenizer_path: str, adapter: str = "lora_plus"):
    """A tiny random base saved like a hub model, a LoRA+ adapter trained on it for a few
    steps at the extended length, and the adapted model's logits on a longer-than-original
    input: (arch, model_dir, adapter_dir, ids, expected_logits, base_embedding)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    vocab = len(tokenizer)
    base = tiny_lm(arch, vocab_size=vocab, max_position_embeddings=ORIGINAL,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    model_dir = root / "base"
    base.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))

    cfg = export_config(model_dir, root / "adapter", root / "unused")
    model, _ = load_model(cfg.model, for_training=False)  # interpolated x2, like training
    model = apply_adapter(model, AdapterConfig(type=adapter), max_steps=3)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):  # large lr: LoRA B, embeddings and norms all move visibly
        batch = ids_at(TARGET, vocab, 10 + step)
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    adapter_dir = save_adapter(model, root / "adapter")

    ids = ids_at(TARGET, vocab, 1)  # longer than the base's original context
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    return arch, model_dir, adapter_dir, ids, expected, base.get_input_embeddings().weight.detach().clone()


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request, tmp_path_factory, tiny_tokenizer_path):
    return build_trained(request.param, tmp_path_factory.mktemp(f"export_{request.param}"), tiny_tokenizer_path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_tokenizer_path):
    """The untied Llama case, for the tests that need one architecture only."""
    return build_trained("llama", tmp_path_factory.mktemp("export_one"), tiny_tokenizer_path)


def saved_keys(directory: Path) -> list[str]:
    keys = []
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys.extend(f.keys())
    return keys


# ---------------------------------------------------------------- the merged model


def test_export_loads_plain_with_extended_context_and_same_logits(trained, tmp_path):
    arch, model_dir, adapter_dir, ids, expected, base_embedding = trained
    out = export_model(export_config(model_dir, adapter_dir, tmp_path / "out"))
    assert out == tmp_path / "out"

    # config.json: linear interpolation x2, the extended context
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "linear"
    assert config["rope_parameters"]["factor"] == pytest.approx(TARGET / ORIGINAL)
    assert config["max_position_embeddings"] == TARGET

    # plain transformers, no PEFT: the same logits as base + adapter at the extended length
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.dtype == torch.float32
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # the trained embedding replaced the original; no PEFT names anywhere
    assert not torch.allclose(loaded.get_input_embeddings().weight, base_embedding)
    keys = saved_keys(out)
    assert keys and not [k for k in keys if any(part in k for part in PEFT_NAME_PARTS)]
    assert not [k for k in loaded.state_dict() if "lora" in k.lower() or "modules_to_save" in k]
    if arch == "llama_tied":
        assert loaded.config.tie_word_embeddings
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
        assert "lm_head.weight" not in keys  # one matrix on disk too

    # the tokenizer and the record travel with it
    assert AutoTokenizer.from_pretrained(str(out)).model_max_length == TARGET
    record = json.loads((out / MARKER).read_text())
    assert record["base"] == str(model_dir) and record["adapter"] == str(adapter_dir)
    assert (record["original_context"], record["target_context"]) == (ORIGINAL, TARGET)
    assert record["rope_parameters"]["factor"] == pytest.approx(2.0) and record["dtype"] == "float32"
    assert record["merge_max_abs_diff"] < 1e-4


@pytest.mark.parametrize("adapter", ["lora2", "adalora"])
def test_rank_pruned_adapters_export_with_the_same_logits(adapter, tmp_path, tiny_tokenizer_path):
    _, model_dir, adapter_dir, ids, expected, _ = build_trained("llama", tmp_path, tiny_tokenizer_path, adapter)
    out = export_model(export_config(model_dir, adapter_dir, tmp_path / "out"))
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-4, rtol=0)
    assert not [k for k in saved_keys(out) if any(part in k for part in PEFT_NAME_PARTS)]


def test_bfloat16_export_loads_as_bfloat16(llama, tmp_path):
    _, model_dir, adapter_dir, ids, expected, _ = llama
    out = export_model(export_config(model_dir, adapter_dir, tmp_path / "bf16", "export.dtype=bfloat16"))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        got = loaded(input_ids=ids).logits.float()
    assert (got - expected).abs().max() < 0.1 * expected.abs().max()  # bf16 rounding only


# ---------------------------------------------------------------- checkpoints


def make_checkpoint(tmp_path: Path, model_dir: Path, adapter_dir: Path, *overrides: str) -> Path:
    ckpt = tmp_path / "run" / "checkpoint_000003"
    shutil.copytree(adapter_dir, ckpt / "adapter")
    trained_with = export_config(model_dir, "unused", "unused", *overrides)
    (ckpt / "config.yaml").write_text(trained_with.to_yaml())
    return ckpt


def test_checkpoint_directory_is_accepted_and_named(llama, tmp_path):
    _, model_dir, adapter_dir, ids, expected, _ = llama
    ckpt = make_checkpoint(tmp_path, model_dir, adapter_dir)
    written = yaml.safe_load((ckpt / "config.yaml").read_text())  # as an older longtune wrote it
    written["eval"]["adapter_path"] = None
    written["model"]["retired_key"] = 1
    (ckpt / "config.yaml").write_text(yaml.safe_dump(written))
    out = export_model(export_config(model_dir, ckpt, tmp_path / "out"))
    record = json.loads((out / MARKER).read_text())
    assert record["checkpoint"] == str(ckpt) and record["adapter"] == str(ckpt / "adapter")
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(out))(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("override,named", [
    (f"model.target_context={2 * TARGET}", f"model.target_context={2 * TARGET}"),
    ("model.original_context=32", "model.original_context=32"),
])
def test_checkpoint_for_another_extension_is_refused(llama, tmp_path, override, named):
    _, model_dir, adapter_dir, *_ = llama
    ckpt = make_checkpoint(tmp_path, model_dir, adapter_dir, override)
    with pytest.raises(ExportError, match=named):
        export_model(export_config(model_dir, ckpt / "adapter", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_base_is_refused(llama, tmp_path):
    _, model_dir, adapter_dir, *_ = llama
    ckpt = make_checkpoint(tmp_path, model_dir, adapter_dir)
    other = tmp_path / "other_base"
    shutil.copytree(model_dir, other)
    with pytest.raises(ExportError, match=f"model.name_or_path={model_dir}.*says {other}"):
        export_model(export_config(other, ckpt, tmp_path / "out"))


# ---------------------------------------------------------------- the output directory


def test_previous_export_is_replaced_other_directories_are_refused(llama, tmp_path):
    _, model_dir, adapter_dir, *_ = llama
    out = tmp_path / "out"
    export_model(export_config(model_dir, adapter_dir, out))
    (out / "stale.txt").write_text("from the previous export")
    export_model(export_config(model_dir, adapter_dir, out, "export.dtype=bfloat16"))
    assert not (out / "stale.txt").exists()
    assert json.loads((out / MARKER).read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not a longtune export"):
        export_model(export_config(model_dir, adapter_dir, precious))
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------- the command


def test_missing_adapter_is_one_line_and_exit_1(llama, tmp_path, capsys):
    _, model_dir, *_ = llama
    code = main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "out"), f"model.target_context={TARGET}"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == f"longtune export: adapter path {str(tmp_path / 'nope')!r} does not exist"


def test_unloadable_base_and_non_export_out_are_one_line(llama, tmp_path, capsys):
    _, model_dir, adapter_dir, *_ = llama
    assert main(["export", "--model", str(tmp_path / "no_model"), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("longtune export: ") and len(err.splitlines()) == 1
    assert err == f"longtune export: base model {str(tmp_path / 'no_model')!r} does not exist"

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["export", "--model", str(model_dir), "--adapter", str(adapter_dir),
                 "--out", str(tmp_path / "taken")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not a longtune export" in err


def test_pipeline_script_exports(llama, tmp_path):
    _, model_dir, adapter_dir, *_ = llama
    result = subprocess.run(
        [sys.executable, "pipelines/export.py", "--model", str(model_dir), "--adapter", str(adapter_dir),
         "--out", str(tmp_path / "out"), f"model.target_context={TARGET}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert f"exported: {tmp_path / 'out'}" in result.stderr and "Check it with: python -c" in result.stderr
    assert (tmp_path / "out" / MARKER).is_file()
