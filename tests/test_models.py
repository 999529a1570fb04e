"""Base model loading, position interpolation, and the seed model's pretraining."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from longtune.config import ModelConfig
from longtune.models import ModelError, interpolate_positions, load_model, original_context


def llama_config(**kw):
    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=256)
    base.update(kw)
    return LlamaConfig(**base)


def test_linear_interpolation_is_written_the_transformers_5_way():
    config = llama_config()
    assert interpolate_positions(config, 1024, 256) == 4.0
    assert config.rope_parameters["rope_type"] == "linear" and config.rope_parameters["factor"] == 4.0
    assert config.rope_parameters["rope_theta"] == 10000.0
    assert config.max_position_embeddings == 1024


def test_interpolation_composes_with_an_existing_linear_factor():
    config = llama_config()
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": 2.0}
    interpolate_positions(config, 1024, 256)
    assert config.rope_parameters["factor"] == 8.0


def test_no_interpolation_when_the_target_is_not_longer():
    config = llama_config()
    assert interpolate_positions(config, 256, 256) == 1.0
    assert config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize("kind, extra, says", [
    ("dynamic", {"factor": 2.0}, "recomputes its frequencies from each batch's length"),
    ("longrope", {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "original_max_position_embeddings": 256},
     "switches between short_factor and long_factor"),
    ("proportional", {}, "composes only with 'default', 'linear', 'llama3', 'yarn'"),
])
def test_rope_types_that_cannot_compose_are_refused_and_the_config_is_left_alone(kind, extra, says):
    config = llama_config()
    config.rope_parameters = {**config.rope_parameters, "rope_type": kind, **extra}
    before = dict(config.rope_parameters)
    with pytest.raises(ModelError, match=f"rope_type '{kind}'.*{says}|rope_type is '{kind}'.*{says}"):
        interpolate_positions(config, 1024, 256)
    assert config.rope_parameters == before and config.max_position_embeddings == 256
    assert interpolate_positions(config, 256, 256) == 1.0  # at its own context: nothing to compose


def save_tiny(model_cls, config, path):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    return str(path)


def default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def test_llama3_rope_scales_its_factor_and_keeps_its_bands(tmp_path):
    """Llama 3.1-style RoPE (factor 8, bands at original / 4 and original / 1 wavelengths),
    extended x4: the rotary embedding built has the low-frequency dimensions divided by
    8 x 4, the high-frequency ones as trained, the ones between smoothed with factor 32."""
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    path = save_tiny(LlamaForCausalLM, llama_config(hidden_size=64, num_attention_heads=2,
                                                    rope_parameters=rope), tmp_path)
    model, info = load_model(ModelConfig(name_or_path=path, target_context=1024), for_training=False)
    assert info["original_context"] == 256 and info["interpolation_factor"] == 4.0
    assert info["rope"] == {"all": {"rope_type": "llama3", "factor": 32.0, "interpolated": 4.0,
                                    "attention_scaling": 1.0}}
    assert model.config.rope_parameters["original_max_position_embeddings"] == 64

    base = default_inv_freq(10000.0, 32)
    wavelength = 2 * math.pi / base
    low, high = wavelength > 64 / 1.0, wavelength < 64 / 4.0
    smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
    expected = torch.where(low, base / 32, torch.where(high, base, (1 - smooth) * base / 32 + smooth * base))
    built = model.model.rotary_emb.inv_freq
    assert low.any() and high.any() and (~low & ~high).any()  # all three bands are exercised
    torch.testing.assert_close(built, expected)


def test_yarn_rope_scales_its_factor_and_derives_attention_scaling_from_it(tmp_path):
    """YaRN factor 4 over 64 tokens reaches 256: that is the trained context; x4 more gives
    factor 16, and the attention scaling transformers builds is YaRN's 0.1 ln(16) + 1."""
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    # max_position_embeddings 80 < 4 x 64, as in Qwen3 configs with yarn added by hand
    path = save_tiny(LlamaForCausalLM, llama_config(hidden_size=64, num_attention_heads=2,
                                                    max_position_embeddings=80, rope_parameters=rope), tmp_path)
    model, info = load_model(ModelConfig(name_or_path=path, target_context=1024), for_training=False)
    assert info["original_context"] == 256 and info["interpolation_factor"] == 4.0
    rotary = model.model.rotary_emb
    assert model.config.rope_parameters["factor"] == 16.0 and info["rope_factor"] == 16.0
    assert rotary.attention_scaling == pytest.approx(0.1 * math.log(16) + 1)
    assert info["rope"]["all"]["attention_scaling"] == pytest.approx(0.1 * math.log(16) + 1)
    # the same frequencies as a model configured with yarn x16 from the start
    direct = LlamaForCausalLM(llama_config(hidden_size=64, num_attention_heads=2, max_position_embeddings=1024,
                                           rope_parameters={**rope, "factor": 16.0}))
    torch.testing.assert_close(rotary.inv_freq, direct.model.rotary_emb.inv_freq)
    base = default_inv_freq(10000.0, 32)
    assert torch.allclose(rotary.inv_freq[-1], base[-1] / 16) and torch.allclose(rotary.inv_freq[0], base[0])

    explicit = llama_config(max_position_embeddings=256, rope_parameters={**rope, "attention_factor": 1.5})
    interpolate_positions(explicit, 1024, 256)
    assert explicit.rope_parameters["attention_factor"] == 1.5  # an explicit one is kept


