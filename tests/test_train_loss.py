"""The step's memory (issue #15): the chunked LM-head loss (train/loss.py) against the stock
loss, and activation offload (models.enable_checkpointing) against keeping the checkpointed
inputs where they are."""

from __future__ import annotations

import warnings
from typing import ClassVar

import pytest
import torch
import transformers
from conftest import tiny_lm

from longtune.adapters import apply_adapter
from longtune.config import load_config
from longtune.train.loss import (
    LanguageModelLoss,
    block_inputs,
    target_count,
    token_loss_sum,
)

N = 40
CHUNK = 16  # 2 rows: 8 positions a chunk, 5 chunks of the 39 predicting positions


def packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two packed rows: three documents in the first, the second padded after 25 tokens."""
    g = torch.Generator().manual_seed(3)
    batch = {
        "input_ids": torch.randint(0, 97, (2, N), generator=g),
        "position_ids": torch.stack([torch.cat([torch.arange(12), torch.arange(20), torch.arange(8)]),
                                     torch.arange(N)]),
        "loss_mask": torch.stack([torch.ones(N, dtype=torch.long), (torch.arange(N) < 25).long()]),
    }
    return block_inputs(batch)


def adapted(family: str = "llama", *overrides: str, **model_config):
    """A tiny LM with an adapter whose every trained parameter gets a gradient: LoRA's B
    factors start random (PEFT's default zeros would leave A's gradient zero)."""
    cfg = load_config(None, ["adapter.init_lora_weights=false", *overrides])
    model = apply_adapter(tiny_lm(family, **model_config), cfg.adapter, 10)
    model.train()
    return model


def loss_and_grads(loss_fn, ids, positions, labels):
    """The loop's objective, the loss per target token, and its gradient per trained parameter."""
    model = loss_fn.model
    model.zero_grad(set_to_none=True)
    loss = loss_fn(ids, positions, labels) / target_count(labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(model, chunk: int = CHUNK):
    ids, positions, labels = packed_batch()
    chunked = LanguageModelLoss(model, chunk)
    assert chunked.chunked
    stock_loss, stock = loss_and_grads(LanguageModelLoss(model, None), ids, positions, labels)
    loss, grads = loss_and_grads(chunked, ids, positions, labels)
    torch.testing.assert_close(loss, stock_loss, atol=1e-6, rtol=0)
    assert grads.keys() == stock.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, stock[name], atol=1e-6, rtol=0, msg=name)
    return grads


@pytest.mark.parametrize("family", ["llama", "llama_tied", "mistral", "qwen2"])
def test_chunked_loss_and_every_gradient_equal_the_stock_path(family):
    grads = assert_same(adapted(family))
    kinds = {"lora_A", "lora_B", "embed_tokens", "input_layernorm", "norm.modules_to_save"}
    for kind in kinds:  # every kind of trained parameter got a real gradient
        assert any(kind in n and g.abs().max() > 0 for n, g in grads.items()), kind


def test_a_tied_head_is_trained_once_through_the_embedding_and_every_chunk():
    model = adapted("llama_tied")
    base = model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # ensure_weight_tying: one matrix
    grads = assert_same(model)
    embedding = [n for n in grads if "embed_tokens" in n]
    assert len(embedding) == 1
    # rows of tokens that never appear in the input still get the head's gradient (softmax)
    ids, _, _ = packed_batch()
    unseen = sorted(set(range(97)) - set(ids.flatten().tolist()))
    assert unseen and grads[embedding[0]][unseen].abs().max() > 0


def test_lora2_factors_and_a_trained_untied_head_equal_the_stock_path():
    grads = assert_same(adapted("llama", "adapter.type=lora2"))
    assert any(".lora2_" in n or "lora_" in n for n in grads)
    head = assert_same(adapted("llama", "adapter.trainable_modules=[embed_tokens,norm,lm_head]"))
    assert any("lm_head.modules_to_save" in n and g.abs().max() > 0 for n, g in head.items())


