"""S2-Attn against its dense-mask reference: outputs and gradients, every shape that matters."""

from __future__ import annotations

import itertools
import random
import sys
import types

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


def _check(b, h, hkv, n, g, shift, pad, packed, window=None, seed=0, softcap=None, scale=4.0):
    q, k, v = _inputs(b, h, hkv, n, seed=seed)
    if softcap is not None:  # logits well beyond the cap, so capping changes the result
        q = (q.detach() * scale).requires_grad_()
    am = _padding(b, n, pad, seed)
    pos = _packed_positions(b, n, seed) if packed else None
    out, none = s2_attention(
        q, k, v, group_size=g, shift=shift, attention_mask=am, position_ids=pos, sliding_window=window,
        softcap=softcap,
    )
    assert none is None and out.shape == (b, n, h, q.shape[-1])
    mask = s2_reference_mask(b, h, n, g, shift, am, pos, sliding_window=window)
    ref = reference_attention(q, k, v, mask, softcap=softcap)
    if softcap is not None:
        assert not torch.allclose(ref, reference_attention(q, k, v, mask), atol=1e-2)
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


@pytest.mark.parametrize("side", ["left", "right", None])
def test_full_attention_matches_causal_reference_with_padding_and_documents(side):
    b, h, n = 3, 4, 40
    q, k, v = _inputs(b, h, 2, n)
    am, pos = _padding(b, n, side), _packed_positions(b, n)
    out, _ = full_attention(q, k, v, attention_mask=am, position_ids=pos)
    mask = s2_reference_mask(b, h, n, n, "split", am, pos)  # one group = causal
    ref = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref, **TOL)
    grad = torch.randn_like(out)
    for name, a, e in zip("qkv", torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("shift", ["split", "roll"])
def test_lean_path_cuts_groups_into_document_runs_without_masks(executor, shift):
    """On the CPU's lean path a group holding document starts or padding is cut into causal
    runs: no [g, g] mask at all; both executors give the same outputs and gradients as the dense reference,
    for many short documents, padding at both ends and a one-token document."""
    b, h, n, g = 2, 4, 256, 64
    q, k, v = _inputs(b, h, 2, n)
    lengths = [1, 30, 7, 90, 2, 60, 66]
    pos = torch.cat([torch.arange(x) for x in lengths])[None].expand(b, -1)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, 200:] = 0  # right padding: its groups are runs plus a padding span
    out = []

    def run():
        out.append(s2_attention(q, k, v, group_size=g, shift=shift, attention_mask=am, position_ids=pos)[0])
        out.append(full_attention(q, k, v, attention_mask=am, position_ids=pos)[0])
        torch.autograd.grad(out[0].sum() + out[1].sum(), (q, k, v), retain_graph=True)

    largest = _largest_bool(run)
    if executor == "lean":  # the autograd executor masks such groups instead
        assert largest < g * g // 4
    for got, group in zip(out, (g, n)):
        ref = reference_attention(q, k, v, s2_reference_mask(b, h, n, group, shift if group < n else "split", am, pos))
        torch.testing.assert_close(got, ref, **TOL)
        grad = torch.randn_like(got)
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for name, a, e in zip("qkv", torch.autograd.grad(got, (q, k, v), grad, retain_graph=True), want):
            torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"d{name}: {m}")


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
        (dict(group_size=8, n=32, backend="varlen"), "varlen_attn"),
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


# ---------------------------------------------------------------- softcap (Gemma 2)


@pytest.mark.parametrize(
    "b,heads,n,g,shift,pad,packed,window",
    [
        (2, (4, 2), 48, 16, "split", "right", True, None),
        (3, (4, 4), 64, 16, "roll", "left", False, None),
        (2, (6, 3), 40, 8, "split", None, True, 5),
        (1, (4, 1), 16, 16, "split", "right", False, None),  # one group
    ],
)
def test_softcap_matches_capped_reference(b, heads, n, g, shift, pad, packed, window):
    _check(b, heads[0], heads[1], n, g, shift, pad, packed, window=window, softcap=1.5)


def test_softcap_blocks_cover_rows_and_queries(monkeypatch):
    """Blocks smaller than one group's scores: the forward and the recomputing backward
    cut queries (and rows) into pieces, and the result must not move."""
    import longtune.attention.softcap as sc

    monkeypatch.setattr(sc, "BLOCK_ELEMENTS", 200)  # 4 heads x 5 queries x 10 keys
    _check(2, 4, 2, 40, 10, "split", "right", True, softcap=2.0)
    monkeypatch.setattr(sc, "BLOCK_ELEMENTS", 4 * 10 * 10 * 3)  # three whole groups per block
    _check(2, 4, 2, 40, 10, "split", None, False, softcap=2.0)