def gemma3_config(**kw):
    from transformers import Gemma3TextConfig

    base = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                sliding_window=64, layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})
    base.update(kw)
    return Gemma3TextConfig(**base)


def test_gemma3_interpolates_full_attention_layers_and_leaves_sliding_ones(tmp_path):
    """Gemma 3 keeps RoPE per layer type. Full-attention layers (linear x2 already) become
    x8; sliding-window layers (window 64 < the trained 256) see no longer distance than in
    training and keep their RoPE: the rotary embedding built per layer type says so."""
    from transformers import Gemma3ForCausalLM

    path = save_tiny(Gemma3ForCausalLM, gemma3_config(), tmp_path)
    model, info = load_model(ModelConfig(name_or_path=path, target_context=1024), for_training=False)
    rotary = model.model.rotary_emb
    torch.testing.assert_close(rotary.full_attention_inv_freq, default_inv_freq(1e6, 8) / 8)
    torch.testing.assert_close(rotary.sliding_attention_inv_freq, default_inv_freq(10000.0, 8))
    assert rotary.rope_type == {"full_attention": "linear", "sliding_attention": "default"}
    assert info["rope_factor"] == 8.0 and info["interpolation_factor"] == 4.0
    assert info["rope"] == {
        "sliding_attention": {"rope_type": "default", "factor": 1.0, "interpolated": 1.0, "attention_scaling": 1.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "interpolated": 4.0, "attention_scaling": 1.0},
    }
    assert "factor" not in model.config.rope_parameters  # nothing written where transformers ignores it
    with torch.no_grad():  # and the model runs past its old context
        assert torch.isfinite(model(torch.randint(0, 100, (1, 300))).logits).all()


def test_a_sliding_window_wider_than_the_trained_context_is_interpolated_to_the_window():
    config = gemma3_config(sliding_window=512)
    assert interpolate_positions(config, 1024, 256) == 4.0
    rope = config.rope_parameters
    assert rope["sliding_attention"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}  # 512 / 256
    assert rope["full_attention"]["factor"] == 8.0


def test_olmo3_yarn_full_attention_layers_compose_per_layer_type(tmp_path):
    from transformers import Olmo3Config, Olmo3ForCausalLM

    config = Olmo3Config(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, sliding_window=32, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                            "original_max_position_embeddings": 64}},
    )
    model, info = load_model(ModelConfig(name_or_path=save_tiny(Olmo3ForCausalLM, config, tmp_path),
                                         target_context=1024), for_training=False)
    rotary = model.model.rotary_emb
    assert info["original_context"] == 256 and info["rope"]["full_attention"]["factor"] == 16.0
    assert rotary.full_attention_attention_scaling == pytest.approx(0.1 * math.log(16) + 1)
    assert rotary.sliding_attention_attention_scaling == 1.0
    torch.testing.assert_close(rotary.sliding_attention_inv_freq, default_inv_freq(10000.0, 8))


def test_unknown_layer_types_are_refused():
    config = gemma3_config(layer_types=["sliding_attention", "chunked_attention"],
                           rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                            "chunked_attention": {"rope_type": "default", "rope_theta": 1e4}})
    before = {k: dict(v) for k, v in config.rope_parameters.items()}
    with pytest.raises(ModelError, match="layer type 'chunked_attention'"):
        interpolate_positions(config, 1024, 256)
    assert config.rope_parameters == before


