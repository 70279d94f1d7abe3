"""Perplexity: windows as lm-eval's rolling loglikelihood, sliding stride, bits per byte."""

from __future__ import annotations

import math

import pytest
import torch
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from mmllm.eval.perplexity import perplexity, rolling_windows
from mmllm.eval.runner import ModelRunner


@pytest.mark.parametrize("n,max_length", [(1, 4), (10, 4), (9, 3), (23, 8), (5, 16)])
def test_windows_equal_lm_eval_rolling_windows(n, max_length):
    tokens = list(range(100, 100 + n))
    ref = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, max_length, 1)]
    assert rolling_windows(tokens, prefix_token=0, max_length=max_length) == [tuple(w) for w in ref]


@pytest.mark.parametrize("n,max_length,stride", [(30, 8, 3), (30, 8, 1), (7, 8, 2), (31, 6, 6)])
def test_sliding_windows_predict_every_token_once_within_the_context(n, max_length, stride):
    tokens = list(range(1, n + 1))
    windows = rolling_windows(tokens, prefix_token=0, max_length=max_length, stride=stride)
    assert [t for _, tgt in windows for t in tgt] == tokens
    for i, (ctx, tgt) in enumerate(windows):
        inp = ctx + tgt[:-1]
        assert len(inp) <= max_length
        assert ([0] + tokens)[:inp[-1] + 1][-len(inp):] == inp  # a contiguous window ending before tgt[-1]
        if i:  # later windows use the whole context they can
            assert len(inp) == min(max_length, tgt[-1])


def full_nll(model, ids):
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
    return -logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()


def test_perplexity_against_a_hand_computed_forward(tiny_model, tiny_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tiny_tokenizer.encode(text)
    res = perplexity(tiny_model, tiny_tokenizer, [text], progress=False)
    nll = full_nll(tiny_model, [tiny_tokenizer.bos_token_id] + ids)
    assert res.nll == pytest.approx(nll, rel=1e-5) and res.tokens == len(ids)
    assert res.token_perplexity == pytest.approx(math.exp(nll / len(ids)), rel=1e-5)
    assert res.bytes == len(text.encode()) and res.words == 9
    assert res.bits_per_byte == pytest.approx(nll / (len(text.encode()) * math.log(2)), rel=1e-5)


def test_long_text_uses_windows_and_stride_adds_context(tiny_model, tiny_tokenizer):
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many. " * 3
    ids = [tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode(text)
    # Disjoint windows of 16: hand-computed sum of per-window NLLs.
    hand = 0.0
    for ctx, tgt in rolling_windows(ids[1:], prefix_token=ids[0], max_length=16):
        inp = ctx + tgt[:-1]
        with torch.no_grad():
            logp = tiny_model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
        hand -= logp[-len(tgt):].gather(-1, torch.tensor(tgt)[:, None]).sum().item()
    disjoint = perplexity(tiny_model, tiny_tokenizer, [text], max_length=16, progress=False)
    strided = perplexity(tiny_model, tiny_tokenizer, [text], max_length=16, stride=4, progress=False)
    whole = perplexity(tiny_model, tiny_tokenizer, [text], max_length=1024, progress=False)
    assert disjoint.nll == pytest.approx(hand, rel=1e-5)
    assert whole.nll == pytest.approx(full_nll(tiny_model, ids), rel=1e-5)
    assert strided.tokens == disjoint.tokens == whole.tokens == len(ids) - 1
    assert strided.nll != pytest.approx(disjoint.nll, rel=1e-6)
    # bits per byte does not depend on the tokenizer's granularity: same bytes, same formula.
    assert strided.bits_per_byte == pytest.approx(strided.nll / (len(text.encode()) * math.log(2)))


def test_rolling_loglikelihood_is_per_document(tiny_model, tiny_tokenizer):
    runner = ModelRunner(tiny_model, tiny_tokenizer, progress=False)
    a, b = "Paris is in France.", "Berlin is in Germany."
    both = runner.loglikelihood_rolling([a, b])
    assert both == pytest.approx(runner.loglikelihood_rolling([a]) + runner.loglikelihood_rolling([b]), abs=1e-4)