@pytest.mark.parametrize("shift", ["split", "roll"])
def test_lean_forward_blocks_cover_every_span(monkeypatch, executor, shift):
    """The lean CPU forward calls the kernel on a few folded rows at a time, writing each
    block into the output: blocks of one row, and of three rows crossing the edges of the
    masked spans (padding, document starts), must give the reference's output and grads."""
    import longtune.attention.s2 as s2

    sizes = []
    real = s2._forward_blocks

    def spy(span, n_heads, head_elements):
        for rows, heads in real(span, n_heads, head_elements):
            sizes.append((rows.stop - rows.start, len(range(n_heads)[heads]), head_elements))
            yield rows, heads

    monkeypatch.setattr(s2, "_forward_blocks", spy)
    # 1 element: one head of one group a call; 16 x 8 x 4 x 3 (g x D x heads x 3): three rows
    # of a whole group's 4 heads; 16 x 8 x 3: three of the 4 heads of one whole group
    for block, cut in ((1, (1, 1)), (16 * 8 * 4 * 3, (3, 4)), (16 * 8 * 3, (1, 3))):
        monkeypatch.setattr(s2, "_FORWARD_BLOCK_ELEMENTS", block)
        sizes.clear()
        _check(3, 8, 4, 64, 16, shift, "right", True, seed=7)
        _check(3, 8, 4, 64, 16, shift, "left", True, seed=8)
        if executor == "lean":
            assert cut + (16 * 8,) in sizes
            assert all(r * h * e <= max(block, e) for r, h, e in sizes)


def test_full_attention_softcap_padding_documents_window():
    b, h, n = 3, 4, 40
    q, k, v = _inputs(b, h, 2, n)
    q = (q.detach() * 4).requires_grad_()
    am, pos = _padding(b, n, "right"), _packed_positions(b, n)
    for window in (None, 6):
        out, _ = full_attention(q, k, v, attention_mask=am, position_ids=pos, sliding_window=window, softcap=1.0)
        ref = reference_attention(q, k, v, s2_reference_mask(b, h, n, n, "split", am, pos, window), softcap=1.0)
        torch.testing.assert_close(out, ref, **TOL)
        grad = torch.randn_like(out)
        for a, e in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
            torch.testing.assert_close(a, e, **TOL)


def test_softcap_with_kv_cache_and_dropout():
    b, h, n, new = 2, 4, 20, 3
    q, k, v = _inputs(b, h, 2, n)
    full, _ = full_attention(q * 4, k, v, softcap=1.0)
    last, _ = full_attention(q[:, :, -new:] * 4, k, v, softcap=1.0)
    torch.testing.assert_close(last, full[:, -new:], **TOL)
    a, _ = s2_attention(q * 4, k, v, group_size=8, softcap=1.0, dropout=0.5)
    a.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("bad", [-1.0, float("inf"), "50", True])
def test_bad_softcap_is_named(bad):
    q, k, v = _inputs(1, 4, 4, 16)
    with pytest.raises(ValueError, match="softcap"):
        s2_attention(q, k, v, group_size=8, softcap=bad)


# ---------------------------------------------------------------- masks: once per forward, only where needed


def _largest_bool(fn) -> int:
    from conftest import largest_bool_tensor

    return largest_bool_tensor(fn)


def test_full_attention_of_packed_rows_builds_no_n_by_n_mask():
    b, h, n = 2, 2, 512
    q, k, v = _inputs(b, h, h, n)
    pos = torch.cat([torch.arange(200), torch.arange(312)])[None].expand(b, -1)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, 480:] = 0
    for window in (None, 64):
        out = []

        def run(window=window, out=out):
            out.append(full_attention(q, k, v, attention_mask=am, position_ids=pos, sliding_window=window)[0])
            out[0].sum().backward()

        assert _largest_bool(run) < n * n // 4
        ref = reference_attention(q, k, v, s2_reference_mask(b, h, n, n, "split", am, pos, window))
        torch.testing.assert_close(out[0], ref, **TOL)


