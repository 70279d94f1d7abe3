"""``mmllm serve`` driven by the real ``openai`` client on loopback (a tiny random kit checkpoint)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

from mmllm.checkpoint import load_model
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.generation import generate_ids
from mmllm.models.decoder_lm import DecoderLM
from mmllm.serve import Engine, ServerThread, create_app
from mmllm.serve.app import ENGINE, STATS

KEY = "sk-test-key"
TEXT = ("The capital of France is Paris. What is two plus two? Two plus two is four. "
        "Hello there, how can I help you today? Thanks! Once upon a time there was a cat.") * 30
HELLO = [{"role": "user", "content": "Hello there, what is two plus two?"}]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, write_tiny_checkpoint) -> Path:
    """A random tiny DecoderLM saved as a kit training checkpoint, its tokenizer recorded."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), TEXT)


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load_model(tiny_ckpt)


@pytest.fixture(scope="module")
def server(loaded):
    model, tok = loaded
    engine = Engine(model, tok, max_batch=4, max_seq_len=256)
    app = create_app(engine, model_name="tiny", api_key=KEY, max_body_bytes=20_000,
                     max_prompt_tokens=150, max_tokens=64)
    with ServerThread(app) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0)


def reference(loaded, prompt_ids: list[int], max_tokens: int) -> str:
    """Greedy text of the same prompt through generate_ids (one row, no server)."""
    model, tok = loaded
    new = generate_ids(model, [prompt_ids], max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id)[0]
    return tok.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_chat_completion_equals_direct_generation(client, loaded):
    from mmllm.data.chat import render_prompt

    r = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    prompt = render_prompt(HELLO, loaded[1])
    assert r.choices[0].message.content == reference(loaded, prompt, 20)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == 20)


def test_streamed_chunks_concatenate_to_the_non_streamed_text(client):
    kw = {"model": "tiny", "messages": HELLO, "temperature": 0, "max_tokens": 30}
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full and len(full) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0 and not chunks[-1].choices


def test_sse_wire_format_ends_with_done(server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
            "stream": True}
    r = httpx.post(f"{server.url}/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [ln for ln in r.text.split("\n\n") if ln]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_and_stop_strings(client, loaded):
    _model, tok = loaded
    r = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=24)
    ids = tok("Once upon a time")["input_ids"]
    assert r.object == "text_completion" and r.choices[0].text == reference(loaded, ids, 24)
    text = r.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), "the random model's text needs a visible middle to stop at"
    s = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0,
                                  max_tokens=24, stop=[stop])
    assert s.choices[0].text == text[:text.index(stop)] and s.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0,
                                         max_tokens=24, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == s.choices[0].text


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_missing_or_wrong_key_gets_401(server):
    bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.get(f"{server.url}/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_oversize_and_bad_requests_get_4xx_in_openai_format(client, server):
    with pytest.raises(openai.BadRequestError, match="at most 150"):  # prompt tokens
        client.completions.create(model="tiny", prompt="two plus two " * 100, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="n must be"):
        client.chat.completions.create(model="tiny", messages=HELLO, n=9)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=HELLO, temperature=5)
    with pytest.raises(openai.APIStatusError) as e:  # body over max_body_bytes
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * 30_000}])
    assert e.value.status_code == 413 and "exceeds" in e.value.body["message"]
    r = httpx.post(f"{server.url}/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert client.models.list().data  # the server still answers


def test_concurrent_requests_batch_and_equal_serial_ones(client, server):
    prompts = ["Once upon a time", "The capital of France", "Hello there", "Two plus two is",
               "Thanks! Once", "What is"]
    ask = lambda p: client.completions.create(model="tiny", prompt=p, temperature=0,
                                              max_tokens=16 + len(p) % 7).choices[0].text
    serial = [ask(p) for p in prompts]
    engine = server.app[ENGINE]
    engine.max_rows_seen = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        concurrent = list(pool.map(ask, prompts))
    assert concurrent == serial
    assert engine.max_rows_seen > 1  # some of them decoded in one batch


def test_a_full_server_answers_429_with_retry_after(loaded):
    model, tok = loaded
    app = create_app(Engine(model, tok, max_batch=1, max_seq_len=64), model_name="tiny", max_pending=0)
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model="tiny", prompt="Hello", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1" and e.value.code == "server_busy"


def test_a_base_model_without_chat_template_serves_completions_only():
    tok = train_bpe_tokenizer([TEXT], vocab_size=300, special_tokens=[], show_progress=False)
    tok.chat_template = None
    model = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                      hidden_dim=32, max_seq_len=64).eval()
    with ServerThread(create_app(Engine(model, tok, max_batch=1, max_seq_len=64), model_name="b")) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            c.chat.completions.create(model="b", messages=HELLO, max_tokens=2)
        assert c.completions.create(model="b", prompt="Hello", max_tokens=2).usage.completion_tokens