@pytest.mark.parametrize("family, config", [
    ("gemma2", {"final_logit_softcapping": 2.0}),
    ("gemma3", {"final_logit_softcapping": 2.0}),
])
def test_final_logit_softcapping_is_applied_per_chunk(family, config):
    assert_same(adapted(family, **config))


@pytest.mark.parametrize("model_name, config_name, config", [
    ("CohereForCausalLM", "CohereConfig", {"logit_scale": 0.25}),
    ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 4.0}),
])
def test_logit_scales_are_applied_per_chunk(model_name, config_name, config):
    torch.manual_seed(0)
    base = getattr(transformers, model_name)(getattr(transformers, config_name)(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, **config))
    cfg = load_config(None, ["adapter.init_lora_weights=false"])
    model = apply_adapter(base, cfg.adapter, 10)
    model.train()
    assert_same(model)


def test_only_one_chunk_of_logits_exists_in_the_forward_and_the_backward():
    model = adapted("llama")
    ids, positions, labels = packed_batch()
    rows = []
    handle = model.get_base_model().lm_head.register_forward_hook(
        lambda m, args, out: rows.append((torch.is_grad_enabled(), out.shape[:-1].numel())))
    loss = LanguageModelLoss(model, CHUNK)(ids, positions, labels)
    in_forward = list(rows)
    loss.backward()
    handle.remove()
    assert max(n for _, n in rows) <= CHUNK  # the stock path's head sees all 2 x 40 positions
    assert sum(n for _, n in in_forward) == 2 * (N - 1)  # every predicting position, once
    assert sum(n for _, n in rows[len(in_forward):]) == 2 * (N - 1)  # recomputed in the backward


def test_without_gradients_the_chunks_are_not_checkpointed_and_the_loss_is_the_same():
    model = adapted("llama")
    model.eval()
    ids, positions, labels = packed_batch()
    with torch.no_grad():
        stock = token_loss_sum(model, ids, positions, labels)
        chunked = LanguageModelLoss(model, CHUNK)(ids, positions, labels)
    torch.testing.assert_close(chunked, stock, atol=1e-4, rtol=1e-6)


def test_one_chunk_is_the_stock_computation():
    assert_same(adapted("llama"), chunk=10_000)


def test_the_loops_eval_blocks_score_with_the_chunked_loss():
    from longtune.config import Config
    from longtune.train.loop import _EvalBlocks
    from longtune.train.worker_config import WorkerConfig

    model = adapted("llama")
    ids, positions, _ = packed_batch()
    blocks = [{"input_ids": ids[i:i + 1], "position_ids": positions[i:i + 1]} for i in range(2)]
    evaluator = _EvalBlocks(WorkerConfig(config=Config(), model_path="unused", has_eval=True), torch.device("cpu"))
    evaluator.blocks = blocks
    rows = []
    handle = model.get_base_model().lm_head.register_forward_hook(
        lambda m, args, out: rows.append(out.shape[:-1].numel()))
    chunked = evaluator.loss(LanguageModelLoss(model, 8), torch.autocast("cpu", enabled=False))
    handle.remove()
    stock = evaluator.loss(LanguageModelLoss(model, None), torch.autocast("cpu", enabled=False))
    assert max(rows) <= 8 and model.training
    assert chunked["eval_loss"] == pytest.approx(stock["eval_loss"], abs=1e-6)


