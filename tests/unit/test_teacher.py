"""Teacher client: cache keys and durability, retries with backoff / Retry-After, rate limit,
bounded concurrency, key hygiene, Hydra configs (an httpx mock transport stands in for the API)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from omegaconf import OmegaConf

from mmllm.config import CONF_DIR
from mmllm.teacher import (
    OpenAITeacher,
    RateLimiter,
    ResponseCache,
    TeacherError,
    openai_teacher,
    request_key,
)
from mmllm.teacher.openai_teacher import retry_after

MSG = [{"role": "user", "content": "What is 2+2?"}]


def completion(text: str) -> dict:
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def echo_handler(seen: list):
    """An API that answers with the last user message reversed, recording each request."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return httpx.Response(200, json=completion(body["messages"][-1]["content"][::-1]))
    return handle


def teacher(handler, tmp_path: Path | None = None, **kw) -> OpenAITeacher:
    return OpenAITeacher(model="m", base_url="http://api.test/v1", progress=False,
                         cache_path=tmp_path / "cache.sqlite" if tmp_path else None,
                         http_client=httpx.Client(transport=httpx.MockTransport(handler)), **kw)


def test_request_key_is_canonical():
    k = request_key("m", MSG, {"temperature": 0.0, "max_tokens": 5})
    assert k == request_key("m", [dict(MSG[0])], {"max_tokens": 5, "temperature": 0.0, "seed": None})
    assert k != request_key("m2", MSG, {"temperature": 0.0, "max_tokens": 5})
    assert k != request_key("m", MSG, {"temperature": 0.5, "max_tokens": 5})
    assert k != request_key("m", [{"role": "user", "content": "What is 2+3?"}], {"temperature": 0.0,
                                                                                  "max_tokens": 5})


