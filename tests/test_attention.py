"""S2-Attn against its dense-mask reference: outputs and gradients, every shape that matters."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from longtune.attention import (
    full_attention,
    reference_attention,
    resolve_group_size,
    s2_attention,
    s2_reference_mask,
)

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True, params=["lean", "autograd"])
def executor(request, monkeypatch):
    """Run every test through both executors: the hand-written CPU backward, and plain
    autograd over SDPA (what CUDA and dropout > 0 use)."""
    import longtune.attention.s2 as s2

    monkeypatch.setattr(s2, "LEAN_CPU_BACKWARD", request.param == "lean")
    return request.param


def _inputs(b, h, hkv, n, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda heads: torch.randn(b, heads, n, d, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(h), mk(hkv), mk(hkv)


def _padding(b, n, side, seed=0):
    if side is None:
        return None
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.long)
    for row in range(b):
        real = int(torch.randint(1, n + 1, (1,), generator=g))
        if side == "right":
            mask[row, real:] = 0
        else:
            mask[row, : n - real] = 0
    return mask


def _packed_positions(b, n, seed=0):
    """Rows of 1-3 documents each, positions restarting at 0 at every document start."""
    rng = random.Random(seed)
    rows = []
    for _ in range(b):
        cuts = sorted(rng.sample(range(1, n), k=min(2, n - 1)))
        pos, last = [], 0
        for c in cuts + [n]:
            pos += range(c - last)
            last = c
        rows.append(pos)
    return torch.tensor(rows)


def _check(b, h, hkv, n, g, shift, pad, packed, window=None, seed=0):
    q, k, v = _inputs(b, h, hkv, n, seed=seed)
    am = _padding(b, n, pad, seed)
    pos = _packed_positions(b, n, seed) if packed else None
    out, none = s2_attention(
        q, k, v, group_size=g, shift=shift, attention_mask=am, position_ids=pos, sliding_window=window
    )
    assert none is None and out.shape == (b, n, h, q.shape[-1])
    mask = s2_reference_mask(b, h, n, g, shift, am, pos, sliding_window=window)
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, e in zip("qkv", got, want):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"d{name}: {m}")


# A deterministic sample of the full matrix keeps the suite fast while covering every axis.
_MATRIX = [
    c
    for c in itertools.product(
        [1, 3],  # batch
        [(4, 4), (8, 2), (6, 1), (5, 5)],  # (query heads, kv heads): MHA, GQA, MQA, odd
        [16, 40, 64],  # seq (40: not a multiple of the groups)
        [8, 16],  # group size (16 with seq 16: one group)
        ["split", "roll"],
        [None, "right", "left"],
        [False, True],  # packed documents
    )
    if not (c[4] == "roll" and c[2] > c[3] and c[2] % c[3])
]
_SAMPLE = random.Random(1234).sample(_MATRIX, 96)


@pytest.mark.parametrize("b,heads,n,g,shift,pad,packed", _SAMPLE)
def test_matches_dense_reference(b, heads, n, g, shift, pad, packed):
    _check(b, heads[0], heads[1], n, g, shift, pad, packed)


@pytest.mark.parametrize("shift", ["split", "roll"])
def test_padding_and_packing_together_batch_3(shift):
    _check(3, 8, 4, 64, 16, shift, "right", True, seed=7)
    _check(3, 8, 4, 64, 16, shift, "left", True, seed=8)


@pytest.mark.parametrize("window", [3, 8, 100])
def test_sliding_window_matches_reference(window):
    _check(2, 4, 2, 48, 16, "split", "right", True, window=window)
    _check(2, 4, 2, 48, 16, "roll", None, False, window=window)


def test_seq_not_multiple_of_group_in_split_mode():
    for n in (17, 33, 50, 63):
        _check(2, 4, 4, n, 16, "split", None, False)


def test_seq_at_most_one_group_is_plain_causal():
    b, h, n = 2, 4, 12
    q, k, v = _inputs(b, h, h, n)
    out, _ = s2_attention(q, k, v, group_size=16)
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None].expand(b, h, n, n)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal), **TOL)


def test_split_never_attends_to_a_later_token():
    b, h, n, g = 2, 8, 96, 32
    q, k, v = _inputs(b, h, h, n)
    base, _ = s2_attention(q, k, v, group_size=g, shift="split")
    for t in (0, 15, 16, 31, 47, 63, 80):
        q2, k2, v2 = (x.detach().clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t + 1 :] = torch.randn_like(x[:, :, t + 1 :])
        changed, _ = s2_attention(q2, k2, v2, group_size=g, shift="split")
        assert torch.equal(changed[:, : t + 1], base.detach()[:, : t + 1]), f"token <= {t} saw the future"


def test_split_reference_mask_is_causal_and_roll_mask_is_not():
    split = s2_reference_mask(1, 4, 64, 16, "split")
    assert not split.triu(1).any()
    roll = s2_reference_mask(1, 4, 64, 16, "roll")
    # the shifted heads' first G/2 tokens see the last G/2 tokens: the documented leak
    assert roll[0, 2:, 0, 56:].all() and not roll[0, :2, 0, 56:].any()


def test_roll_leaks_future_tokens():
    b, h, n, g = 1, 4, 64, 16
    q, k, v = _inputs(b, h, h, n)
    base, _ = s2_attention(q, k, v, group_size=g, shift="roll")
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, -1], v2[:, :, -1] = 5.0, 5.0
    changed, _ = s2_attention(q, k2, v2, group_size=g, shift="roll")
    shifted_heads = slice(h // 2, h)
    assert not torch.allclose(changed[:, 0, shifted_heads], base[:, 0, shifted_heads])


def test_unshifted_and_shifted_heads_differ_from_full_attention():
    q, k, v = _inputs(1, 4, 4, 64)
    s2, _ = s2_attention(q, k, v, group_size=16)
    full, _ = full_attention(q, k, v)
    assert not torch.allclose(s2, full, atol=1e-3)
    # the first group of the unshifted heads sees exactly what full attention sees
    torch.testing.assert_close(s2[:, :16, :2], full[:, :16, :2], **TOL)


def test_full_attention_matches_causal_reference_with_padding_and_documents():
    b, h, n = 3, 4, 40
    q, k, v = _inputs(b, h, 2, n)
    am, pos = _padding(b, n, "left"), _packed_positions(b, n)
    out, _ = full_attention(q, k, v, attention_mask=am, position_ids=pos)
    mask = s2_reference_mask(b, h, n, n, "split", am, pos)  # one group = causal
    torch.testing.assert_close(out, reference_attention(q, k, v, mask), **TOL)


def test_full_attention_with_kv_cache_offsets_queries():
    b, h, n, new = 2, 4, 20, 3
    q, k, v = _inputs(b, h, h, n)
    full, _ = full_attention(q, k, v)
    last, _ = full_attention(q[:, :, -new:], k, v)
    torch.testing.assert_close(last, full[:, -new:], **TOL)


def test_fp64_agreement_is_exact():
    q, k, v = _inputs(2, 4, 2, 48, dtype=torch.float64)
    am = _padding(2, 48, "right")
    out, _ = s2_attention(q, k, v, group_size=16, attention_mask=am)
    ref = reference_attention(q, k, v, s2_reference_mask(2, 4, 48, 16, "split", am))
    assert (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(shift="roll", group_size=16, n=40), "multiple of group_size"),
        (dict(group_size=7, n=32), "even"),
        (dict(shift="diagonal", group_size=8, n=32), "shift must be"),
        (dict(group_size=8, n=32, heads=1), "at least 2 heads"),
        (dict(group_size=8, n=32, backend="magic"), "backend must be"),
        (dict(group_size=8, n=32, backend="flash"), "flash-attn"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    kwargs = dict(kwargs)
    n, heads = kwargs.pop("n"), kwargs.pop("heads", 4)
    q, k, v = _inputs(1, heads, heads, n)
    with pytest.raises((ValueError, RuntimeError), match=message):
        s2_attention(q, k, v, **kwargs)


def test_bad_masks_and_shapes_are_named():
    q, k, v = _inputs(2, 4, 4, 32)
    with pytest.raises(ValueError, match="2-D padding mask"):
        s2_attention(q, k, v, group_size=8, attention_mask=torch.ones(2, 1, 32, 32))
    with pytest.raises(ValueError, match="no KV cache"):
        s2_attention(q, k[:, :, :16], v[:, :, :16], group_size=8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        s2_attention(q, k[:, :3], v[:, :3], group_size=8)


def test_group_size_from_ratio():
    assert resolve_group_size(1024, None, 0.25) == 256
    assert resolve_group_size(1000, None, 0.25) == 250
    assert resolve_group_size(1002, None, 0.25) == 250  # 250.5 -> even
    assert resolve_group_size(5, None, 0.25) == 2
    assert resolve_group_size(4096, 512, 0.25) == 512
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        resolve_group_size(64, None, 1.5)


def test_dropout_runs_in_training_and_is_random():
    q, k, v = _inputs(1, 4, 4, 64)
    a, _ = s2_attention(q, k, v, group_size=16, dropout=0.5)
    b, _ = s2_attention(q, k, v, group_size=16, dropout=0.5)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    a.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_bfloat16_close_to_fp32_reference():
    q, k, v = _inputs(2, 4, 2, 64)
    out, _ = s2_attention(*(x.detach().bfloat16() for x in (q, k, v)), group_size=16)
    ref = reference_attention(q, k, v, s2_reference_mask(2, 4, 64, 16))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_autocast_with_mixed_input_dtypes_matches_sdpa_behaviour():
    """q/k in fp32 (after RoPE) and v in bf16 (its projection), as models give them."""
    q, k, v = _inputs(1, 4, 4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = s2_attention(q, k, v.bfloat16(), group_size=16)
        full, _ = full_attention(q, k, v.bfloat16())
    assert out.dtype == torch.bfloat16 and full.dtype == torch.bfloat16
    ref = reference_attention(q, k, v, s2_reference_mask(1, 4, 64, 16))
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
