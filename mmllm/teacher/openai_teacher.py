"""A teacher behind any OpenAI-compatible chat-completions API (a hosted API, ``vllm serve``,
``mmllm serve``), with retries, a rate limit and bounded concurrency.

The ``openai`` client's own retries are off: this module retries 408/409/429/5xx responses and
connection errors itself, with exponential backoff and jitter, waiting what a ``Retry-After``
(or ``retry-after-ms``) header asks, so the policy is visible and configurable. A rate limiter
spaces request starts across all threads.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence

import openai

from mmllm.teacher.base import Teacher, TeacherError, renormalise

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx


class RateLimiter:
    """Spaces calls ``1 / rate`` seconds apart across threads (each caller reserves the next slot).

    Args:
        rate: calls per second (None or <= 0: unlimited).
        clock, sleep: injectable for tests.
    """

    def __init__(self, rate: float | None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self.clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self.sleep(start - now)


def retry_after(headers) -> float | None:
    """Seconds a response asks to wait (``retry-after-ms``, ``Retry-After`` seconds or HTTP date)."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, date.timestamp() - time.time())


class OpenAITeacher(Teacher):
    """Chat completions from an OpenAI-compatible server.

    Args:
        model: the model name the server serves.
        base_url: the API root (``http://127.0.0.1:8000/v1``); None: ``$OPENAI_BASE_URL`` or
            OpenAI's API.
        api_key_env: environment variables tried in order for the API key (never logged). A
            custom ``base_url`` without a key sends a placeholder (servers without auth accept it).
        requests_per_second: rate limit on request starts (None: unlimited).
        max_retries: retries of a retryable failure (so max_retries + 1 attempts).
        backoff_base, backoff_max: the n-th retry waits ~``min(backoff_max, backoff_base * 2**n)``
            (jittered to between half and all of it) unless the server sent ``Retry-After``.
        timeout: seconds per request.
        http_client: an ``httpx.Client`` for the openai client (proxies, tests).
        top_logprobs: first-token alternatives asked for by :meth:`option_logprobs` (OpenAI's
            maximum is 20).
        missing_margin: nats below the least likely listed token given to an option missing from
            the ``top_logprobs`` list (its probability is below every listed one; the margin
            keeps it strictly below rather than guessing how far).
        **kwargs: :class:`~mmllm.teacher.base.Teacher` args (cache_path, sampling,
            max_concurrency, progress, on_error).

    The cache key holds ``model``, not ``base_url``: the same model name behind another URL
    shares cached answers (give distinct names to distinct models).
    """

    def __init__(self, *, model: str, base_url: str | None = None,
                 api_key_env: Sequence[str] = ("MMLLM_TEACHER_API_KEY", "OPENAI_API_KEY"),
                 requests_per_second: float | None = None, max_retries: int = 6,
                 backoff_base: float = 1.0, backoff_max: float = 60.0, timeout: float = 600.0,
                 http_client=None, top_logprobs: int = 20, missing_margin: float = 1.0,
                 **kwargs) -> None:
        super().__init__(model=model, **kwargs)
        if not 1 <= top_logprobs <= 20 or missing_margin < 0:
            raise ValueError(f"need 1 <= top_logprobs <= 20 and missing_margin >= 0, got "
                             f"{top_logprobs} and {missing_margin}")
        self.top_logprobs, self.missing_margin = top_logprobs, missing_margin
        key = next((os.environ[n] for n in api_key_env if os.environ.get(n)), None)
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        if key is None and base_url is None:
            raise ValueError(f"no API key for the hosted OpenAI API: set one of {list(api_key_env)} "
                             "(or base_url= for a server without auth)")
        self.base_url = base_url
        self.client = openai.OpenAI(api_key=key or "EMPTY", base_url=base_url, max_retries=0,
                                    timeout=timeout, http_client=http_client)
        self.limiter = RateLimiter(requests_per_second)
        self.max_retries, self.backoff_base, self.backoff_max = max_retries, backoff_base, backoff_max

    def __repr__(self) -> str:  # no key in logs
        return f"OpenAITeacher(model={self.model!r}, base_url={self.base_url!r})"

    def backoff(self, attempt: int) -> float:
        """Jittered wait before retry ``attempt`` (0-based): in [d/2, d], d = base * 2**attempt capped."""
        d = min(self.backoff_max, self.backoff_base * 2 ** attempt)
        return d / 2 + random.uniform(0, d / 2)

    def _complete(self, messages: list[dict], sampling: dict) -> str:
        return self._answer(self._create(messages, sampling))

    def _option_key_params(self) -> dict:
        return {"top_logprobs": self.top_logprobs, "missing_margin": self.missing_margin}

    def _option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]:
        """One token, greedy, with the ``top_logprobs`` most likely first tokens: each option's
        logprob is that of the first tokens equal to it (whitespace stripped, summed when several
        are: "A" and " A"); an option not in the list gets the least logprob listed minus
        ``missing_margin`` (it is less likely than every listed token). Options must be single
        tokens of the served model (letters, "tie", 1-10 are in GPT/Llama tokenizers)."""
        resp = self._create(messages, {"max_tokens": 1, "temperature": 0.0, "logprobs": True,
                                       "top_logprobs": self.top_logprobs})
        choice = resp.choices[0] if resp.choices else None
        content = getattr(getattr(choice, "logprobs", None), "content", None)
        if not content or not content[0].top_logprobs:
            raise TeacherError("the response has no top_logprobs (does the server support logprobs?)")
        top = content[0].top_logprobs
        found: dict[str, list[float]] = {}
        for entry in top:
            if entry.token.strip() in options:
                found.setdefault(entry.token.strip(), []).append(entry.logprob)
        if not found:
            raise TeacherError(f"none of the options {options} is among the {len(top)} most likely "
                               f"first tokens {[e.token for e in top]}")
        floor = min(e.logprob for e in top) - self.missing_margin
        return renormalise({o: math.log(sum(math.exp(v) for v in found[o])) if o in found else floor
                            for o in options})

    def _create(self, messages: list[dict], sampling: dict):
        """One chat completion, retried as the module doc says; raises :class:`TeacherError`."""
        params = dict(sampling)
        extra = {"top_k": params.pop("top_k")} if "top_k" in params else None  # vLLM, mmllm serve
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire()
            try:
                resp = self.client.chat.completions.create(model=self.model, messages=messages,
                                                           extra_body=extra, **params)
            except openai.APIStatusError as e:
                if not (e.status_code in RETRY_STATUS or e.status_code >= 500) or attempt == self.max_retries:
                    raise TeacherError(f"HTTP {e.status_code}: {e.message}") from e
                wait = retry_after(e.response.headers)
                self.stats[f"retry_{e.status_code}"] += 1
            except openai.APIConnectionError as e:  # timeouts included
                if attempt == self.max_retries:
                    raise TeacherError(f"connection failed: {e}") from e
                wait = None
                self.stats["retry_connection"] += 1
            else:
                return resp
            wait = self.backoff(attempt) if wait is None else wait
            log.info("teacher: retry %d/%d in %.1fs", attempt + 1, self.max_retries, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    def _answer(resp) -> str:
        if not resp.choices:
            raise TeacherError("the response has no choices")
        choice = resp.choices[0]
        if choice.finish_reason == "content_filter" or getattr(choice.message, "refusal", None):
            raise TeacherError(f"the teacher refused: {choice.message.refusal or 'content_filter'}")
        if choice.message.content is None:
            raise TeacherError("the response has no text content")
        return choice.message.content
