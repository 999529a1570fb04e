"""QLoRA (model.quantization): a bitsandbytes 4-bit / 8-bit base with LoRA+ on top, on this
CPU (bitsandbytes runs nf4, fp4 and int8 on x86 CPUs): loading, training, reload, export by
dequantizing and merging, the refusals, the plan."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")  # the [qlora] extra; [dev] installs it

from longtune.config import ConfigError, load_config  # noqa: E402


def qlora_config(tiny_model_dir, *extra):
    return load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.target_context=128",
                              "model.quantization=nf4", "attention.type=s2", *extra])


def train(loss_fn, params, batch, *, steps: int, lr: float = 3e-3) -> list[float]:
    """``steps`` AdamW steps on one batch; the losses."""
    from longtune.train.loss import block_inputs

    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(*block_inputs(batch))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_the_base_loads_quantized_and_only_the_adapter_trains_in_fp32(tiny_model_dir):
    import bitsandbytes as bnb

    from longtune.models import load_model
    from longtune.train.parallel import adapted_model

    config = qlora_config(tiny_model_dir)
    base, _ = load_model(config.model, path=tiny_model_dir)
    quantized = [n for n, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)  # the head stays unquantized
    model = adapted_model(config, base)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    assert any("lora_A" in n for n in trained) and any("embed_tokens" in n for n in trained)


def test_a_4bit_base_trains_and_an_eval_forward_does_not_break_its_gradients(tiny_model_dir, tmp_path):
    """On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight for an inference
    kernel at its first eval-mode no-grad forward, after which no gradient reaches the layers
    below it: longtune turns that off, so a held-out score between steps changes nothing."""
    from longtune.adapters import load_adapter, save_adapter
    from longtune.models import load_model
    from longtune.train.loss import LanguageModelLoss
    from longtune.train.parallel import adapted_model

    import bitsandbytes as bnb

    config = qlora_config(tiny_model_dir, "attention.type=full")
    base = load_model(config.model, path=tiny_model_dir)[0]
    layer = next(m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit))
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).clone()
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    grad, x.grad = x.grad.clone(), None
    layer.eval()
    with torch.no_grad():
        layer(x.detach())  # what a checkpoint's held-out loss does
    layer.train()
    layer(x).sum().backward()
    assert x.grad is not None and torch.equal(x.grad, grad)  # without the fix: None
    assert torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), weight)

    model = adapted_model(config, base)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 64), generator=g)
    batch = {"input_ids": ids, "position_ids": torch.arange(64).expand(2, 64)}
    loss_fn = LanguageModelLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]

    losses = train(loss_fn, params, batch, steps=15)
    assert losses[-1] < 0.9 * losses[0]

    # the adapter reloads onto a fresh 4-bit base with the very same logits
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(load_model(config.model, path=tiny_model_dir, for_training=False)[0], tmp_path / "adapter")
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("kind", ["fp4", "int8"])
def test_the_other_quantizations_load_and_train(tiny_model_dir, kind):
    from longtune.models import load_model
    from longtune.train.loss import LanguageModelLoss
    from longtune.train.parallel import adapted_model

    config = qlora_config(tiny_model_dir, f"model.quantization={kind}", "attention.type=full")
    model = adapted_model(config, load_model(config.model, path=tiny_model_dir)[0])
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "position_ids": torch.arange(32).expand(2, 32)}
    losses = train(LanguageModelLoss(model), [p for p in model.parameters() if p.requires_grad], batch, steps=10)
    assert losses[-1] < losses[0]


def test_refusals_name_the_setting(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"model.quantization=nf4 does not run with train.strategy=fsdp.*#1945"):
        qlora_config(tiny_model_dir, "train.strategy=fsdp")
    with pytest.raises(ConfigError, match=r"adapter.type=lora2 wraps plain linear layers only"):
        qlora_config(tiny_model_dir, "adapter.type=lora2", "adapter.pruning.target_rank=2")
    with pytest.raises(ConfigError, match="model.quantization"):
        qlora_config(tiny_model_dir, "model.quantization=nf8")


@pytest.mark.slow
def test_qlora_trains_on_two_workers_and_exports_a_plain_model_close_to_the_quantized_one(
    ray_local, tmp_path, tiny_model_dir, run_config
):
    """A 2-worker DDP run on an nf4 base with S2-Attn, real Ray and MLflow: the loss falls,
    the before/after scores both read the 4-bit base; the export dequantizes the base, merges
    the adapter and writes a plain fp32 model whose logits are within QUANTIZED_MERGE_ATOL of
    the quantized base + adapter's (the measured difference is in the export's record)."""
    from transformers import AutoModelForCausalLM

    from longtune.config import with_overrides
    from longtune.export import MARKER, QUANTIZED_MERGE_ATOL, ExportError, export_model
    from longtune.finetune import finetune

    config = run_config("model.quantization=nf4", "attention.type=s2", "train.max_steps=8", "train.lr=3e-3",
                        "train.run_name=qlora", "eval.before_after=true")
    result = finetune(config)
    import mlflow

    history = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        result.mlflow_run_id, "train/loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert result.metrics["ppl_128"] < result.metrics["ppl_128_before"]

    out = tmp_path / "export"
    export = with_overrides(config, {"model.adapter_path": result.checkpoint_path, "export.output_dir": str(out)})
    export_model(export)
    record = json.loads((out / MARKER).read_text())
    assert record["quantization"] == "nf4" and 0 < record["merge_max_abs_diff"] <= QUANTIZED_MERGE_ATOL
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert all(type(m).__name__ != "Linear4bit" for m in plain.modules())
    assert all(p.dtype == torch.float32 for p in plain.parameters())

    with pytest.raises(ExportError, match="pass model.quantization=nf4"):
        export_model(with_overrides(export, {"model.quantization": "none", "export.output_dir": str(tmp_path / "x")}))

    # relaunched with the same name and more steps, it resumes onto a fresh 4-bit base
    resumed = finetune(with_overrides(config, {"train.max_steps": 10, "eval.before_after": False}))
    assert resumed.metrics["step"] == 10
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [(m.step, m.value) for m in client.get_metric_history(resumed.mlflow_run_id, "train/resumed_from_step")] \
        == [(8, 8.0)]
    assert [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "train/loss")] == [10]


def test_plan_charges_quantized_weights_and_the_qlora_recipe_fits_an_a100():
    from pathlib import Path

    from longtune.plan import base_weight_bytes, model_shape, plan_run

    root = Path(__file__).resolve().parents[1]
    shape = model_shape("meta-llama/Llama-2-70b-hf")
    linear = shape.layers * shape.layer_linear_params()
    bf16 = base_weight_bytes(load_config(None, []), shape, 2)
    for kind, double, bits in (("nf4", True, 4 + 8 / 64 + 32 / (64 * 256)), ("nf4", False, 4 + 32 / 64), ("int8", True, 8)):
        config = load_config(None, [f"model.quantization={kind}", f"model.double_quantization={str(double).lower()}"])
        expected = linear * bits / 8 + (shape.params() - linear) * 2
        assert base_weight_bytes(config, shape, 2) == pytest.approx(expected, rel=1e-6)
    assert 0.25 < base_weight_bytes(load_config(None, ["model.quantization=nf4"]), shape, 2) / bf16 < 0.28

    recipe = load_config(root / "pipelines/configs/llama2-70b-32k-qlora.yaml")
    assert recipe.model.quantization == "nf4" and recipe.train.strategy == "ddp"
    plan = plan_run(recipe, "a100-80gb", search_max_context=False)
    assert plan.fits and 30 * 2**30 < plan.breakdown["base_weights"] < 36 * 2**30
