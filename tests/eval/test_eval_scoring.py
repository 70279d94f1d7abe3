"""Batched log-likelihood: prefix KV-cache reuse == independent rows == one full forward each."""

from __future__ import annotations

import random

import pytest
import torch

from mmllm.eval.runner import ModelRunner
from mmllm.eval.scoring import score_requests


def brute_force(model, ctx, cont, max_length):
    """log p(cont | ctx) from one unbatched forward of (ctx + cont)[:-1] (lm-eval's truncation)."""
    inp = (ctx + cont)[-(max_length + 1):][:-1]
    with torch.no_grad():
        logp = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
    rows = logp[len(inp) - len(cont):]
    return rows.gather(-1, torch.tensor(cont)[:, None]).sum().item(), bool((rows.argmax(-1) == torch.tensor(cont)).all())


def few_shot_requests(vocab: int, seed: int = 0):
    """Questions sharing a few-shot prefix, 4 choices each of 1-5 tokens, plus an over-long one."""
    rng = random.Random(seed)
    shots = [rng.randrange(vocab) for _ in range(30)]
    reqs = []
    for _ in range(6):
        ctx = shots + [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        reqs += [(ctx, [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]) for _ in range(4)]
    reqs.append(([7] * 60, [1, 2, 3, 4, 5, 6]))  # longer than max_length: left-truncated
    rng.shuffle(reqs)
    return reqs


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_prefix_reuse_matches_plain_and_brute_force(tiny_model, batch_size):
    reqs = few_shot_requests(tiny_model.vocab_size)
    reuse = score_requests(tiny_model, reqs, max_length=48, batch_size=batch_size, progress=False)
    plain = score_requests(tiny_model, reqs, max_length=48, batch_size=batch_size,
                           reuse_prefix=False, progress=False)
    ref = [brute_force(tiny_model, c, x, 48) for c, x in reqs]
    assert [r[0] for r in reuse] == pytest.approx([r[0] for r in ref], abs=1e-4)
    assert [r[0] for r in plain] == pytest.approx([r[0] for r in ref], abs=1e-4)
    assert [r[1] for r in reuse] == [r[1] for r in ref]


def test_prefix_reuse_computes_the_shared_prefix_once(tiny_model, monkeypatch):
    """With reuse, the model sees each few-shot prefix once; without it, once per choice."""
    reqs = few_shot_requests(tiny_model.vocab_size)
    seen = []
    orig = type(tiny_model).forward

    def counting(self, input_ids, **kw):
        seen.append(input_ids.numel())
        return orig(self, input_ids, **kw)

    monkeypatch.setattr(type(tiny_model), "forward", counting)
    score_requests(tiny_model, reqs, max_length=48, batch_size=64, progress=False)
    reuse_tokens = sum(seen)
    seen.clear()
    score_requests(tiny_model, reqs, max_length=48, batch_size=64, reuse_prefix=False, progress=False)
    assert reuse_tokens < sum(seen) / 2


def test_greedy_flag(tiny_model):
    ctx = [5, 9, 11]
    with torch.no_grad():
        greedy = [int(tiny_model(torch.tensor([ctx])).logits[0, -1].argmax())]
    other = [(greedy[0] + 1) % tiny_model.vocab_size]
    (_, g1), (_, g2) = score_requests(tiny_model, [(ctx, greedy), (ctx, other)], max_length=64, progress=False)
    assert g1 and not g2


def test_encode_pair_follows_lm_eval(tiny_model, tiny_tokenizer):
    from lm_eval.api.model import TemplateLM

    runner = ModelRunner(tiny_model, tiny_tokenizer)

    class Ref(TemplateLM):  # lm-eval's own _encode_pair / empty-context rules on our tokenizer
        eot_token_id = tiny_tokenizer.eos_token_id
        tok_encode = staticmethod(lambda s, add_special_tokens=None, **k: runner.encode(s, add_special_tokens))
        _loglikelihood_tokens = staticmethod(lambda reqs, **k: [(r[1], r[2]) for r in reqs])
        loglikelihood_rolling = generate_until = None

    from lm_eval.api.instance import Instance

    pairs = [("Question: hi\nAnswer: ", "yes"), ("Answer:", " no"), ("", "Paris"), ("The sky is", " blue.")]
    ref = Ref().loglikelihood([Instance("loglikelihood", {}, p, 0) for p in pairs], disable_tqdm=True)
    assert [runner.encode_pair(*p) for p in pairs] == [tuple(r) for r in ref]
    assert runner.encode_pair("", "Paris")[0] == [tiny_tokenizer.bos_token_id]
    # The trailing space of the context moved into the continuation.
    assert tiny_tokenizer.decode(runner.encode_pair("Answer: ", "yes")[1]) == " yes"


def test_runner_restores_training_mode_and_rejects_empty(tiny_model, tiny_tokenizer):
    runner = ModelRunner(tiny_model, tiny_tokenizer, progress=False)
    tiny_model.train()
    try:
        (ll, _), (ll0, g0) = runner.loglikelihood_tokens([([1, 2], [3]), ([1, 2], [])])
        assert tiny_model.training and ll < 0 and (ll0, g0) == (0.0, True)
    finally:
        tiny_model.eval()
    with pytest.raises(ValueError, match="non-empty context"):
        score_requests(tiny_model, [([], [1])], max_length=8, progress=False)
