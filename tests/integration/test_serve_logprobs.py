"""Token log-probabilities from ``mmllm serve`` (OpenAI chat/completions, echo, batched prompts,
vLLM's tokenizer endpoints) against full-forward references, lm-eval's ``local-completions`` and
the kit's own OpenAITeacher, on a tiny random checkpoint over loopback."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from mmllm.checkpoint import load_model
from mmllm.data.chat import render_prompt
from mmllm.generation import DecodeSession, SamplingParams, generate_ids
from mmllm.serve import Engine, ServerThread, create_app, protocol
from mmllm.serve.app import STATS

KEY = "sk-logprobs"
TEXT = ("Question: What is the capital of France?\nAnswer: Paris. The capital of Spain is Madrid. "
        "Hello there, what is two plus two? Two plus two is four. Response A is better. B. tie. "
        "Bern Rabat Ankara Vienna Rome Berlin Lisbon Oslo Cairo Tokyo. Once upon a time.") * 30
HELLO = [{"role": "user", "content": "Hello there, what is two plus two?"}]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, write_tiny_checkpoint):
    """A random tiny DecoderLM saved as a kit checkpoint (a sharp head: varied logprobs)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_lp"), TEXT, head_scale=20.0)


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    app = create_app(Engine(model, tok, max_batch=4, max_seq_len=256), model_name="tiny", api_key=KEY,
                     max_tokens=64, max_pending=64)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V) log_softmax of one full forward (no KV cache): row i predicts token i + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().log_softmax(-1)


@pytest.mark.parametrize("static", [False, True])
def test_session_logprobs_are_raw_aligned_and_only_for_rows_that_ask(loaded, static):
    model, tok = loaded
    prompts = [tok(t)["input_ids"] for t in ("Once upon a time", "The capital of Spain", "Two plus")]
    s = DecodeSession(model, max_rows=3, max_len=64, static_decode=static,
                      generator=torch.Generator().manual_seed(0))
    hot = SamplingParams(temperature=1.5, top_k=20)  # sampled: the logprobs stay the raw ones
    a, b = s.add_rows(prompts[:2], max_new_tokens=6, top_logprobs=3, prompt_logprobs=2, sampling=hot)
    (c,) = s.add_rows(prompts[2:], max_new_tokens=6)
    while s.running:
        s.step()
    for r in (a, b):
        row = s.rows[r]
        ref, n = full_logprobs(model, row.prompt + row.tokens), len(row.prompt)
        assert row.prompt_logprobs[0] is None and len(row.prompt_logprobs) == n
        for i, e in enumerate(row.prompt_logprobs[1:], 1):
            assert e.token == row.prompt[i] and e.logprob == pytest.approx(ref[i - 1, e.token].item(), abs=1e-4)
            assert [t for t, _ in e.top] == ref[i - 1].topk(2).indices.tolist()
        assert [e.token for e in row.token_logprobs] == row.tokens
        assert [e.logprob for e in row.token_logprobs] == pytest.approx(
            [ref[n - 1 + j, t].item() for j, t in enumerate(row.tokens)], abs=1e-4)
        assert all(len(e.top) == 3 for e in row.token_logprobs)
    assert s.rows[c].token_logprobs == [] and s.rows[c].prompt_logprobs == []  # it did not ask
    s.append(a, [5, 6])  # appended tokens have no logprobs; truncation keeps the lists aligned
    s.append(c, [5])
    s.step()
    assert s.rows[c].token_logprobs == []
    row = s.rows[a]
    assert row.token_logprobs[-3:-1] == [None, None] and len(row.token_logprobs) == len(row.tokens)
    s.truncate(a, len(row.prompt) + 2)
    assert len(row.token_logprobs) == 2 and len(row.logprobs) == 2
    s.remove_rows([a, b, c])
    (z,) = s.add_rows([prompts[0]], max_new_tokens=0, prompt_logprobs=0)  # score only
    assert s.step() == {} and s.rows[z].finish_reason == "length" and s.rows[z].tokens == []
    assert len(s.rows[z].prompt_logprobs) == len(prompts[0]) and s.rows[z].prompt_logprobs[1].top == ()
    with pytest.raises(ValueError, match="token-id prompts"):
        s.add_rows(inputs_embeds=[torch.zeros(2, 32)], prompt_logprobs=1)


