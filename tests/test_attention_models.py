"""S2-Attn inside real transformers models built from config (no downloads)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

from longtune.attention import (
    ATTN_IMPLEMENTATION,
    reference_attention,
    resolve_group_size,
    s2_reference_mask,
    s2_settings,
    use_document_full_attention,
    use_full_attention,
    use_s2_attention,
)
from conftest import tiny_lm

ARCHS = ["llama", "mistral", "qwen2"]
VOCAB = 97


def tiny(arch: str, **overrides) -> torch.nn.Module:
    return tiny_lm(arch, vocab_size=VOCAB, **overrides)


def _reference_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense-mask S2 (training) through the same AttentionInterface slot, for comparison."""
    settings = s2_settings_of(module)
    n = query.shape[2]
    mask = s2_reference_mask(
        query.shape[0], query.shape[1], n,
        resolve_group_size(n, settings.group_size, settings.group_size_ratio), settings.shift,
        attention_mask, kwargs.get("position_ids"), kwargs.get("sliding_window"),
    )
    return reference_attention(query, key, value, mask, scaling, softcap=kwargs.get("softcap")), None


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
    from conftest import varlen_attention_reference

    return varlen_attention_reference(q, k, v, cu_q, softmax_scale, window_size[0])


@pytest.mark.parametrize("shift", ["split", "roll"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_flash_backend_plumbing_with_emulated_kernel(monkeypatch, shift, heads):
    """The cu_seqlens, ordering and scatter logic, checked on the CPU against the reference."""
    from longtune.attention.flash import flash_s2_attention
    from longtune.attention.masks import document_ids, key_padding

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


# ---------------------------------------------------------------- Gemma 2/3, Qwen3, Mistral: softcap, sliding layers

# Each with sliding-window layers (window 16) beside full ones; Gemma 2 caps its logits.
FAMILIES = {
    "gemma2": dict(sliding_window=16, attn_logit_softcapping=1.0, query_pre_attn_scalar=4),
    "gemma3": dict(sliding_window=16, query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"]),
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=16, max_window_layers=1),
    "mistral": dict(sliding_window=16),
}


def tiny_family(arch: str, **overrides) -> torch.nn.Module:
    model = tiny_lm(arch, vocab_size=VOCAB, **{**FAMILIES[arch], **overrides})
    with torch.no_grad():  # logits large enough that a cap of 1.0 changes them
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    return model


def _packed(n=64, b=2):
    return torch.cat([torch.arange(25), torch.arange(30), torch.arange(n - 55)])[None].expand(b, -1)


def _own_attention(arch):
    return "eager" if arch == "gemma2" else "sdpa"  # stock sdpa cannot softcap


def test_gemma2_softcap_changes_its_own_attention():
    """The cap the next tests honour is not a no-op at these scales."""
    model = tiny_family("gemma2", attn_implementation="eager").eval()
    ids, _ = _batch()
    capped = model(ids).logits
    for m in model.modules():
        if hasattr(m, "attn_logit_softcapping"):
            m.attn_logit_softcapping = None
    assert (model(ids).logits - capped).abs().max() > 1e-2


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("rows", ["packed", "right-padded"])
def test_eval_equals_the_models_own_attention(arch, rows):
    model = tiny_family(arch, attn_implementation=_own_attention(arch)).eval()
    ids, mask = _batch(n=64)
    if rows == "packed":  # stock models see packing only without a mask and a cache
        kwargs, real = dict(position_ids=_packed(), use_cache=False), torch.ones_like(mask, dtype=torch.bool)
    else:
        kwargs, real = dict(attention_mask=mask), mask.bool()
    want = model(ids, **kwargs).logits
    use_s2_attention(model)
    got = model(ids, **kwargs).logits
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("shift", ["split", "roll"])
def test_training_equals_dense_reference_with_softcap_and_windows(arch, shift):
    model = tiny_family(arch)
    use_s2_attention(model, 0.25, shift)  # 128 tokens: groups of 32, wider than the window
    model.train()
    ids, mask = _batch(n=128)
    pos = torch.cat([torch.arange(70), torch.arange(58)])[None].expand(2, -1)
    got = model(ids, attention_mask=mask, position_ids=pos).logits
    model.set_attn_implementation("longtune_reference")
    want = model(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


def test_bidirectional_attention_is_refused():
    model = tiny_family("gemma3", use_bidirectional_attention=True)
    use_s2_attention(model)
    with pytest.raises(ValueError, match="bidirectional"):
        model(torch.randint(0, VOCAB, (1, 16)))


# ---------------------------------------------------------------- per-forward masks inside a model


def test_masks_built_once_per_forward_and_released_after(monkeypatch):
    import longtune.attention.masks as masks
    import longtune.attention.s2 as s2

    calls = []
    real = s2.group_mask
    monkeypatch.setattr(s2, "group_mask", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ids, mask = _batch(n=64)
    pos = _packed()
    one = tiny("llama", num_hidden_layers=1)
    use_s2_attention(one)
    one.train()
    one(ids, attention_mask=mask, position_ids=pos)
    per_forward = len(calls)
    calls.clear()
    four = tiny("llama", num_hidden_layers=4)
    use_s2_attention(four)
    four.train()
    four(ids, attention_mask=mask, position_ids=pos).logits.sum().backward()
    assert per_forward > 0 and len(calls) == per_forward  # not four times as many
    assert masks.cached_entries() == 0  # released when the forward ended; pos is still alive


def test_gradient_checkpointing_recompute_with_packed_rows():
    """The recompute reuses (or rebuilds) the forward's masks: gradients as without it."""
    ids, mask = _batch(n=64)
    pos = _packed()
    grads = []
    for checkpointing in (None, False, True):  # off, non-reentrant, reentrant
        model = tiny("qwen2", num_hidden_layers=3)
        if checkpointing is not None:
            model.activation_checkpointing_enable({"use_reentrant": checkpointing})
        use_s2_attention(model)
        model.train()
        labels = ids.masked_fill(mask == 0, -100)
        model(ids, attention_mask=mask, position_ids=pos, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_eval_of_long_packed_rows_builds_no_n_by_n_mask():
    from conftest import largest_bool_tensor

    n = 256
    model = tiny("llama")
    use_s2_attention(model)
    model.eval()
    ids = torch.randint(0, VOCAB, (1, n))
    pos = torch.cat([torch.arange(100), torch.arange(90), torch.arange(66)])[None]
    outputs = []
    with torch.no_grad():
        largest = largest_bool_tensor(lambda: outputs.append(model(input_ids=ids, position_ids=pos, use_cache=False)))
    got = outputs[0].logits
    assert largest < n * n // 4
    use_full_attention(model)
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _full_reference_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense-mask full causal attention: a key is seen when it is not padding, not in the
    query's future, in the query's document (position ids restart at 0) and its window."""
    b, h, n, _ = query.shape
    pos = kwargs["position_ids"].expand(b, n)
    doc = (pos == 0).cumsum(-1)  # [B, N] document index per token
    i = torch.arange(n)
    mask = (i[None, :, None] >= i[None, None, :]) & (doc[:, :, None] == doc[:, None, :])  # [B, N, N]
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, :]
    window = kwargs.get("sliding_window")
    if window is not None:
        mask = mask & (i[:, None] - i[None, :] < window)
    return reference_attention(query, key, value, mask[:, None].expand(b, h, n, n), scaling,
                               softcap=kwargs.get("softcap")), None


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 16})])
def test_document_full_attention_trains_like_the_dense_document_mask(arch, overrides):
    """attention.type=full's training path: each document its own causal call (the CPU's
    lean spans; windows as bands), equal to the dense mask in outputs and gradients."""
    AttentionInterface.register("longtune_full_reference", _full_reference_interface)
    AttentionMaskInterface.register("longtune_full_reference", flash_attention_mask)
    model = tiny(arch, **overrides)
    use_document_full_attention(model)
    assert model.config._attn_implementation == ATTN_IMPLEMENTATION and s2_settings(model).full
    model.train()
    ids, mask = _batch(n=96)
    pos = torch.cat([torch.arange(40), torch.arange(30), torch.arange(26)])[None].expand(2, -1)
    real = mask.bool()
    results = []
    for implementation in (ATTN_IMPLEMENTATION, "longtune_full_reference"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        logits = model(ids, attention_mask=mask, position_ids=pos).logits
        logits[real].float().pow(2).mean().backward()  # padding's outputs reach no real token
        results.append((logits[real].detach(), {k: p.grad.clone() for k, p in model.named_parameters()}))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    use_full_attention(model)  # back to the model's own
    assert model.config._attn_implementation == "sdpa" and s2_settings(model) is None


def test_attention_type_full_trains_with_document_full_attention(tmp_path):
    from longtune.config import load_config
    from longtune.train.parallel import adapted_model

    config = load_config(None, ["attention.type=full"])
    model = adapted_model(config, tiny("llama"))
    assert s2_settings(model).full and s2_settings(model).backend == config.attention.backend


# ---------------------------------------------------------------- torch varlen backend inside a model (emulated)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])
def test_varlen_backend_in_a_model_with_emulated_kernel(monkeypatch, caplog, arch):
    """backend='varlen' end to end on the CPU, training and eval: the kernel is emulated, the
    plumbing is real.
    Gemma 2's softcap is beyond torch's kernel: those layers fall back, saying so once."""
    import longtune.attention.backends as bk
    from tests.test_attention import _fake_torch_varlen

    bk.reset_probes()
    monkeypatch.setattr(bk, "torch_varlen_probe", lambda: (_fake_torch_varlen, None))
    monkeypatch.setattr(bk, "gpu_reason", lambda query, what: None)
    model = tiny_family(arch)
    use_s2_attention(model, backend="varlen")
    ids, mask = _batch(n=128)
    pos = torch.cat([torch.arange(70), torch.arange(58)])[None].expand(2, -1)
    real = mask.bool()
    with caplog.at_level("WARNING", logger="longtune.attention"):
        for train in (True, False):
            model.train(train)
            got = model(ids, attention_mask=mask, position_ids=pos).logits
            if train:  # the dense S2 reference
                model.set_attn_implementation("longtune_reference")
            else:  # full attention on the SDPA backend (stock models ignore packing under a mask)
                use_s2_attention(model, backend="sdpa")
            want = model(ids, attention_mask=mask, position_ids=pos).logits
            use_s2_attention(model, backend="varlen")
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    said = [r.getMessage() for r in caplog.records]
    assert said == (["attention.backend='varlen': torch varlen_attn cannot softcap attention logits; "
                     "these layers run the exact SDPA/math path instead"] if arch == "gemma2" else [])
    bk.reset_probes()
