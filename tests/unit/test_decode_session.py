"""DecodeSession: every row decodes as if alone, whatever joins, leaves, is appended or cut.

References are plain full forwards of the whole sequence (no cache); logits agree to 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch

from mmllm.generation import DecodeSession, SamplingParams, StopStrings, generate_ids
from mmllm.models import DecoderLM
from mmllm.nn.attention import KVCache


@pytest.fixture
def model(tiny_lm_kwargs):
    torch.manual_seed(3)
    return DecoderLM(**tiny_lm_kwargs).eval()


@torch.no_grad()
def full_logits(model, ids) -> torch.Tensor:
    """Next-token logits after ``ids`` from one forward of the whole sequence."""
    return model(torch.tensor([list(ids)])).logits[0, -1]


def greedy_reference(model, ids, n: int) -> list[int]:
    ids, out = list(ids), []
    for _ in range(n):
        out.append(int(full_logits(model, ids).argmax()))
        ids.append(out[-1])
    return out


def run(session: DecodeSession) -> None:
    while session.step():
        pass


@pytest.mark.parametrize("position", ["rope", "alibi", "learned"])
def test_session_greedy_equals_full_recompute(tiny_lm_kwargs, position):
    torch.manual_seed(1)
    model = DecoderLM(**tiny_lm_kwargs, position=position).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    session = DecodeSession(model, max_rows=4, max_len=24)
    rows = session.add_rows(prompts, max_new_tokens=9)
    run(session)
    for r, p in zip(rows, prompts):
        assert session.rows[r].tokens == greedy_reference(model, p, 9)
        assert session.rows[r].finish_reason == "length"
    # Rows sat at different lengths in one cache; each row's length is its own.
    assert [session.cache.lengths[session.rows[r].slot] for r in rows] == [len(p) + 8 for p in prompts]


def test_append_equals_decoding_the_concatenation(model):
    session = DecodeSession(model, max_rows=3, max_len=40)
    a, b = session.add_rows([[5, 6, 7], [20, 21, 22, 23, 24]], max_new_tokens=30)
    for _ in range(4):
        session.step()
    tool = [40, 41, 42, 43, 44, 45]
    session.append(a, tool)  # fed together with row b's next decode step
    session.step()
    seq = [5, 6, 7] + session.rows[a].tokens
    assert session.rows[a].sampled == [True] * 4 + [False] * 6 + [True]
    torch.testing.assert_close(session.prefill([a])[a], full_logits(model, seq), atol=1e-5, rtol=0)
    for _ in range(3):
        session.step()
    assert session.rows[a].tokens[11:] == greedy_reference(model, seq, 3)
    assert session.rows[b].tokens == greedy_reference(model, [20, 21, 22, 23, 24], 8)


def test_append_after_a_finished_row_feeds_its_last_token(model):
    free = generate_ids(model, [[5, 6]], max_new_tokens=6)[0]
    session = DecodeSession(model, max_rows=1, max_len=32, eos_token_id=free[2])
    (r,) = session.add_rows([[5, 6]], max_new_tokens=20)
    run(session)
    assert session.rows[r].tokens == free[:3] and session.rows[r].finish_reason == "eos"
    session.append(r, [30, 31])  # the eos (sampled, never fed) goes in before the tool tokens
    logits = session.prefill([r])[r]
    torch.testing.assert_close(logits, full_logits(model, [5, 6] + free[:3] + [30, 31]), atol=1e-5, rtol=0)


def test_truncate_then_redecode_equals_the_shorter_text(model):
    session = DecodeSession(model, max_rows=2, max_len=32)
    (r,) = session.add_rows([[9, 8, 7, 6]], max_new_tokens=8)
    run(session)
    kept = [9, 8, 7, 6] + session.rows[r].tokens[:2]
    session.truncate(r, len(kept))
    assert session.rows[r].n_sampled == 2 and not session.rows[r].finished
    run(session)
    assert session.rows[r].tokens[2:] == greedy_reference(model, kept, 6)
    session.truncate(r, 2)  # into the prompt
    session.append(r, [50, 51])
    torch.testing.assert_close(session.prefill([r])[r], full_logits(model, [9, 8, 50, 51]), atol=1e-5, rtol=0)


def test_rows_joining_mid_decode_decode_as_if_alone(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15], [16, 17], [18, 19, 20, 21]]
    budgets = [3, 8, 5, 6, 4]
    session = DecodeSession(model, max_rows=2, max_len=24)
    waiting, done = list(zip(prompts, budgets)), {}
    ids: dict[int, int] = {}
    while waiting or session.rows:
        while waiting and len(session.rows) < session.max_rows:  # a freed slot takes the next prompt
            p, n = waiting.pop(0)
            ids[session.add_rows([p], max_new_tokens=n)[0]] = len(ids)
        session.step()
        for row_id, row in zip(session.finished, session.remove_rows(session.finished)):
            done[ids[row_id]] = row.tokens
    for i, (p, n) in enumerate(zip(prompts, budgets)):
        assert done[i] == greedy_reference(model, p, n)


def test_embedding_prefill_equals_id_prefill(model):
    prompts = [[5, 6, 7, 8], [9, 10]]
    by_ids = DecodeSession(model, max_rows=2, max_len=16)
    rows = by_ids.add_rows(prompts, max_new_tokens=5)
    logits = by_ids.prefill(rows)
    with torch.no_grad():
        embeds = [model.embed_tokens(torch.tensor(p)) for p in prompts]
    by_embeds = DecodeSession(model, max_rows=2, max_len=16)
    erows = by_embeds.add_rows(inputs_embeds=embeds, max_new_tokens=5)
    elogits = by_embeds.prefill(erows)
    for r, e in zip(rows, erows):
        torch.testing.assert_close(elogits[e], logits[r], atol=1e-5, rtol=0)
    run(by_ids), run(by_embeds)
    assert [by_embeds.rows[e].tokens for e in erows] == [by_ids.rows[r].tokens for r in rows]
    by_embeds.truncate(erows[0], 3)  # inside the embedded prompt: the kept embeddings are re-fed
    torch.testing.assert_close(by_embeds.prefill([erows[0]])[erows[0]], full_logits(model, [5, 6, 7]),
                               atol=1e-5, rtol=0)


def test_rows_sample_with_their_own_params_and_record_logprobs(model):
    session = DecodeSession(model, max_rows=2, max_len=16, generator=torch.Generator().manual_seed(0),
                            logprobs=True)
    (greedy,) = session.add_rows([[5, 6]], max_new_tokens=6)
    (hot,) = session.add_rows([[5, 6]], max_new_tokens=6, sampling=SamplingParams(temperature=50.0))
    run(session)
    assert session.rows[greedy].tokens == greedy_reference(model, [5, 6], 6)
    assert session.rows[hot].tokens != session.rows[greedy].tokens  # near-uniform over 96 ids
    # The behaviour policy's log-probabilities (what PPO's ratio needs), from full forwards.
    for r, temperature in ((greedy, 1.0), (hot, 50.0)):
        seq = [5, 6] + session.rows[r].tokens
        want = [float((full_logits(model, seq[:i]) / temperature).log_softmax(-1)[seq[i]])
                for i in range(2, len(seq))]
        torch.testing.assert_close(torch.tensor(session.rows[r].logprobs), torch.tensor(want),
                                   atol=1e-5, rtol=0)
    first = session.rows[greedy].logprobs[:3]
    session.append(greedy, [7])
    assert session.rows[greedy].logprobs[-1] is None
    session.truncate(greedy, 5)  # the prompt and 3 sampled tokens stay
    assert session.rows[greedy].logprobs == first


def test_bad_input_is_refused(model):
    session = DecodeSession(model, max_rows=1, max_len=8)
    with pytest.raises(ValueError, match="positions"):
        session.add_rows([list(range(8))])
    with pytest.raises(ValueError, match="tokenizer"):
        session.add_rows([[1]], stop=["x"])
    with pytest.raises(ValueError, match="inputs_embeds"):
        session.add_rows(inputs_embeds=[torch.zeros(3, 7)])
    session.add_rows([[1, 2]])
    with pytest.raises(ValueError, match="free slots"):
        session.add_rows([[3]])


def _letters_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(97 + i): i + 2 for i in range(26)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")


class CountingSlowTokenizer:
    """A tokenizer without a Rust backend (the windowed path) that records each decode's length."""

    def __init__(self, fast) -> None:
        self.fast, self.lengths = fast, []

    def decode(self, ids, skip_special_tokens=False):
        self.lengths.append(len(ids))
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("slow", [False, True])
def test_stop_string_spanning_tokens_is_found_incrementally(tiny_lm_kwargs, slow):
    torch.manual_seed(3)
    model = DecoderLM(**{**tiny_lm_kwargs, "vocab_size": 28}).eval()  # the tokenizer's 28 ids
    fast = _letters_tokenizer()
    tok = CountingSlowTokenizer(fast) if slow else fast
    free = generate_ids(model, [[2, 3, 4]], max_new_tokens=12, eos_token_id=1)[0]
    i = next(i for i in range(2, 10) if min(free[i:i + 2]) >= 2)  # two letters, no eos
    stop = fast.decode(free[i:i + 2])  # "x y": the decoder joins tokens with spaces
    assert " " in stop
    session = DecodeSession(model, max_rows=1, max_len=32, tokenizer=tok)
    (r,) = session.add_rows([[2, 3, 4]], max_new_tokens=12, stop=[stop], stop_ids=[1])
    run(session)
    row = session.rows[r]
    first = fast.decode(free).find(stop)
    n_tokens = next(n for n in range(1, 13) if stop in fast.decode(free[:n]))
    assert row.finish_reason == "stop" and row.tokens == free[:n_tokens]
    assert row.text == fast.decode(free)[:first]
    if slow:  # a window of at most 2 tokens per decode, never the whole continuation
        assert max(tok.lengths) <= 2 and len(tok.lengths) == 2 * n_tokens


