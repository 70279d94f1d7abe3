"""OpenAI request parsing and response shapes (chat completions, completions, errors).

Parsing turns a JSON body into a :class:`GenRequest` or raises :class:`APIError`, whose JSON is
OpenAI's error object, so any OpenAI client reports it as it would a hosted API's error.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, replace

from mmllm.generation import SamplingParams
from mmllm.serve.engine import Done, GenRequest


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: HTTP status (400, 401, 404, 413, 429, 500, ...).
        message: what went wrong, for the user.
        type: OpenAI's error type ("invalid_request_error", "authentication_error", ...).
        param: the request field at fault.
        code: a machine-readable code.
        headers: extra response headers (``Retry-After`` on 429).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_prompt_tokens: longest prompt.
        max_tokens: largest ``max_tokens`` (also the default when a request gives none, capped
            by what fits in the context).
        max_seq_len: prompt + completion positions (the engine's rows).
        max_stop: most stop strings.
        max_n: most choices (``n``) per request.
    """

    max_prompt_tokens: int
    max_tokens: int
    max_seq_len: int
    max_stop: int = 4
    max_n: int = 8


MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's chat limit; its completions allow 5)


def _number(body: Mapping, name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise APIError(400, f"{name} must be a number in [{lo}, {hi}], got {value!r}", param=name)
    return float(value)


def _integer(body: Mapping, name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise APIError(400, f"{name} must be an integer {bound}, got {value!r}", param=name)
    return value


def _stop(body: Mapping, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    if len(stop) > limits.max_stop:
        raise APIError(400, f"at most {limits.max_stop} stop strings, got {len(stop)}", param="stop")
    return tuple(s for s in stop if s)


def parse_generation(body: Mapping, prompt: list[int], limits: Limits, *, chat: bool = True) -> GenRequest:
    """The :class:`GenRequest` of a (chat) completion body whose prompt is already tokenised.

    Args:
        chat: a /v1/chat/completions body (else /v1/completions: ``logprobs`` is a count,
            ``echo`` and ``max_tokens: 0`` with it are allowed).

    Raises:
        APIError: a bad or unsupported parameter, or a prompt / max_tokens over the limits.
    """
    for name in ("tools", "functions", "suffix"):
        if body.get(name) not in (None, False, [], 0):
            raise APIError(400, f"{name} is not supported by this server", param=name)
    logprobs, echo = parse_logprobs(body, chat=chat)
    _integer(body, "n", 1, limits.max_n)  # checked here, expanded by :func:`choices`
    if len(prompt) > limits.max_prompt_tokens:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most "
                       f"{limits.max_prompt_tokens}", param="messages", code="context_length_exceeded")
    room = limits.max_seq_len - len(prompt)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 0 if echo else 1, limits.max_tokens)  # echo: 0 scores only
    if max_tokens is None:
        max_tokens = min(limits.max_tokens, room)
    if max_tokens > room or room < 1:
        raise APIError(400, f"the prompt ({len(prompt)} tokens) plus {name}={max_tokens} exceeds the "
                       f"context of {limits.max_seq_len} tokens", param=name,
                       code="context_length_exceeded")
    temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    top_p = _number(body, "top_p", 0.0, 1.0, None)
    if top_p is not None and top_p <= 0:
        raise APIError(400, "top_p must be in (0, 1]", param="top_p")
    top_k = _integer(body, "top_k", 0)  # an extension (vLLM has it too)
    seed = _integer(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    return GenRequest(prompt=prompt, max_tokens=max_tokens, stop=_stop(body, limits),
                      sampling=SamplingParams(temperature=temperature, top_k=top_k or None,
                                              top_p=None if top_p in (None, 1.0) else top_p),
                      seed=seed, logprobs=logprobs, prompt_logprobs=logprobs if echo else None,
                      eos_logprob=not chat)


def parse_logprobs(body: Mapping, *, chat: bool) -> tuple[int | None, bool]:
    """``(alternatives per token or None, echo)`` of a request, checked as OpenAI checks them.

    Chat: ``logprobs: true`` turns them on, ``top_logprobs`` (0..20, needs ``logprobs``) counts
    the alternatives. Completions: ``logprobs`` is the count (0..20; OpenAI allows 5), ``echo``
    returns the prompt (with its logprobs when ``logprobs`` is set).
    """
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if body.get("echo") not in (None, False):
            raise APIError(400, "echo is only supported by /v1/completions", param="echo")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise APIError(400, f"logprobs must be a boolean, got {logprobs!r}", param="logprobs")
        k = _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        if k is not None and not logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (k or 0) if logprobs else None, False
    if top is not None:
        raise APIError(400, "top_logprobs is a chat completions parameter; /v1/completions takes "
                       "logprobs: <count>", param="top_logprobs")
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise APIError(400, f"echo must be a boolean, got {echo!r}", param="echo")
    return _integer(body, "logprobs", 0, MAX_LOGPROBS), bool(echo)


def chat_messages(body: Mapping) -> list[dict]:
    """OpenAI chat messages as ``{"role", "content"}`` string messages (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text ones
            if any(not isinstance(p, Mapping) or p.get("type") != "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported",
                               param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompts(body: Mapping, tokenizer) -> list[tuple[list[int], str | None]]:
    """The prompts of a /v1/completions body: a string, token ids, or a list of either.

    Returns:
        Per prompt, ``(token ids, the prompt string or None when ids were given)``.
    """
    prompt = body.get("prompt")
    batch = prompt if isinstance(prompt, list) and prompt and all(
        isinstance(p, (str, list)) for p in prompt) else [prompt]
    out = []
    for i, p in enumerate(batch):
        where = f"prompt[{i}]" if batch is not prompt and len(batch) > 1 else "prompt"
        if isinstance(p, str):
            ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"{where}: token ids must be in [0, {vocab})", param="prompt")
            ids = list(p)
        else:
            raise APIError(400, "prompt must be a string, a list of token ids, or a non-empty list "
                           "of strings or of token-id lists", param="prompt")
        if not ids:
            raise APIError(400, f"{where} is empty", param="prompt")
        out.append((ids, p if isinstance(p, str) else None))
    return out


# ------------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choices(req: GenRequest, n: int) -> list[GenRequest]:
    """``n`` requests for the ``n`` choices of one (rows sampled apart; seeded: seed, seed+1, ...)."""
    return [replace(req, seed=None if req.seed is None else req.seed + i, cancelled=threading.Event())
            for i in range(n)]


def usage(dones: list[Done], n: int = 1) -> dict:
    """Token counts of a request: each prompt once, the completions of every choice.

    Args:
        dones: the choices, prompt-major (``n`` per prompt).
    """
    prompt, completion = sum(d.prompt_tokens for d in dones[::n]), sum(d.completion_tokens for d in dones)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def finish_reason(done: Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def response(rid: str, model: str, dones: list[Done], *, chat: bool, n: int = 1,
             texts: list[str] | None = None, logprobs: list[dict | None] | None = None) -> dict:
    """A whole (chat) completion: one choice per entry of ``dones`` (prompt-major, ``n`` each).

    Args:
        texts: per choice, the text to return instead of the completion's (echo).
        logprobs: per choice, its ``logprobs`` object (:mod:`mmllm.serve.logprobs`).
    """
    texts = texts or [d.text for d in dones]
    logprobs = logprobs or [None] * len(dones)
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp,
                  "finish_reason": finish_reason(d)} for i, (d, t, lp) in enumerate(zip(dones, texts, logprobs))]
    else:
        items = [{"index": i, "text": t, "logprobs": lp, "finish_reason": finish_reason(d)}
                 for i, (d, t, lp) in enumerate(zip(dones, texts, logprobs))]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": items, "usage": usage(dones, n)}


def chunk(rid: str, model: str, *, chat: bool, index: int = 0, text: str | None = None,
          role: bool = False, done: Done | None = None, logprobs: dict | None = None) -> dict:
    """One streamed chunk of choice ``index``: a text delta (with the ``logprobs`` of its
    tokens), the opening role delta (chat) or the final one (``done``)."""
    reason = finish_reason(done) if done is not None else None
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, *, chat: bool, dones: list[Done], n: int = 1) -> dict:
    """The last chunk when ``stream_options.include_usage`` is set: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [], "usage": usage(dones, n)}