def test_chat_logprobs_equal_a_full_forward_and_stream_the_same(client, loaded):
    model, tok = loaded
    kw = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 12, "logprobs": True,
          "top_logprobs": 5}
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    prompt = render_prompt(HELLO, tok)
    assert 0 < len(content) <= r.usage.completion_tokens
    ids = [t for t in generate_ids(model, [prompt], max_new_tokens=12, eos_token_id=tok.eos_token_id)[0]
           if t != tok.eos_token_id]  # the greedy tokens, eos excluded as the server excludes it
    assert len(ids) == len(content)
    ref = full_logprobs(model, prompt + ids)
    for j, (entry, t) in enumerate(zip(content, ids)):
        row = ref[len(prompt) - 1 + j]
        assert entry.token == tok.decode([t])
        assert entry.logprob == pytest.approx(row[t].item(), abs=1e-4)
        tops = [e.logprob for e in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert tops == pytest.approx(row.topk(5).values.tolist(), abs=1e-4)
        assert entry.token in [e.token for e in entry.top_logprobs]  # greedy: the chosen is listed
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").startswith(
        r.choices[0].message.content)
    streamed = [e for ch in client.chat.completions.create(stream=True, **kw)
                for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 6)) for e in streamed] == [(e.token, round(e.logprob, 6)) for e in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_completion_echo_scores_batched_prompts_like_a_full_forward(client, loaded):
    model, tok = loaded
    prompts = [tok("The capital of Spain is")["input_ids"], tok("Two plus two is four")["input_ids"]]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, echo=True, logprobs=2,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(map(len, prompts))
    for c, ids in zip(r.choices, prompts):
        ref = full_logprobs(model, ids)
        assert c.text == tok.decode(ids) and c.logprobs.token_logprobs[0] is None
        assert c.logprobs.top_logprobs[0] is None and len(c.logprobs.tokens) == len(ids)
        assert c.logprobs.token_logprobs[1:] == pytest.approx([ref[i - 1, t].item() for i, t in
                                                               enumerate(ids) if i], abs=1e-4)
        assert all(2 <= len(top) <= 3 for top in c.logprobs.top_logprobs[1:])  # k plus the chosen
        assert "".join(c.logprobs.tokens) == c.text
    # n choices per prompt, prompt-major; a string prompt echoes as sent, then its completion.
    two = client.completions.create(model="tiny", prompt=["Once upon a time", prompts[1]], max_tokens=3,
                                    echo=True, logprobs=1, n=2, temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text.startswith("Once upon a time") and two.choices[0].text == two.choices[1].text
    assert two.choices[2].text.startswith(tok.decode(prompts[1]))
    lp = two.choices[0].logprobs
    assert len(lp.tokens) == len(tok("Once upon a time")["input_ids"]) + 3
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    alone = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert two.choices[0].text == "Once upon a time" + alone.choices[0].text
    # Streamed, each choice's prompt comes first: the chunks concatenate to the whole choices.
    got = {i: {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []} for i in range(4)}
    for ch in client.completions.create(model="tiny", prompt=["Once upon a time", prompts[1]], max_tokens=3,
                                        echo=True, logprobs=1, n=2, temperature=0, stream=True):
        c = ch.choices[0]
        got[c.index]["text"] += c.text
        for key in ("tokens", "token_logprobs", "text_offset"):
            got[c.index][key] += getattr(c.logprobs, key) if c.logprobs else []
    for i, c in enumerate(two.choices):
        assert got[i]["text"] == c.text and got[i]["tokens"] == c.logprobs.tokens
        assert got[i]["token_logprobs"] == c.logprobs.token_logprobs and got[i]["text_offset"] == c.logprobs.text_offset


def test_a_completion_ended_by_eos_still_scores_every_token(loaded):
    """lm-eval reads ``token_logprobs[ctxlen:-1]`` of prompt + one token: that token must be
    listed even when it is the eos (chat leaves the eos out, legacy completions keep it)."""
    import copy

    model, tok = loaded
    ids = tok("The capital of Spain is")["input_ids"]
    ref = full_logprobs(model, ids)
    greedy = int(ref[-1].argmax())
    eos_tok = copy.deepcopy(tok)  # the greedy next token made the eos
    eos_tok.eos_token = tok.convert_ids_to_tokens(greedy)
    assert eos_tok.eos_token_id == greedy
    with ServerThread(create_app(Engine(model, eos_tok, max_batch=2, max_seq_len=64), model_name="e")) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        r = c.completions.create(model="e", prompt=[ids], max_tokens=1, echo=True, logprobs=1,
                                 temperature=0).choices[0]
        assert r.finish_reason == "stop" and len(r.logprobs.token_logprobs) == len(ids) + 1
        assert r.logprobs.token_logprobs[-1] == pytest.approx(ref[-1, greedy].item(), abs=1e-4)
        assert r.logprobs.top_logprobs[-1] == {tok.decode([greedy]): r.logprobs.token_logprobs[-1]}


def test_a_stop_string_cuts_the_logprobs_with_the_text(client, loaded):
    special = set(loaded[1].all_special_tokens)  # named in "tokens", skipped in the text
    joined = lambda tokens: "".join(t for t in tokens if t not in special)
    kw = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 24, "logprobs": 0}
    full = client.completions.create(**kw).choices[0]
    text = full.text
    assert joined(full.logprobs.tokens) == text and full.logprobs.text_offset[0] == 0
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "the random model's text needs a visible middle to stop at"
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    n = len(cut.logprobs.tokens)
    assert cut.text == text[:text.index(stop)] and 0 < n < len(full.logprobs.tokens)
    assert cut.logprobs.tokens == full.logprobs.tokens[:n]  # the tokens behind the cut text only
    assert cut.logprobs.token_logprobs == full.logprobs.token_logprobs[:n]
    assert cut.logprobs.text_offset == full.logprobs.text_offset[:n]
    assert joined(cut.logprobs.tokens).startswith(cut.text)
    assert not joined(cut.logprobs.tokens[:-1]).startswith(cut.text)
    streamed = [t for ch in client.completions.create(stop=[stop], stream=True, **kw)
                if ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == cut.logprobs.tokens


def test_tokenizer_endpoints_behind_the_key(server, loaded):
    _, tok = loaded
    root, auth = server.url[:-len("/v1")], {"Authorization": f"Bearer {KEY}"}
    ids = httpx.post(f"{root}/tokenize", json={"prompt": "Hello there", "add_special_tokens": False},
                     headers=auth).json()["tokens"]
    assert ids == tok("Hello there", add_special_tokens=False)["input_ids"]
    assert httpx.post(f"{root}/detokenize", json={"tokens": ids}, headers=auth).json()["prompt"] == "Hello there"
    info = httpx.get(f"{root}/tokenizer_info", headers=auth).json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == 256 and info["chat_template"]
    chat = httpx.post(f"{root}/tokenize", json={"messages": HELLO}, headers=auth).json()
    assert chat["tokens"] == render_prompt(HELLO, tok)
    assert httpx.get(f"{root}/tokenizer_info").status_code == 401
    bad = httpx.post(f"{root}/detokenize", json={"tokens": [10 ** 6]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("body, match", [
    ({"messages": HELLO, "top_logprobs": 3}, "needs logprobs: true"),
    ({"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs must be"),
    ({"messages": HELLO, "logprobs": 3}, "logprobs must be a boolean"),
    ({"messages": HELLO, "echo": True}, "echo is only supported"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs must be"),
    ({"prompt": "Hi", "logprobs": -1}, "logprobs must be"),
    ({"prompt": "Hi", "top_logprobs": 2}, "top_logprobs is a chat"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens must be"),
    ({"prompt": "Hi", "echo": "yes"}, "echo must be a boolean"),
    ({"prompt": ["Hi", [1, 2], []]}, "prompt must be"),
    ({"prompt": [[1, 10 ** 6]]}, "token ids must be in"),
])
def test_bad_logprob_requests_get_400(server, body, match):
    path = "chat/completions" if "messages" in body else "completions"
    r = httpx.post(f"{server.url}/{path}", json={"model": "tiny", **body},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["type"] == "invalid_request_error"


def test_too_many_prompts_times_n_is_a_400(loaded):
    model, tok = loaded
    app = create_app(Engine(model, tok, max_batch=2, max_seq_len=64), model_name="t", max_pending=3)
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="exceed the 3 requests"):
            c.completions.create(model="t", prompt=["a", "b"], n=2, max_tokens=1)
        assert len(c.completions.create(model="t", prompt=["a", "b", "c"], max_tokens=1).choices) == 3


def test_lm_eval_local_completions_equals_the_in_process_adapter(server, loaded, tiny_ckpt, tmp_path,
                                                                 monkeypatch):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from mmllm.eval.agreement import run_lm_eval, write_lm_eval_task
    from mmllm.eval.lm_eval_adapter import MMLLMEvalLM

    model, tok = loaded
    task_dir = write_lm_eval_task(tmp_path / "task")
    ours = run_lm_eval(MMLLMEvalLM(model=model, tokenizer=tok, batch_size=8), task_dir, limit=10)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # lm-eval's header for /v1/completions
    base, batches, tokenized = f"{server.url}/completions", [], server.app[STATS]["/tokenize"]

    def recorded(body, tokenizer, real=protocol.completion_prompts):
        batches.append(len(body["prompt"]) if isinstance(body["prompt"][0], list) else 1)
        return real(body, tokenizer)

    monkeypatch.setattr(protocol, "completion_prompts", recorded)
    # "auto" finds /tokenizer_info and /tokenize and picks the remote backend (the server's tokenizer).
    for backend, extra in (("auto", {}), ("huggingface", {"tokenizer": str(tiny_ckpt.parent / "tokenizer")})):
        lm = LocalCompletionsAPI(base_url=base, model="tiny", tokenizer_backend=backend, batch_size=4,
                                 num_concurrent=2, max_retries=1, max_length=256, auth_token=KEY, **extra)
        assert lm.tokenizer_backend == ("remote" if backend == "auto" else backend)
        theirs = run_lm_eval(lm, task_dir, limit=10)
        assert theirs["acc"] == ours["acc"] and theirs["acc_norm"] == ours["acc_norm"], backend
        flat = [x for row in theirs["loglikelihoods"] for x in row]
        assert flat == pytest.approx([x for row in ours["loglikelihoods"] for x in row], abs=1e-3), backend
        assert len(flat) == 40 and len({round(x, 3) for x in flat}) > 10  # real, varied scores
        assert max(batches) == 4 and sum(batches) == 40  # batches of token-id prompts
        batches.clear()
    assert server.app[STATS]["/tokenize"] > tokenized  # the remote backend used the server's tokenizer


def test_openai_teacher_option_logprobs_agree_with_the_local_teacher(server, loaded, tiny_ckpt, monkeypatch):
    from mmllm.teacher import LocalTeacher, OpenAITeacher

    model, tok = loaded
    convs = [[{"role": "user", "content": "Which is better, A or B?"}], HELLO]
    options = _single_token_options(model, tok, convs)
    monkeypatch.setenv("MMLLM_TEACHER_API_KEY", KEY)
    remote = OpenAITeacher(model="tiny", base_url=server.url, progress=False, cache_path=None)
    got = remote.option_logprobs(convs, options)
    with LocalTeacher(checkpoint=str(tiny_ckpt), progress=False, device="cpu", max_batch=2) as local:
        want = local.option_logprobs(convs, options)
    for g, w in zip(got, want):
        assert list(g) == options and g == pytest.approx(w, abs=1e-4)
        assert max(g.values()) - min(g.values()) > 0.1  # the options are told apart
    assert sum(math.exp(v) for v in got[0].values()) == pytest.approx(1.0, abs=1e-6)


def _single_token_options(model, tok, convs, k: int = 3) -> list[str]:
    """k strings that are single tokens among the top 20 first tokens of every conversation,
    with no other top-20 token of the same stripped text (OpenAITeacher would add it in)."""
    tops = []
    for conv in convs:
        prompt = render_prompt(conv, tok)
        tops.append(full_logprobs(model, prompt)[-1].topk(20).indices.tolist())
    texts = [{i: tok.decode([i]) for i in top} for top in tops]
    good = []
    for i in tops[0]:
        s = texts[0][i]
        if not s.strip() or s != s.strip() or tok(s, add_special_tokens=False)["input_ids"] != [i]:
            continue
        if all(i in t and [j for j in t if t[j].strip() == s] == [i] for t in texts):
            good.append(s)
    assert len(good) >= k, f"the tiny model's top tokens give {good}"
    return good[:k]