class DoubledLogits(transformers.LlamaForCausalLM):
    """A model whose forward does something to the logits the chunked loss does not know."""

    def forward(self, input_ids=None, position_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, position_ids=position_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 2
        return out


def test_a_head_it_cannot_reproduce_falls_back_to_the_stock_loss_saying_so_once():
    torch.manual_seed(0)
    model = DoubledLogits(tiny_lm("llama").config)
    ids, positions, labels = packed_batch()
    with pytest.warns(UserWarning, match="DoubledLogits is trained on its whole-block logits"):
        loss_fn = LanguageModelLoss(model, CHUNK)
    assert not loss_fn.chunked
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LanguageModelLoss(model, CHUNK)  # said once
    assert loss_fn(ids, positions, labels) == token_loss_sum(model, ids, positions, labels)


def test_a_data_parallel_wrapper_of_the_model_is_refused():
    """A loss around DDP(model) would run the inner model, bypassing DDP's gradient sync."""
    from longtune.train.loop import optimizer_step

    model = adapted("llama")
    wrapper = torch.nn.DataParallel(model)  # on a CPU: a plain .module wrapper, as DDP is
    with pytest.raises(TypeError, match="wrap the loss in the data-parallel wrapper"):
        LanguageModelLoss(wrapper, CHUNK)
    config = load_config(None, [])
    with pytest.raises(TypeError, match=r"wrap the loss, not the model"):
        optimizer_step(wrapper, [], [], None, None, config, torch.autocast("cpu", enabled=False))


def test_a_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="train.loss_chunk_tokens"):
        LanguageModelLoss(adapted("llama"), 0)


# ---------------------------------------------------------------- activation offload


def checkpointed(offload: bool, on_gpu: bool = False):
    from longtune.models import enable_checkpointing

    model = tiny_lm("llama")
    model.config.use_cache = False
    enable_checkpointing(model, offload=offload, on_gpu=on_gpu)
    return apply_adapter(model, load_config(None, ["adapter.init_lora_weights=false"]).adapter, 10).train()


class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """save_on_cpu that counts the regions entered and the tensors it packed."""

    entered: ClassVar[int] = 0
    packed: ClassVar[list[tuple[int, ...]]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).entered += 1
        pack = self.pack_hook

        def counting(tensor):
            type(self).packed.append(tuple(tensor.shape))
            return pack(tensor)

        self.pack_hook = counting


@pytest.fixture
def counting_save_on_cpu(monkeypatch):
    CountingSaveOnCpu.entered, CountingSaveOnCpu.packed = 0, []
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    monkeypatch.setattr(transformers.modeling_utils, "save_on_cpu", CountingSaveOnCpu)
    return CountingSaveOnCpu


@pytest.mark.parametrize("on_gpu", [False, True], ids=["save_on_cpu", "transformers"])
def test_activation_offload_keeps_the_layer_inputs_on_the_host_with_the_same_loss_and_gradients(
        counting_save_on_cpu, monkeypatch, on_gpu):
    if on_gpu:  # transformers' own offload, as on a GPU worker (its pinned buffers need an accelerator)
        monkeypatch.setattr(transformers.modeling_utils, "get_current_accelerator", lambda: torch.device("cuda"))
    ids, positions, labels = packed_batch()
    plain_loss, plain = loss_and_grads(LanguageModelLoss(checkpointed(False), CHUNK), ids, positions, labels)
    assert counting_save_on_cpu.entered == 0
    loss, grads = loss_and_grads(LanguageModelLoss(checkpointed(True, on_gpu), CHUNK), ids, positions, labels)
    layers = 2
    assert counting_save_on_cpu.entered == layers  # one region per checkpointed layer
    assert (2, N, 64) in counting_save_on_cpu.packed  # the layer input, [B, N, hidden]
    torch.testing.assert_close(loss, plain_loss, atol=0, rtol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], atol=0, rtol=0, msg=name)


def test_activation_offload_without_gradient_checkpointing_is_refused(tiny_model_dir):
    from longtune.models import ModelError, load_model

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.target_context=64",
                             "model.activation_offload=true", "model.gradient_checkpointing=false"])
    with pytest.raises(ModelError, match="model.activation_offload=true needs model.gradient_checkpointing=true"):
        load_model(cfg.model, path=tiny_model_dir)
