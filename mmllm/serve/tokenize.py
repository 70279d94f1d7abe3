"""vLLM's tokenizer endpoints, at the server root next to /v1 (behind the same API key).

* ``POST /tokenize {"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
  "add_generation_prompt": true}`` -> ``{"tokens": [...], "count", "max_model_len"}``;
* ``POST /detokenize {"tokens": [...]}`` -> ``{"prompt": str}`` (special tokens kept);
* ``GET /tokenizer_info`` -> the special tokens, chat template and context length.

lm-eval's ``local-completions`` model uses them with ``tokenizer_backend=remote`` (its
``RemoteTokenizer``), so it can score loglikelihood tasks with the served model's own tokenizer
and no local copy of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web

from mmllm.data.chat import ChatFormatError
from mmllm.serve import protocol
from mmllm.serve.protocol import APIError


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/tokenizer_info", tokenizer_info)


def _parts(request: web.Request):
    from mmllm.serve.app import ENGINE, SETTINGS

    return request.app[ENGINE], request.app[SETTINGS]


async def _body(request: web.Request) -> Mapping:
    from mmllm.serve.app import _json_body

    return await _json_body(request)


async def tokenize(request: web.Request) -> web.Response:
    engine, s = _parts(request)
    body = await _body(request)
    tok = engine.tokenizer
    if "messages" in body:
        renderer = s["renderer"]
        if isinstance(renderer, ChatFormatError):
            raise APIError(400, f"this model has no chat template: {renderer}", param="messages")
        messages = protocol.chat_messages(body)

        def render() -> list[int]:  # tokenised as the chat endpoint (and training) tokenise it
            with s["lock"]:  # the renderer's template-id cache is not thread-safe
                if body.get("add_generation_prompt", True):
                    return renderer.prompt(messages)
                return renderer(messages).input_ids
        work = render
    else:
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string (or send messages)", param="prompt")
        if not isinstance(special, bool):
            raise APIError(400, "add_special_tokens must be a boolean", param="add_special_tokens")
        work = lambda: tok(prompt, add_special_tokens=special)["input_ids"]
    try:
        ids = await asyncio.get_running_loop().run_in_executor(None, work)
    except (ChatFormatError, ValueError) as e:
        raise APIError(400, f"cannot render the conversation: {e}", param="messages") from e
    ids = list(ids)
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": engine.max_seq_len})


async def detokenize(request: web.Request) -> web.Response:
    engine, _ = _parts(request)
    body = await _body(request)
    tokens, vocab = body.get("tokens"), len(engine.tokenizer)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and 0 <= t < vocab for t in tokens):
        raise APIError(400, f"tokens must be a list of token ids in [0, {vocab})", param="tokens")
    text = engine.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return web.json_response({"prompt": text})


async def tokenizer_info(request: web.Request) -> web.Response:
    engine, s = _parts(request)
    tok = engine.tokenizer
    return web.json_response({
        "tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
        "pad_token": tok.pad_token, "unk_token": getattr(tok, "unk_token", None),
        "chat_template": s["chat_template"] or getattr(tok, "chat_template", None),
        "model_max_length": engine.max_seq_len, "vocab_size": len(tok)})
