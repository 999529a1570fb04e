"""LongLoRA's LoRA+ through PEFT on tiny random models built from config (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from longtune.adapters import (
    apply_adapter,
    attention_projections,
    load_adapter,
    parameter_counts,
    save_adapter,
    trainable_modules,
)
from longtune.attention import s2_settings, use_s2_attention
from longtune.config import AdapterConfig
from conftest import tiny_lm

VOCAB = 97
ARCHS = ["llama", "mistral", "qwen2", "llama_tied"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
EMBED_AND_NORMS = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core box the
    threads' spinning makes each test ~40x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """The same random model for the same (arch, seed): rebuilt as the 'fresh base'."""
    return tiny_lm(arch, seed=seed, vocab_size=VOCAB, max_position_embeddings=256).eval()


def batch(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    """A few AdamW steps with a large lr so every trained tensor visibly moves."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        ids = batch(seed=10 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=batch()).logits


@torch.no_grad()
def logits_at(model: torch.nn.Module, ids: torch.Tensor, train: bool) -> torch.Tensor:
    was_training = model.training
    model.train(train)
    out = model(input_ids=ids).logits
    model.train(was_training)
    return out


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def tied(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


# ---------------------------------------------------------------- what is adapted


@pytest.mark.parametrize("arch", ARCHS)
def test_modules_found_by_inspection(arch):
    model = tiny(arch)
    assert attention_projections(model) == QKVO
    assert trainable_modules(model) == EMBED_AND_NORMS


def test_qwen3_q_and_k_norms_are_trained():
    assert trainable_modules(tiny("qwen3")) == ["embed_tokens", "q_norm", "k_norm", *EMBED_AND_NORMS[1:]]


def test_no_attention_projections_names_the_model():
    class MLPOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="MLPOnly"):
        attention_projections(MLPOnly())


