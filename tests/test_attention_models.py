"""S2-Attn inside real transformers models built from config (no downloads)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import (
    AttentionInterface,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from longtune.attention import (
    ATTN_IMPLEMENTATION,
    reference_attention,
    resolve_group_size,
    s2_reference_mask,
    s2_settings,
    use_full_attention,
    use_s2_attention,
)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB = 97


def tiny(arch: str, **overrides) -> torch.nn.Module:
    config_cls, model_cls = ARCHS[arch]
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return model_cls(config_cls(**kwargs))


def _reference_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense-mask S2 (training) through the same AttentionInterface slot, for comparison."""
    settings = s2_settings_of(module)
    n = query.shape[2]
    mask = s2_reference_mask(
        query.shape[0], query.shape[1], n,
        resolve_group_size(n, settings.group_size, settings.group_size_ratio), settings.shift,
        attention_mask, kwargs.get("position_ids"), kwargs.get("sliding_window"),
    )
    return reference_attention(query, key, value, mask, scaling), None


def s2_settings_of(module):
    return module._longtune_s2


@pytest.fixture(scope="module", autouse=True)
def reference_registered():
    AttentionInterface.register("longtune_reference", _reference_interface)
    AttentionMaskInterface.register("longtune_reference", flash_attention_mask)


def _batch(b=2, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, n - 9 :] = 0  # right padding in the second row
    return ids, mask


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shift", ["split", "roll"])
def test_training_forward_equals_dense_reference(arch, shift):
    model = tiny(arch)
    use_s2_attention(model, 0.25, shift)
    model.train()
    ids, mask = _batch()
    pos = torch.cat([torch.arange(40), torch.arange(24)])[None].expand(2, -1)  # two documents
    got = model(ids, attention_mask=mask, position_ids=pos).logits
    model.set_attn_implementation("longtune_reference")
    want = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_eval_mode_logits_identical_to_full_attention(arch):
    model = tiny(arch).eval()
    ids, mask = _batch()
    before = model(ids, attention_mask=mask).logits
    use_s2_attention(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION
    after = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_under_s2_and_loss_differs_from_full(arch):
    model = tiny(arch)
    ids, _ = _batch(n=128)
    model.train()
    full_loss = model(ids, labels=ids).loss.item()
    use_s2_attention(model, group_size_ratio=0.25)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] != pytest.approx(full_loss, abs=1e-6)  # S2 really ran
    assert losses[-1] < losses[0] * 0.9, losses


def test_generation_runs_full_attention_with_a_cache():
    model = tiny("llama").eval()
    prompt = torch.randint(0, VOCAB, (1, 12))
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    use_s2_attention(model)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_use_full_attention_restores_the_previous_implementation():
    model = tiny("qwen2", attn_implementation="eager")
    use_s2_attention(model, 0.5, "roll")
    assert s2_settings(model).shift == "roll" and s2_settings(model).group_size_ratio == 0.5
    use_s2_attention(model, 0.25)  # a second call keeps what to restore
    use_full_attention(model)
    assert model.config._attn_implementation == "eager"
    assert s2_settings(model) is None


def test_mistral_sliding_window_in_eval_matches_stock_sdpa():
    model = tiny("mistral", sliding_window=16).eval()
    ids, mask = _batch(n=64)
    want = model(ids, attention_mask=mask).logits
    use_s2_attention(model)
    got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_fixed_group_size_and_ratio_follow_sequence_length():
    model = tiny("llama")
    model.train()
    seen = []
    use_s2_attention(model, group_size_ratio=0.25)
    import longtune.attention.interface as iface

    real = iface.s2_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["group_size"])
        return real(*args, **kwargs)

    iface.s2_attention = spy
    try:
        model(torch.randint(0, VOCAB, (1, 64)))
        model(torch.randint(0, VOCAB, (1, 128)))
        use_s2_attention(model, group_size=8)
        model(torch.randint(0, VOCAB, (1, 128)))
    finally:
        iface.s2_attention = real
    assert seen == [16, 16, 32, 32, 8, 8]  # two layers per forward


def test_gradient_checkpointing_with_s2():
    model = tiny("llama")
    model.activation_checkpointing_enable()
    use_s2_attention(model)
    model.train()
    ids, _ = _batch(n=64)
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_left_padding_gives_finite_gradients():
    model = tiny("llama")
    use_s2_attention(model)
    model.train()
    ids, _ = _batch(n=64)
    mask = torch.ones_like(ids)
    mask[0, :20] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_rejects_non_transformers_modules():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        use_s2_attention(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- flash backend


def _emulated_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                           causal=False, window_size=(-1, -1)):
    """flash_attn_varlen_func's contract on the CPU: [T, H, D] tokens cut by cu_seqlens."""
    out = torch.zeros_like(q)
    n_rep = q.shape[1] // k.shape[1]
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
        n = e - s
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if window_size[0] >= 0:
            mask &= ~torch.ones(n, n, dtype=torch.bool).tril(-window_size[0] - 1)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=softmax_scale)
        out[s:e] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize("shift", ["split", "roll"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_flash_backend_plumbing_with_emulated_kernel(monkeypatch, shift, heads):
    """The cu_seqlens, ordering and scatter logic, checked on the CPU against the reference."""
    from longtune.attention.flash import flash_s2_attention
    from longtune.attention.s2 import document_ids, key_padding

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_emulated_flash_varlen))
    b, (h, hkv), n, g = 3, heads, 64, 16
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(b, h, n, 8, generator=gen)
    k, v = torch.randn(b, hkv, n, 8, generator=gen), torch.randn(b, hkv, n, 8, generator=gen)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, 50:] = 0
    am[2, :7] = 0
    pos = torch.cat([torch.arange(30), torch.arange(34)])[None].expand(b, -1)
    out = flash_s2_attention(q, k, v, group_size=g, shift=shift, valid=key_padding(am, b, n),
                             docs=document_ids(pos, b, n), scaling=None, dropout=0.0, window=None)
    ref = reference_attention(q, k, v, s2_reference_mask(b, h, n, g, shift, am, pos))
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert (out[~real] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shift", ["split", "roll"])
def test_flash_backend_on_cuda_matches_sdpa(shift):
    pytest.importorskip("flash_attn")
    from longtune.attention import s2_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
    am = torch.ones(2, 1024, device="cuda", dtype=torch.long)
    am[1, 900:] = 0
    flash, _ = s2_attention(q, k, v, group_size=256, shift=shift, attention_mask=am, backend="flash")
    sdpa, _ = s2_attention(q, k, v, group_size=256, shift=shift, attention_mask=am, backend="sdpa")
    real = am.bool()
    torch.testing.assert_close(flash[real].float(), sdpa[real].float(), atol=2e-2, rtol=2e-2)