def test_s2_masks_only_the_groups_with_a_document_start():
    b, h, n, g = 1, 4, 256, 64
    q, k, v = _inputs(b, h, h, n)
    pos = torch.cat([torch.arange(100), torch.arange(156)])[None]  # one start, inside one group per piece
    largest = _largest_bool(lambda: s2_attention(q, k, v, group_size=g, position_ids=pos)[0].sum().backward())
    assert largest <= g * g  # a dense mask for every group would be 3-4x that
    ref = reference_attention(q, k, v, s2_reference_mask(b, h, n, g, "split", None, pos))
    torch.testing.assert_close(s2_attention(q, k, v, group_size=g, position_ids=pos)[0], ref, **TOL)


def test_masks_are_built_once_for_every_layer_of_a_forward(monkeypatch):
    import longtune.attention.masks as masks
    import longtune.attention.s2 as s2

    masks.clear_forward_cache()
    calls = []
    real = s2.group_mask
    monkeypatch.setattr(s2, "group_mask", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _inputs(2, 4, 2, 64)
    pos = _packed_positions(2, 64)
    am = _padding(2, 64, "right")
    first, _ = s2_attention(q, k, v, group_size=16, attention_mask=am, position_ids=pos)
    per_layer = len(calls)
    assert per_layer > 0 and masks.cached_entries() == 1
    for _ in range(3):  # three more "layers" of the same forward: same position_ids object
        again, _ = s2_attention(q, k, v, group_size=16, attention_mask=am, position_ids=pos)
    assert len(calls) == per_layer
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_cache_never_serves_stale_masks():
    import gc

    import longtune.attention.masks as masks

    q, k, v = _inputs(2, 4, 4, 48)
    pos = _packed_positions(2, 48, seed=1)
    s2_attention(q, k, v, group_size=16, position_ids=pos)
    pos[:, 20:] = torch.arange(28)  # in place: a different packing, same object
    out, _ = s2_attention(q, k, v, group_size=16, position_ids=pos)
    ref = reference_attention(q, k, v, s2_reference_mask(2, 4, 48, 16, "split", None, pos))
    torch.testing.assert_close(out, ref, **TOL)
    masks.clear_forward_cache()
    for seed in range(4):  # fresh tensors (ids may be reused once the old ones are freed)
        pos = _packed_positions(2, 48, seed=seed)
        out, _ = s2_attention(q, k, v, group_size=16, position_ids=pos)
        ref = reference_attention(q, k, v, s2_reference_mask(2, 4, 48, 16, "split", None, pos))
        torch.testing.assert_close(out, ref, **TOL)
        del pos
        gc.collect()
        assert masks.cached_entries() == 0  # freed with its position_ids


def test_full_attention_of_documents_in_inference_mode():
    q, k, v = (x.detach() for x in _inputs(2, 4, 2, 40))
    pos, am = _packed_positions(2, 40), _padding(2, 40, "right")
    with torch.inference_mode():
        pos_i, am_i = pos.clone(), am.clone()  # inference tensors: no version counter
        out, _ = full_attention(q, k, v, attention_mask=am_i, position_ids=pos_i)
        again, _ = full_attention(q, k, v, attention_mask=am_i, position_ids=pos_i)
    ref = reference_attention(q, k, v, s2_reference_mask(2, 4, 40, 40, "split", am, pos))
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


# ---------------------------------------------------------------- backend choice


class _FakeCuda:
    """Enough of a CUDA query tensor for the backend choice (no GPU here)."""

    is_cuda = True
    device = torch.device("cuda", 0)

    def __init__(self, dtype=torch.bfloat16, head_dim=64):
        self.dtype, self.shape = dtype, (1, 8, 128, head_dim)


@pytest.fixture
def backends(monkeypatch):
    import longtune.attention.backends as bk

    bk.reset_probes()
    monkeypatch.setattr(bk, "_capability", lambda index: (9, 0))
    yield bk
    monkeypatch.undo()
    bk.reset_probes()


def _fake_torch_varlen(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                       window_size=(-1, -1), enable_gqa=False):
    """torch 2.13's varlen_attn contract on the CPU: [T, H, D] tokens cut by cu_seqlens."""
    if q.shape[1] != k.shape[1] and not enable_gqa:
        raise ValueError("Expect query and key/value to have the same number of heads")
    assert window_size[1] == 0, "S2 and full attention are causal"
    return _emulate(q, k, v, cu_seq_q, scale, window_size[0])


def _fake_torch_varlen_2_10(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """An older spelling: is_causal, no scale, no window, no GQA."""
    if q.shape[1] != k.shape[1]:
        raise RuntimeError("heads differ")
    assert is_causal
    return _emulate(q, k, v, cu_seq_q, None, -1)


def _emulate(q, k, v, cu, scale, left):
    from conftest import varlen_attention_reference

    return varlen_attention_reference(q, k, v, cu, scale, left)


def test_auto_needs_flash_attn_to_import_not_just_to_be_found(backends, monkeypatch, caplog):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # importing it raises ImportError
    monkeypatch.setattr(backends, "torch_varlen_probe", lambda: (_fake_torch_varlen, None))
    with caplog.at_level("WARNING", logger="longtune.attention"):
        picks = [backends.pick_backend("auto", _FakeCuda()) for _ in range(6)]  # six "layers"
    assert picks == ["varlen"] * 6
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "does not import" in said[0] and "varlen_attn" in said[0], said
    with pytest.raises(RuntimeError, match="backend='flash' cannot run: flash-attn is installed but does not import"):
        backends.pick_backend("flash", _FakeCuda())


def test_auto_checks_the_gpu_and_dtype(backends, monkeypatch, caplog):
    monkeypatch.setattr(backends, "flash_attn_probe", lambda: (_emulated_flash_varlen, None))
    monkeypatch.setattr(backends, "torch_varlen_probe", lambda: (_fake_torch_varlen, None))
    assert backends.pick_backend("auto", _FakeCuda()) == "flash"
    assert backends.pick_backend("auto", _FakeCuda(torch.float32)) == "sdpa"
    assert "fp16 or bf16" in caplog.records[-1].getMessage()
    monkeypatch.setattr(backends, "_capability", lambda index: (7, 5))  # a T4
    with caplog.at_level("WARNING", logger="longtune.attention"):
        assert backends.pick_backend("auto", _FakeCuda()) == "sdpa"
    assert "compute capability >= 8.0" in caplog.records[-1].getMessage()
    with pytest.raises(RuntimeError, match="compute capability"):
        backends.pick_backend("varlen", _FakeCuda())
    # on the CPU, auto is SDPA without a word; an explicit GPU backend is an error
    q = torch.zeros(1, 2, 4, 8)
    assert backends.pick_backend("auto", q) == "sdpa"
    with pytest.raises(RuntimeError, match="backend='varlen' cannot run: torch varlen_attn needs a CUDA tensor"):
        backends.pick_backend("varlen", q)


def test_varlen_features_are_detected_and_softcap_falls_back(backends, monkeypatch, caplog):
    monkeypatch.setattr(backends, "flash_attn_probe", lambda: (None, "flash-attn is not installed"))
    monkeypatch.setattr(backends, "torch_varlen_probe", lambda: (_fake_torch_varlen_2_10, None))
    assert backends.pick_backend("auto", _FakeCuda()) == "varlen"
    with caplog.at_level("WARNING", logger="longtune.attention"):
        assert backends.pick_backend("auto", _FakeCuda(), window=16) == "sdpa"  # no window_size here
        assert backends.pick_backend("varlen", _FakeCuda(), softcap=50.0) == "sdpa"
        assert backends.pick_backend("varlen", _FakeCuda(), softcap=50.0) == "sdpa"
    said = [r.getMessage() for r in caplog.records]
    assert any("window_size" in m for m in said) and sum("softcap" in m for m in said) == 1, said
    assert backends.pick_backend("auto", _FakeCuda(), needs_masks=False) == "sdpa"  # plain causal groups
    report = backends.backend_report("cpu")
    assert report["sdpa"] == "usable" and "CUDA" in report["varlen"]


@pytest.mark.parametrize("fake", [_fake_torch_varlen, _fake_torch_varlen_2_10])
@pytest.mark.parametrize("mode", ["split", "roll", "full"])
def test_torch_varlen_plumbing_with_emulated_kernel(backends, monkeypatch, fake, mode):
    """cu_seqlens, ordering, GQA, scale and scatter of the torch varlen backend, on the CPU,
    through s2_attention/full_attention with backend='varlen' (outputs and gradients)."""
    monkeypatch.setattr(backends, "torch_varlen_probe", lambda: (fake, None))
    monkeypatch.setattr(backends, "gpu_reason", lambda query, what: None)
    b, h, hkv, n, g = 3, 8, 2, 64, 16
    q, k, v = _inputs(b, h, hkv, n, seed=5)
    am = torch.ones(b, n, dtype=torch.long)
    am[1, 50:] = 0
    am[2, :7] = 0
    pos = torch.cat([torch.arange(30), torch.arange(34)])[None].expand(b, -1)
    window = 5 if fake is _fake_torch_varlen else None
    kw = dict(attention_mask=am, position_ids=pos, scaling=0.2, sliding_window=window, backend="varlen")
    if mode == "full":
        out, _ = full_attention(q, k, v, **kw)
        mask = s2_reference_mask(b, h, n, n, "split", am, pos, window)
    else:
        out, _ = s2_attention(q, k, v, group_size=g, shift=mode, **kw)
        mask = s2_reference_mask(b, h, n, g, mode, am, pos, window)
    ref = reference_attention(q, k, v, mask, scaling=0.2)
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)
    assert (out[~real] == 0).all()
    grad = torch.randn_like(out) * real[:, :, None, None]
    for a, e in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, e, **TOL)