def test_short_name_that_would_catch_another_module_falls_back_to_full_paths():
    model = tiny("llama")
    model.model.layers[0].mlp.denorm = torch.nn.Linear(4, 4)  # ends in "norm", is no norm
    names = trainable_modules(model)
    assert "norm" not in names and "model.norm" in names
    assert names[:3] == EMBED_AND_NORMS[:3]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_plus_trains_lora_embeddings_and_norms_only(arch):
    model = apply_adapter(tiny(arch), AdapterConfig())
    names = trainable_names(model)
    lora = [n for n in names if ".lora_A." in n or ".lora_B." in n]
    saved = [n for n in names if ".modules_to_save.default." in n]
    assert sorted(lora + saved) == sorted(names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == set(QKVO)
    assert len(lora) == 2 * 4 * 2  # A and B, q/k/v/o, 2 layers
    saved_modules = [n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in saved]
    assert sorted(saved_modules) == sorted([
        "model.embed_tokens", "model.norm",
        "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
    ])  # an untied output head is not trained (LongLoRA trains embed + norms)
    counts = parameter_counts(model)
    assert counts["trainable"] == counts["lora"] + counts["saved_modules"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert counts["saved_modules"] == VOCAB * 64 + 5 * 64  # one embedding (even when tied), 5 norms


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_lora_trains_lora_only(arch):
    model = apply_adapter(tiny(arch), AdapterConfig(type="lora"))
    names = trainable_names(model)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert parameter_counts(model)["saved_modules"] == 0


def test_tied_embedding_stays_tied_and_is_trained_once():
    model = apply_adapter(tiny("llama_tied"), AdapterConfig())
    assert model.peft_config["default"].ensure_weight_tying
    inner = model.get_base_model()
    embed = inner.model.embed_tokens.modules_to_save["default"].weight
    assert inner.lm_head.modules_to_save["default"].weight is embed  # head uses the trained copy
    trained = [p for p in model.parameters() if p.requires_grad]
    assert sum(p is embed for p in trained) == 1  # one tensor, one optimizer entry
    before = embed.detach().clone()
    train_steps(model)
    assert not torch.equal(before, embed)
    assert inner.lm_head.modules_to_save["default"].weight is embed


def test_explicit_trainable_modules_and_bad_names():
    model = apply_adapter(tiny("llama"), AdapterConfig(trainable_modules=["norm"]))
    saved = {n for n in trainable_names(model) if "modules_to_save" in n}
    assert saved and not any("embed_tokens" in n for n in saved)  # "norm" suffix: all norms
    with pytest.raises(ValueError, match="adapter.trainable_modules.*LlamaForCausalLM"):
        apply_adapter(tiny("llama"), AdapterConfig(trainable_modules=["no_such_module"]))
    with pytest.raises(ValueError, match="adapter.target_modules"):
        apply_adapter(tiny("llama"), AdapterConfig(target_modules=["wq"]))
    with pytest.warns(UserWarning, match="ignored"):
        apply_adapter(tiny("llama"), AdapterConfig(type="lora", trainable_modules=["norm"]))


def test_options_reach_the_peft_config():
    cfg = AdapterConfig(
        rank=4, alpha=8, dropout=0.1, use_rslora=True, use_dora=True,
        init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"],
    )
    model = apply_adapter(tiny("llama"), cfg)
    peft_cfg = model.peft_config["default"]
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (4, 8, 0.1)
    assert peft_cfg.use_rslora and peft_cfg.use_dora
    assert peft_cfg.init_lora_weights == "gaussian"
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}
    assert peft_cfg.task_type == "CAUSAL_LM"
    assert any("lora_magnitude_vector" in n for n in trainable_names(model))  # DoRA is on
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    assert q.lora_A["default"].weight.std().item() == pytest.approx(1 / 4, abs=0.05)  # N(0, 1/r)

    no_init = apply_adapter(tiny("llama"), AdapterConfig(init_lora_weights=False))
    assert not torch.all(no_init.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight == 0)


def test_applying_twice_is_refused():
    model = apply_adapter(tiny("llama"), AdapterConfig())
    with pytest.raises(TypeError, match="PeftModel"):
        apply_adapter(model, AdapterConfig())


# ---------------------------------------------------------------- save, reload, merge


@pytest.mark.parametrize("adapter_type", ["lora_plus", "lora"])
@pytest.mark.parametrize("arch", ARCHS)
def test_trained_adapter_reloads_and_merges(arch, adapter_type, tmp_path):
    base_logits = logits(tiny(arch))
    model = apply_adapter(tiny(arch), AdapterConfig(type=adapter_type))
    train_steps(model)
    adapted = logits(model)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # training changed the model

    path = save_adapter(model, tmp_path / "adapter")
    assert (path / "adapter_config.json").is_file()
    assert (path / "adapter_model.safetensors").is_file()

    reloaded = PeftModel.from_pretrained(tiny(arch), str(path))  # plain PEFT, fresh base
    assert torch.equal(logits(reloaded), adapted)
    ours = load_adapter(tiny(arch), path)
    assert torch.equal(logits(ours), adapted)
    assert not trainable_names(ours)  # inference by default

    merged = reloaded.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(logits(merged), adapted, atol=1e-5, rtol=0)
    if arch == "llama_tied":
        assert tied(merged) and merged.config.tie_word_embeddings  # still one matrix


def test_load_adapter_trainable_resumes_training(tmp_path):
    model = apply_adapter(tiny("llama_tied"), AdapterConfig())
    save_adapter(model, tmp_path / "a")
    resumed = load_adapter(tiny("llama_tied"), tmp_path / "a", trainable=True)
    assert sorted(trainable_names(resumed)) == sorted(trainable_names(model))


def test_save_replaces_an_existing_adapter_whole(tmp_path):
    target = tmp_path / "adapter"
    first = apply_adapter(tiny("llama"), AdapterConfig(rank=4))
    save_adapter(first, target)
    (target / "stale.txt").write_text("from the old adapter")
    second = apply_adapter(tiny("llama"), AdapterConfig(rank=2))
    save_adapter(second, target)
    assert json.loads((target / "adapter_config.json").read_text())["r"] == 2
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp dirs left


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny("llama"), tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        load_adapter(tiny("llama"), tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        load_adapter(tiny("llama"), tmp_path / "file")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match="no adapter weights"):
        load_adapter(tiny("llama"), tmp_path / "noweights")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid PEFT adapter config"):
        load_adapter(tiny("llama"), tmp_path / "badjson")


def test_save_adapter_wants_a_peft_model(tmp_path):
    with pytest.raises(TypeError, match="PeftModel"):
        save_adapter(tiny("llama"), tmp_path / "x")


# ---------------------------------------------------------------- with S2-Attn


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2"])
def test_adapted_model_trains_with_s2_attention(arch):
    model = apply_adapter(tiny(arch), AdapterConfig())
    full = logits(model)
    assert use_s2_attention(model, group_size_ratio=0.25) is model
    assert s2_settings(model) is not None

    model.train()
    ids = batch(n=64)
    with torch.no_grad():  # train mode really runs S2 (groups of 16): not full attention
        assert not torch.allclose(model(input_ids=ids).logits, logits_at(model, ids, train=False), atol=1e-4)
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "norm" in n)
    model.zero_grad()

    model.eval()  # eval runs full attention: same logits as before S2 was switched on
    torch.testing.assert_close(logits(model), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter_type", ["lora_plus", "lora"])
def test_activation_checkpointing_gives_the_same_gradients(adapter_type):
    """transformers 5's activation_checkpointing_enable on the adapted S2 model (the
    training setup): same gradients as without it, for LoRA and for the saved modules."""
    grads = []
    for checkpointing in (False, True):
        model = use_s2_attention(apply_adapter(tiny("llama"), AdapterConfig(type=adapter_type)))
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        ids = batch(n=64)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- on a bf16 base (a GPU's weights)


def tiny_bf16(arch: str, seed: int = 0) -> torch.nn.Module:
    return tiny(arch, seed).to(torch.bfloat16)


def bf16_logits(model: torch.nn.Module, autocast: bool = True) -> torch.Tensor:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return model(input_ids=batch()).logits


def train_bf16(model: torch.nn.Module, steps: int, lr: float) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = batch(seed=10 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("adapter_type", ["lora_plus", "lora"])
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen3"])
def test_every_trained_parameter_is_fp32_on_a_bf16_base(arch, adapter_type):
    model = apply_adapter(tiny_bf16(arch), AdapterConfig(type=adapter_type))
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}  # the base stays bf16
    if arch == "llama_tied" and adapter_type == "lora_plus":
        inner = model.get_base_model()
        embed = inner.model.embed_tokens.modules_to_save["default"].weight
        assert inner.lm_head.modules_to_save["default"].weight is embed  # still one tied matrix
        assert sum(p is embed for p in model.parameters() if p.requires_grad) == 1


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_norms_train_on_a_bf16_base(arch):
    """50 AdamW steps at LongLoRA's lr 2e-5 under bf16 autocast: a bf16 norm weight of ~1.0
    cannot take them (bf16 spacing at 1.0 is 2^-7) and does not move; the fp32 one does."""
    model = apply_adapter(tiny_bf16(arch), AdapterConfig())
    inner = model.get_base_model()
    norms = [inner.model.norm.modules_to_save["default"].weight,
             inner.model.layers[0].input_layernorm.modules_to_save["default"].weight]
    embed = inner.model.embed_tokens.modules_to_save["default"].weight
    before = [p.detach().clone() for p in (*norms, embed)]
    train_bf16(model, steps=50, lr=2e-5)
    for param, start in zip((*norms, embed), before):
        assert (param - start).abs().max() > 1e-4


def test_the_residual_stream_stays_in_the_base_dtype():
    """An fp32 trained embedding would promote every hidden state (and each checkpointed
    layer input, the largest activation at long context) to fp32; its output is cast to
    the base's bf16, and the trained norms' outputs too."""
    model = apply_adapter(tiny_bf16("llama"), AdapterConfig())
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=batch(), output_hidden_states=True)
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}
    with torch.no_grad():  # and without autocast (evaluation) it still runs
        model.eval()
        assert model(input_ids=batch()).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_bf16_base_adapter_reloads_bit_identically_and_merges(arch, tmp_path):
    model = apply_adapter(tiny_bf16(arch), AdapterConfig())
    train_bf16(model, steps=3, lr=1e-2)
    adapted, adapted_plain = bf16_logits(model), bf16_logits(model, autocast=False)
    path = save_adapter(model, tmp_path / "adapter")

    for trainable in (False, True):
        reloaded = load_adapter(tiny_bf16(arch), path, trainable=trainable)
        assert torch.equal(bf16_logits(reloaded), adapted), trainable
        assert torch.equal(bf16_logits(reloaded, autocast=False), adapted_plain), trainable
    resumed = load_adapter(tiny_bf16(arch), path, trainable=True)
    trained = dict(model.named_parameters())
    for name, param in resumed.named_parameters():
        if param.requires_grad:  # the saved fp32 values, not their bf16 rounding
            assert param.dtype == torch.float32 and torch.equal(param, trained[name]), name
    if arch == "llama_tied":
        inner = resumed.get_base_model()
        assert inner.lm_head.modules_to_save["default"].weight is inner.model.embed_tokens.modules_to_save["default"].weight

    merged = load_adapter(tiny_bf16(arch), path).merge_and_unload()
    torch.testing.assert_close(bf16_logits(merged), adapted, atol=0.05, rtol=0)  # bf16 rounding
    # export's route: the adapter merged into the fp32 base computes what it does on that base
    on_fp32 = logits(load_adapter(tiny(arch), path))
    exported = load_adapter(tiny(arch), path).merge_and_unload()
    torch.testing.assert_close(logits(exported), on_fp32, atol=1e-5, rtol=0)
    torch.testing.assert_close(on_fp32, adapted.float(), atol=0.1, rtol=0)  # and what it trained to
    if arch == "llama_tied":
        assert tied(exported)