def test_cache_is_wal_and_survives_a_killed_process(tmp_path):
    path = tmp_path / "c.sqlite"
    script = (f"import os, signal; from mmllm.teacher import ResponseCache\n"
              f"c = ResponseCache({str(path)!r})\n"
              f"for i in range(3): c.put(f'k{{i}}', f'v{{i}}', model='m', request={{'i': i}})\n"
              f"os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert proc.returncode == -9, proc.stderr
    cache = ResponseCache(path)
    assert cache.get_many(["k0", "k1", "k2", "k9"]) == {"k0": "v0", "k1": "v1", "k2": "v2"}
    assert cache._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_rerun_pays_nothing_twice_and_duplicates_are_sent_once(tmp_path):
    seen: list = []
    convs = [[{"role": "user", "content": c}] for c in ("abc", "hello", "abc", "xyz")]
    t = teacher(echo_handler(seen), tmp_path, sampling={"temperature": 0, "max_tokens": 8})
    assert t.chat_many(convs) == ["cba", "olleh", "cba", "zyx"]
    assert len(seen) == 3 and seen[0]["temperature"] == 0 and seen[0]["max_tokens"] == 8
    t2 = teacher(echo_handler(seen), tmp_path, sampling={"temperature": 0, "max_tokens": 8})
    assert t2.chat_many(convs) == ["cba", "olleh", "cba", "zyx"] and len(seen) == 3
    assert t2.stats["cache_hits"] == 4 and t2.stats["requests"] == 0
    t2.chat(convs[0], temperature=0.7)  # other sampling params: another request
    assert len(seen) == 4 and seen[-1]["temperature"] == 0.7


def test_retries_honour_retry_after_then_back_off(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(openai_teacher.time, "sleep", waits.append)
    calls = iter([httpx.Response(429, headers={"Retry-After": "3"}, json={"error": {"message": "slow"}}),
                  httpx.Response(503, json={"error": {"message": "busy"}}), "drop",
                  httpx.Response(200, json=completion("4"))])

    def handle(request):
        r = next(calls)
        if r == "drop":
            raise httpx.ConnectError("connection refused", request=request)
        return r

    t = teacher(handle, backoff_base=2.0, backoff_max=60.0)
    assert t.chat(MSG) == "4"
    assert waits[0] == 3.0  # Retry-After wins over the backoff
    assert 2.0 <= waits[1] <= 4.0 and 4.0 <= waits[2] <= 8.0  # base * 2**n, jittered in [d/2, d]
    assert t.stats["retry_429"] == 1 and t.stats["retry_503"] == 1 and t.stats["retry_connection"] == 1


def test_client_errors_are_not_retried_and_skip_counts(monkeypatch):
    monkeypatch.setattr(openai_teacher.time, "sleep", lambda s: None)
    n = []

    def handle(request):
        n.append(1)
        return httpx.Response(400, json={"error": {"message": "bad request"}})

    with pytest.raises(TeacherError, match="HTTP 400"):
        teacher(handle).chat(MSG)
    assert len(n) == 1
    t = teacher(handle, on_error="skip")
    assert t.chat_many([MSG, [{"role": "user", "content": "b"}]]) == [None, None]
    assert t.stats["failed"] == 2
    gone = teacher(lambda r: httpx.Response(500, json={"error": {"message": "down"}}), max_retries=2)
    with pytest.raises(TeacherError, match="HTTP 500"):
        gone.chat(MSG)


def test_concurrency_reaches_but_never_exceeds_the_bound():
    bound, in_flight, peak, lock = 3, [0], [0], threading.Lock()
    barrier = threading.Barrier(bound, timeout=30)  # passes only when `bound` requests overlap

    def handle(request):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            pass  # the last, partial wave
        with lock:
            in_flight[0] -= 1
        return httpx.Response(200, json=completion("ok"))

    convs = [[{"role": "user", "content": str(i)}] for i in range(bound * 2)]
    t = teacher(handle, max_concurrency=bound)
    assert t.chat_many(convs) == ["ok"] * len(convs)
    assert peak[0] == bound


def test_rate_limiter_spaces_starts():
    now, slept = [0.0], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    rl = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        rl.acquire()
    assert slept == pytest.approx([0.25, 0.25, 0.25, 0.25])
    now[0] += 10  # idle time is not banked into a burst beyond one call
    rl.acquire()
    rl.acquire()
    assert slept[-1] == pytest.approx(0.25) and len(slept) == 5


def test_retry_after_forms():
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert 0 <= retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) <= 1  # past: now
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


def test_api_key_from_env_never_shown(monkeypatch, caplog):
    monkeypatch.setenv("MMLLM_TEACHER_API_KEY", "sk-secret-123")
    monkeypatch.setattr(openai_teacher.time, "sleep", lambda s: None)
    auth = []
    calls = iter([httpx.Response(500, json={"error": {"message": "x"}}), httpx.Response(200, json=completion("y"))])

    def handle(request):
        auth.append(request.headers["authorization"])
        return next(calls)

    with caplog.at_level(logging.DEBUG):
        t = teacher(handle)
        assert t.chat(MSG) == "y"
    assert auth == ["Bearer sk-secret-123"] * 2
    assert "sk-secret-123" not in repr(t) and "sk-secret-123" not in caplog.text
    monkeypatch.delenv("MMLLM_TEACHER_API_KEY")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="no API key"):
        OpenAITeacher(model="gpt-4o-mini")


def test_refusal_and_unknown_params_are_errors():
    refuse = {**completion(""), "choices": [{"index": 0, "finish_reason": "content_filter",
                                             "message": {"role": "assistant", "content": None}}]}
    with pytest.raises(TeacherError, match="refused"):
        teacher(lambda r: httpx.Response(200, json=refuse)).chat(MSG)
    with pytest.raises(ValueError, match="unknown sampling"):
        teacher(echo_handler([])).chat(MSG, temprature=0)


def test_hydra_configs_instantiate(tmp_path):
    from hydra.utils import instantiate

    for name, cls in (("openai", "OpenAITeacher"), ("local", "LocalTeacher")):
        cfg = OmegaConf.load(Path(CONF_DIR) / "teacher" / f"{name}.yaml")
        cfg.cache_path = str(tmp_path / f"{name}.sqlite")
        if name == "openai":
            cfg.base_url = "http://127.0.0.1:1/v1"
        t = instantiate(cfg)
        assert type(t).__name__ == cls and t.sampling["temperature"] == 0.0
        assert t.cache is not None and Path(cfg.cache_path).exists()
        t.close()
