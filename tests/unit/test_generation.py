"""Generation: cached == uncached, batched == alone, sampling controls, stop strings."""

from __future__ import annotations

import pytest
import torch

from mmllm.generation import generate_ids, sample_next_token
from mmllm.models import DecoderLM


@pytest.fixture
def model(tiny_lm_kwargs):
    torch.manual_seed(3)
    return DecoderLM(**tiny_lm_kwargs).eval()


def test_cached_generation_equals_uncached(model):
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    cached = generate_ids(model, prompts, max_new_tokens=12, use_cache=True)
    uncached = generate_ids(model, prompts, max_new_tokens=12, use_cache=False)
    assert cached == uncached
    # Sampling too (same generator seed gives the same draws when logits agree).
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = generate_ids(model, prompts, max_new_tokens=8, temperature=1.0, generator=g1)
    s2 = generate_ids(model, prompts, max_new_tokens=8, temperature=1.0, generator=g2, use_cache=False)
    assert s1 == s2


def test_batched_left_padding_equals_one_at_a_time(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    batched = generate_ids(model, prompts, max_new_tokens=10)
    alone = [generate_ids(model, [p], max_new_tokens=10)[0] for p in prompts]
    assert batched == alone


def test_eos_and_stop_fn_end_rows(model):
    free = generate_ids(model, [[5, 6]], max_new_tokens=10)[0]
    eos = free[3]
    stopped = generate_ids(model, [[5, 6]], max_new_tokens=10, eos_token_id=eos)[0]
    assert stopped == free[: free.index(eos) + 1]
    short = generate_ids(model, [[5, 6]], max_new_tokens=10, stop_fn=lambda row, ids: len(ids) == 2)[0]
    assert short == free[:2]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample_next_token(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample_next_token(logits, temperature=1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    # Top-p 0.8: probs are ~[.03, .64, .09, .24]; the nucleus is {1, 3} (0.64 < 0.8 <= 0.88).
    draws = {sample_next_token(logits, temperature=1.0, top_p=0.8, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample_next_token(logits, temperature=1.0, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {1}


def test_string_generation_with_stop_strings(model):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{chr(97 + i): i + 2 for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    from mmllm.generation import generate

    free = generate(model, tok, ["abc", "de"], max_new_tokens=8)
    assert all(len(f.replace(" ", "")) <= 8 for f in free)
    stop = free[0].replace(" ", "")[2:4]
    cut = generate(model, tok, ["abc"], max_new_tokens=8, stop=[stop.replace("", " ").strip()])
    assert stop not in cut[0].replace(" ", "")