@pytest.mark.slow
def test_stop_strings_stream_unicode_and_report_the_first_match():
    from transformers import AutoTokenizer

    from mmllm.models.hf import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not available")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "Café naïve — 東京 is far. STOP here; END"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    stops = StopStrings(tok, ["END", "P he"])
    hit = next(i for i, t in enumerate(ids) if stops.push(t))
    assert stops.text.startswith("Café naïve — 東京") and stops.text[:stops.cut] == "Café naïve — 東京 is far. STO"
    assert "P he" in tok.decode(ids[:hit + 1]) and "P he" not in tok.decode(ids[:hit])


def test_kv_cache_sized_from_the_local_attention_shard(tiny_lm_kwargs):
    """A tensor-parallel rank holds n_heads/tp query and n_kv_heads/tp kv heads: simulate rank 0 of 2."""
    from torch import nn

    model = DecoderLM(**tiny_lm_kwargs).eval()
    hd = model.head_dim
    for layer in model.layers:
        attn = layer.attn
        for name in ("q_proj", "k_proj", "v_proj"):
            full = getattr(attn, name)
            shard = nn.Linear(full.in_features, full.out_features // 2, bias=False)
            shard.weight.data = full.weight.data[: full.out_features // 2].clone()
            setattr(attn, name, shard)
        o = nn.Linear(attn.o_proj.in_features // 2, attn.o_proj.out_features, bias=False)
        o.weight.data = attn.o_proj.weight.data[:, : attn.o_proj.in_features // 2].clone()
        attn.o_proj = o
    session = DecodeSession(model, max_rows=2, max_len=16)
    session.add_rows([[5, 6, 7], [8]], max_new_tokens=3)
    run(session)
    assert session.cache.k.shape == (2, 2, model.n_kv_heads // 2, 17, hd)
    # A cache sized for all heads is refused with a clear message, not silently misread.
    wrong = KVCache(n_layers=2, batch_size=1, max_len=8, n_kv_heads=model.n_kv_heads, head_dim=hd,
                    device="cpu", dtype=torch.float32)
    with pytest.raises(ValueError, match="local shard"):
        model(torch.tensor([[1, 2]]), kv_cache=wrong)


def test_static_decode_steps_equal_the_dynamic_ones(model):
    """Fixed-shape decode steps (all slots, all max_len keys: the CUDA-graph layout) change nothing."""
    prompts, budgets = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]], [9, 4, 7]
    session = DecodeSession(model, max_rows=4, max_len=24, static_decode=True)
    rows = [session.add_rows([p], max_new_tokens=n)[0] for p, n in zip(prompts[:2], budgets[:2])]
    session.step()
    session.step()
    rows.append(session.add_rows([prompts[2]], max_new_tokens=budgets[2])[0])  # joins mid-decode
    session.append(rows[0], [30, 31])
    run(session)
    assert session.rows[rows[0]].tokens[2:4] == [30, 31]
    assert session.rows[rows[0]].tokens[4:] == greedy_reference(model, prompts[0] + session.rows[rows[0]].tokens[:4], 7)
    for r, p, n in zip(rows[1:], prompts[1:], budgets[1:]):
        assert session.rows[r].tokens == greedy_reference(model, p, n)


@pytest.mark.gpu
def test_compiled_decode_steps_on_cuda_equal_eager(tiny_lm_kwargs):
    """CUDA graphs (torch.compile reduce-overhead) of the static decode step change no token."""
    torch.manual_seed(3)
    model = DecoderLM(**tiny_lm_kwargs).cuda().eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]

    def decode(**kwargs):
        session = DecodeSession(model, max_rows=4, max_len=32, **kwargs)
        rows = session.add_rows(prompts, max_new_tokens=12)
        for _ in range(3):
            session.step()
        rows += session.add_rows([[16, 17]], max_new_tokens=6)
        run(session)
        return [session.rows[r].tokens for r in rows]

    assert decode(compile_decode=True) == decode()
