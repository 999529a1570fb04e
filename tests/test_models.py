"""Base model loading, position interpolation, and the seed model's pretraining."""

from __future__ import annotations

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


def test_other_rope_types_are_refused_by_name():
    config = llama_config()
    config.rope_parameters = {**config.rope_parameters, "rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ModelError, match="rope_type is 'yarn'"):
        interpolate_positions(config, 1024, 256)


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
    """A few dozen steps already put the seed model far below a random model's perplexity."""
    from longtune.seed import pretrain_seed_model, seed_tokenizer

    tokenizer = seed_tokenizer(tmp_path)
    torch.set_num_threads(2)
    model, report = pretrain_seed_model(tokenizer, steps=40)
    assert report["random_init_ppl"] > 3000  # ~ the vocabulary size: nothing learned
    assert report["heldout_ppl"] < report["random_init_ppl"] / 4
    assert report["heldout_tokens"] > 0 and report["train_tokens"] > 10 * report["heldout_tokens"]