def test_original_context_from_config_or_override():
    assert original_context(llama_config(), ModelConfig()) == 256
    assert original_context(llama_config(), ModelConfig(original_context=128)) == 128


def test_interpolated_positions_equal_scaled_positions(tmp_path):
    """RoPE at position p with factor 4 equals RoPE at p/4 without: the interpolation is real."""
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path)
    extended, info = load_model(ModelConfig(name_or_path=str(tmp_path), target_context=1024), for_training=False)
    assert info["original_context"] == 256 and info["rope_factor"] == 4.0
    x = torch.zeros(1, 1, 32)
    cos_ext, _ = extended.model.rotary_emb(x, torch.tensor([[8]]))
    plain = LlamaForCausalLM(llama_config())
    inv_freq = plain.model.rotary_emb.inv_freq
    torch.testing.assert_close(cos_ext[0, 0, : inv_freq.numel()], torch.cos(2.0 * inv_freq))


def test_load_model_weights_dtype(tmp_path):
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), target_context=512)
    model, info = load_model(cfg, for_training=False)
    assert model.dtype == torch.float32 and info["dtype"] == "float32"  # auto on CPU
    model, info = load_model(cfg.model_copy(update={"dtype": "bfloat16"}), for_training=False)
    assert model.dtype == torch.bfloat16 and info["dtype"] == "bfloat16"
    model, _ = load_model(cfg, for_training=False, dtype=torch.float16)  # what training resolved wins
    assert model.dtype == torch.float16


def test_load_model_for_training_disables_cache_and_checkpoints(tmp_path):
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path)
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path), target_context=512))
    assert model.config.use_cache is False and model.is_gradient_checkpointing
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path), target_context=512, gradient_checkpointing=False))
    assert not model.is_gradient_checkpointing


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load a model config from"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nope")))


@pytest.mark.slow
def test_seed_pretraining_learns(tmp_path):
    """Twenty steps already put the seed model far below a random model's perplexity."""
    from longtune.seed import pretrain_seed_model, seed_tokenizer

    tokenizer = seed_tokenizer(tmp_path)
    torch.set_num_threads(2)
    model, report = pretrain_seed_model(tokenizer, steps=20)
    assert report["random_init_ppl"] > 3000  # ~ the vocabulary size: nothing learned
    assert report["heldout_ppl"] < report["random_init_ppl"] / 4
    assert report["heldout_tokens"] > 0 and report["train_tokens"] > 10 * report["heldout_tokens"]
    assert report["machine"]["threads"] == 2 and report["machine"]["torch"] == torch.__version__


def test_machine_fingerprint_names_what_a_cpu_run_depends_on():
    from longtune.precision import cpu_has_bf16
    from longtune.seed import machine_fingerprint

    fingerprint = machine_fingerprint()
    assert fingerprint["cpu"] and fingerprint["cpu_bf16"] == cpu_has_bf16()
    assert fingerprint["threads"] == torch.get_num_threads() and fingerprint["torch"] == torch.__version__


# ---------------------------------------------------------------- precision (longtune.precision)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("precision, dtype, device, native, expected", [
    # train.precision auto: the device decides
    ("auto", "auto", "cuda", True, (BF16, BF16, False)),
    ("auto", "auto", "cuda", False, (F16, F16, True)),  # V100 / T4: fp16 with loss scaling
    ("auto", "auto", "cpu", True, (F32, BF16, False)),
    ("auto", "auto", "cpu", False, (F32, None, False)),
    ("auto", "float32", "cuda", True, (F32, BF16, False)),
    ("auto", "float32", "cuda", False, (F32, F16, True)),
    ("auto", "float32", "cpu", False, (F32, None, False)),
    ("auto", "bfloat16", "cpu", False, (BF16, BF16, False)),  # bf16 weights need bf16 autocast
    ("auto", "bfloat16", "cuda", False, (BF16, BF16, False)),
    ("auto", "float16", "cuda", True, (F16, F16, True)),
    ("auto", "float16", "cpu", False, (F16, F16, True)),
    # explicit settings do what they say on every device
    ("bf16", "auto", "cuda", False, (BF16, BF16, False)),
    ("bf16", "auto", "cpu", False, (F32, BF16, False)),
    ("bf16", "float32", "cuda", True, (F32, BF16, False)),
    ("bf16", "bfloat16", "cpu", False, (BF16, BF16, False)),
    ("fp16", "auto", "cuda", True, (F16, F16, True)),
    ("fp16", "auto", "cpu", True, (F32, F16, True)),
    ("fp16", "float32", "cuda", True, (F32, F16, True)),
    ("fp16", "float16", "cpu", False, (F16, F16, True)),
    ("fp32", "auto", "cuda", True, (F32, None, False)),  # fp32 on a GPU: fp32 weights, no autocast
    ("fp32", "float32", "cpu", True, (F32, None, False)),
])
def test_precision_resolution(precision, dtype, device, native, expected):
    from longtune.config import TrainConfig
    from longtune.precision import Precision, resolve_precision

    got = resolve_precision(ModelConfig(dtype=dtype), TrainConfig(precision=precision), device, bf16_native=native)
    assert got == Precision(*expected)


