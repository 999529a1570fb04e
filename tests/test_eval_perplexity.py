"""Sliding-window perplexity: the value by hand, document edges, the same tokens at every
length, batching, the token cap, attention and mode restored."""

from __future__ import annotations

import math

import pytest
import torch

from longtune.eval import EvalError
from longtune.eval.perplexity import full_attention_eval, perplexity, plan_spans, spans_in, window
from conftest import tiny_lm


@pytest.fixture(scope="module")
def tiny_llama():
    torch.set_num_threads(1)
    return tiny_lm("llama", vocab_size=61, hidden_size=32, intermediate_size=64,
                   max_position_embeddings=64).eval()


def random_doc(n: int, seed: int) -> list[int]:
    return torch.randint(0, 61, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def nll_by_hand(model, doc: list[int], end: int, length: int, stride: int) -> list[float]:
    """One forward per target over exactly the tokens before it in the window, then an
    explicit softmax in float64: -log p(target | its context)."""
    values = []
    for t in range(end - stride + 1, end + 1):
        context = torch.tensor([doc[end - length : t]])
        with torch.no_grad():
            logits = model(context).logits[0, -1].double()
        exps = [math.exp(x) for x in (logits - logits.max()).tolist()]
        values.append(-math.log(exps[doc[t]] / sum(exps)))
    return values


def test_matches_a_hand_computed_value_on_two_windows(tiny_llama):
    lengths, stride = [8, 16], 8
    doc = random_doc(16 + 8 + 1, seed=1)  # L_max + S + 1 tokens: exactly two spans
    report = perplexity(tiny_llama, [doc], lengths, stride=stride, max_eval_tokens=10_000,
                        batch_size=4, progress=False)
    for length in lengths:
        by_hand = [v for end in (16, 24) for v in nll_by_hand(tiny_llama, doc, end, length, stride)]
        score = report.scores[length]
        assert score.tokens == 16 and score.windows == 2
        assert score.nll == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
        assert score.ppl == pytest.approx(math.exp(score.nll))


def test_document_edges():
    L, S = 16, 8
    assert [spans_in(n, L, S) for n in (0, L, L + 1, L + S, L + S + 1, L + 2 * S + 1)] == [0, 0, 1, 1, 2, 3]
    spans, too_short = plan_spans([5, L, L + S + 1, L + 1], L, S)
    assert too_short == 2  # shorter than L + 1: nothing to score
    assert spans == [(2, 16), (2, 24), (3, 16)]
    assert plan_spans([L + 3 * S + 1] * 3, L, S, max_spans=5)[0] == [(0, 16), (0, 24), (0, 32), (0, 40), (1, 16)]


def test_short_documents_are_skipped_and_counted(tiny_llama):
    docs = [random_doc(10, 2), random_doc(16, 3), random_doc(25, 4)]
    report = perplexity(tiny_llama, docs, [8, 16], stride=8, max_eval_tokens=10_000, progress=False)
    assert (report.documents, report.documents_used, report.documents_too_short) == (3, 1, 2)
    assert report.scores[8].tokens == report.scores[16].tokens == 16
    assert "2 documents shorter than 17 tokens skipped" in report.summary()
    with pytest.raises(EvalError, match="needed to score length 16"):
        perplexity(tiny_llama, docs[:2], [8, 16], stride=8, max_eval_tokens=100, progress=False)


def test_every_length_scores_the_same_tokens():
    doc = torch.arange(100)
    lengths, S = [8, 16, 32], 8
    spans, _ = plan_spans([len(doc)], max(lengths), S)
    targets = []
    for _, end in spans:
        per_length = [window(doc, end, L, S) for L in lengths]
        for (ids, tgt), L in zip(per_length, lengths):
            assert len(ids) == L and ids[-1] == end - 1  # the window ends just before the last target
            assert torch.equal(tgt, per_length[0][1])  # same targets at every length
            assert torch.equal(tgt[:-1], ids[-S + 1 :])  # the next-token targets of its last S positions
        targets.append(per_length[0][1])
    # the spans tile the document after the first L_max - S + 1 tokens, no gap, no overlap
    assert torch.equal(torch.cat(targets), torch.arange(32 - S + 1, 32 - S + 1 + len(spans) * S))


def test_batching_and_the_token_cap(tiny_llama):
    docs = [random_doc(60, 5), random_doc(41, 6)]
    one = perplexity(tiny_llama, docs, [8, 16], stride=8, max_eval_tokens=10_000, batch_size=1, progress=False)
    three = perplexity(tiny_llama, docs, [8, 16], stride=8, max_eval_tokens=10_000, batch_size=3, progress=False)
    for L in (8, 16):
        assert one.scores[L].nll == pytest.approx(three.scores[L].nll, abs=1e-5)
    assert one.spans == one.spans_available == 6 + 4  # (60-1-16)//8+1, (41-1-16)//8+1
    capped = perplexity(tiny_llama, docs, [8, 16], stride=8, max_eval_tokens=20, progress=False)
    assert capped.spans == 2 and capped.scores[8].tokens == capped.scores[16].tokens == 16
    assert "capped from 10 spans" in capped.summary()


def test_refuses_a_stride_longer_than_a_length(tiny_llama):
    with pytest.raises(EvalError, match="eval.stride=16 is longer than the shortest"):
        perplexity(tiny_llama, [random_doc(50, 0)], [8, 32], stride=16, max_eval_tokens=100, progress=False)


def test_full_attention_during_eval_then_s2_and_training_again(tiny_llama):
    from longtune.attention import ATTN_IMPLEMENTATION, use_full_attention, use_s2_attention

    use_s2_attention(tiny_llama).train()
    try:
        with full_attention_eval(tiny_llama):
            assert tiny_llama.config._attn_implementation != ATTN_IMPLEMENTATION
            assert not tiny_llama.training
        assert tiny_llama.config._attn_implementation == ATTN_IMPLEMENTATION and tiny_llama.training
    finally:
        use_full_attention(tiny_llama).eval()