def test_n_choices_are_seeded_rows_and_stream_interleaved(client):
    kw = {"model": "tiny", "messages": HELLO, "temperature": 1.0, "max_tokens": 12}
    one = [client.chat.completions.create(seed=s, **kw) for s in (5, 6)]
    both = client.chat.completions.create(seed=5, n=2, **kw)
    assert [c.message.content for c in both.choices] == [r.choices[0].message.content for r in one]
    assert [c.index for c in both.choices] == [0, 1]
    assert both.usage.completion_tokens == sum(r.usage.completion_tokens for r in one)
    assert both.usage.prompt_tokens == one[0].usage.prompt_tokens
    texts = ["", ""]
    for ch in client.chat.completions.create(seed=5, n=2, stream=True, **kw):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in both.choices]


def test_seeded_sampling_is_reproducible(client):
    kw = {"model": "tiny", "prompt": "Once upon a time", "temperature": 1.0, "max_tokens": 16}
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert client.completions.create(seed=7, **kw).choices[0].text == a


def test_cancelled_request_leaves_the_batch(loaded):
    from mmllm.serve.engine import Delta, Done, GenRequest

    model, tok = loaded
    events, finished = [], threading.Event()
    with Engine(model, tok, max_batch=2, max_seq_len=256) as engine:
        req = GenRequest(prompt=tok("Once upon a time")["input_ids"], max_tokens=200)

        def on_event(event):
            events.append(event)
            if isinstance(event, Delta):
                req.cancelled.set()  # the client went away after its first text
            if isinstance(event, Done):
                finished.set()

        req.on_event = on_event
        engine.submit(req)
        (done,) = engine.generate([GenRequest(prompt=tok("Hello")["input_ids"], max_tokens=8)])
        assert finished.wait(timeout=120)
        assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 200
        assert done.completion_tokens <= 8 and engine.pending == 0 and not engine.session.rows


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_cleanly_on_a_signal(tiny_ckpt, sig):
    env = {**os.environ, "MMLLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "mmllm.serve.cli", f"checkpoint={tiny_ckpt}",
                             "port=0", "max_batch=2", "max_seq_len=128"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        for line in proc.stdout:
            if "mmllm serve:" in line:
                break
        url = line.strip().split(" on ")[-1]
        assert url.startswith("http://127.0.0.1:"), line
        c = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert c.chat.completions.create(model="x", messages=HELLO, max_tokens=4).usage.completion_tokens
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0 and "stopped" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()


CONVS = [[{"role": "user", "content": c}] for c in ("Hello there", "What is two plus two?",
                                                     "The capital of France?")]


def test_teacher_against_the_kit_server_pays_nothing_twice(server, tmp_path, monkeypatch, tiny_ckpt):
    from mmllm.teacher import LocalTeacher, OpenAITeacher

    monkeypatch.setenv("MMLLM_TEACHER_API_KEY", KEY)
    kw = {"model": "tiny", "base_url": server.url, "cache_path": tmp_path / "t.sqlite", "progress": False,
              "sampling": {"temperature": 0, "max_tokens": 12}, "max_concurrency": 3}
    before = server.app[STATS]["/v1/chat/completions"]
    first = OpenAITeacher(**kw).chat_many(CONVS)
    assert server.app[STATS]["/v1/chat/completions"] == before + 3
    again = OpenAITeacher(**kw)
    assert again.chat_many(CONVS) == first and again.stats["cache_hits"] == 3
    assert server.app[STATS]["/v1/chat/completions"] == before + 3  # the server saw no second request
    # The in-process backend runs the same engine and rendering: the same answers.
    with LocalTeacher(checkpoint=str(tiny_ckpt), progress=False, max_batch=2, max_seq_len=256,
                      sampling={"temperature": 0, "max_tokens": 12},
                      cache_path=tmp_path / "local.sqlite") as local:
        assert local.chat_many(CONVS) == first
    with LocalTeacher(checkpoint=str(tiny_ckpt), progress=False, cache_path=tmp_path / "local.sqlite",
                      sampling={"temperature": 0, "max_tokens": 12}) as rerun:
        assert rerun.chat_many(CONVS) == first and rerun._engine is None  # no model loaded


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france():
    from mmllm.checkpoint import load_model as load

    model, tok = load("smollm2")
    app = create_app(Engine(model, tok, max_batch=2, max_seq_len=512), model_name="smollm2")
    with ServerThread(app) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        ask = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smollm2", messages=ask, temperature=0, max_tokens=32)
        assert "Paris" in r.choices[0].message.content
        streamed = c.chat.completions.create(model="smollm2", messages=ask, temperature=0,
                                             max_tokens=32, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == r.choices[0].message.content