def test_precision_without_train_config_is_auto():
    from longtune.precision import resolve_precision

    assert resolve_precision(ModelConfig(), None, "cuda", bf16_native=True).weights == BF16
    assert resolve_precision(ModelConfig(), None, "cpu", bf16_native=True).weights == F32


@pytest.mark.parametrize("precision, dtype", [("fp32", "bfloat16"), ("fp32", "float16"),
                                              ("bf16", "float16"), ("fp16", "bfloat16")])
def test_contradicting_precision_settings_are_refused_naming_both(precision, dtype):
    from longtune.config import ConfigError, TrainConfig, load_config
    from longtune.precision import resolve_precision

    with pytest.raises(ConfigError, match=f"train.precision={precision} .* model.dtype={dtype}"):
        load_config(None, [f"train.precision={precision}", f"model.dtype={dtype}"])
    with pytest.raises(ConfigError, match=f"train.precision={precision}"):  # validation skipped (model_copy)
        resolve_precision(ModelConfig().model_copy(update={"dtype": dtype}),
                          TrainConfig().model_copy(update={"precision": precision}), "cpu")
    with pytest.raises(ConfigError, match="device type 'mps'"):
        resolve_precision(ModelConfig(), None, "mps")


def test_precision_autocast_and_grad_scaler():
    from longtune.precision import Precision

    none = Precision(F32, None, False)
    with none.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert not none.grad_scaler_for("cpu").is_enabled()
    half = Precision(F32, F16, True)
    with half.autocast(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == F16
    assert half.grad_scaler_for("cpu").is_enabled()
    assert half.describe() == {"weights": "float32", "autocast": "float16", "grad_scaler": True}


def fp16_training(model_dtype: str, steps: int = 8):
    """LoRA+ on a tiny Llama with fp16 autocast and a GradScaler, the way the loop must use
    them. Returns (losses, scales, model)."""
    from longtune.adapters import apply_adapter
    from longtune.config import AdapterConfig, TrainConfig
    from longtune.precision import resolve_precision, step_optimizer

    precision = resolve_precision(ModelConfig(dtype=model_dtype), TrainConfig(precision="fp16"), "cpu")
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(num_hidden_layers=2)).to(precision.weights)
    model = apply_adapter(base, AdapterConfig()).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scaler = precision.grad_scaler_for("cpu")
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    losses, scales = [], []
    for _ in range(steps):
        with precision.autocast("cpu"):
            loss = model(input_ids=ids, labels=ids).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        assert step_optimizer(scaler, optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        scales.append(scaler.get_scale())
    return losses, scales, model


@pytest.mark.parametrize("model_dtype", ["auto", "float16"])
def test_fp16_with_grad_scaler_trains_on_cpu(model_dtype):
    losses, scales, model = fp16_training(model_dtype)
    assert scales[0] == 2.0**16  # the loss really was scaled
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.5
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {F32}  # unscale_ needs fp32 grads
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == ({F16} if model_dtype == "float16" else {F32})


def test_an_overflowing_fp16_step_is_skipped_and_reported():
    from longtune.precision import Precision, step_optimizer

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scaler = Precision(F32, F16, True).grad_scaler_for("cpu")
    scaler.scale(param.sum() * float("inf")).backward()
    scaler.unscale_(optimizer)
    assert not step_optimizer(scaler, optimizer)  # skipped: hooks that read gradients must not run
    assert torch.equal(param.detach(), torch.ones(3)) and scaler.get_scale() == 2.0**15
    optimizer.zero_grad()
    scaler.scale(param.sum()).backward()
    assert step_optimizer(scaler, optimizer) and not torch.equal(param.detach(), torch.ones(3))