def _emulated_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None,
                           causal=False, window_size=(-1, -1), softcap=0.0):
    """flash_attn_varlen_func's contract on the CPU, softcap included."""
    assert causal
    if not softcap:
        return _emulate(q, k, v, cu_q, softmax_scale, window_size[0])
    out = torch.zeros_like(q)
    n_rep = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[s:e].transpose(0, 1) for x in (q, k, v))
        ks, vs = ks.repeat_interleave(n_rep, 0), vs.repeat_interleave(n_rep, 0)
        m = e - s
        allowed = torch.ones(m, m, dtype=torch.bool).tril()
        if window_size[0] >= 0:
            allowed &= ~torch.ones(m, m, dtype=torch.bool).tril(-window_size[0] - 1)
        scores = torch.tanh(qs @ ks.transpose(-1, -2) * scale / softcap) * softcap
        o = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs
        out = out.index_copy(0, torch.arange(s, e), o.transpose(0, 1))
    return out


@pytest.mark.parametrize("mode", ["split", "full"])
def test_flash_backend_softcap_plumbing_with_emulated_kernel(backends, monkeypatch, mode):
    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_emulated_flash_varlen))
    monkeypatch.setattr(backends, "flash_attn_probe", lambda: (_emulated_flash_varlen, None))
    monkeypatch.setattr(backends, "gpu_reason", lambda query, what: None)
    b, h, n, g = 2, 4, 48, 16
    q, k, v = _inputs(b, h, 2, n, seed=2)
    q = (q.detach() * 4).requires_grad_()
    am = _padding(b, n, "right", seed=3)
    pos = _packed_positions(b, n, seed=3)
    kw = dict(attention_mask=am, position_ids=pos, softcap=1.0, sliding_window=6, backend="flash")
    if mode == "full":
        out, _ = full_attention(q, k, v, **kw)
        mask = s2_reference_mask(b, h, n, n, "split", am, pos, 6)
    else:
        out, _ = s2_attention(q, k, v, group_size=g, **kw)
        mask = s2_reference_mask(b, h, n, g, "split", am, pos, 6)
    ref = reference_attention(q, k, v, mask, softcap=1.0)
    real = am.bool()
    torch.testing.assert_close(out[real], ref[real], **TOL)


# ---------------------------------------------------------------- every backend on a GPU


def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    from longtune.attention import backend_report

    return [name for name, state in backend_report("cuda").items() if state == "usable"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shift", ["split", "roll"])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_every_cuda_backend_matches_the_reference(shift, softcap):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, h, hkv, n, g, d = 2, 8, 2, 512, 128, 64
    mk = lambda heads: torch.randn(b, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q, k, v = mk(h) * 3, mk(hkv), mk(hkv)
    am = torch.ones(b, n, device="cuda", dtype=torch.long)
    am[1, 450:] = 0
    pos = torch.cat([torch.arange(200), torch.arange(312)]).cuda()[None].expand(b, -1)
    for window in (None, 48):
        s2_ref = reference_attention(q.float(), k.float(), v.float(),
                                     s2_reference_mask(b, h, n, g, shift, am, pos, window), softcap=softcap)
        full_ref = reference_attention(q.float(), k.float(), v.float(),
                                       s2_reference_mask(b, h, n, n, "split", am, pos, window), softcap=softcap)
        real = am.bool()
        for backend in _cuda_backends():
            kw = dict(attention_mask=am, position_ids=pos, sliding_window=window, softcap=softcap, backend=backend)
            s2, _ = s2_attention(q, k, v, group_size=g, shift=shift, **kw)
            full, _ = full_attention(q, k, v, **kw)
            torch.testing.assert_close(s2[real].float(), s2_ref[real], atol=2e-2, rtol=2e-2, msg=backend)
            torch.testing.assert_close(full[real].float(), full_ref[real], atol=2e-2, rtol=2e-2, msg=backend)
