"""The OpenAI-compatible HTTP server (aiohttp): /v1/chat/completions, /v1/completions, /v1/models,
and vLLM's /tokenize, /detokenize, /tokenizer_info (:mod:`mmllm.serve.tokenize`).

Handlers parse and check a request (:mod:`mmllm.serve.protocol`), hand it to the
:class:`~mmllm.serve.engine.Engine` and await its events, forwarded from the engine thread into
the event loop. Every error is OpenAI's error JSON with a 4xx/5xx status, never a dropped
connection: a middleware turns aiohttp's own errors (413 body too large, 404, 405) and anything
unexpected (500) into that shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections import Counter

from aiohttp import web

from mmllm.data.chat import ChatFormatError, ChatRenderer
from mmllm.serve import images as vision
from mmllm.serve import logprobs as lp
from mmllm.serve import protocol
from mmllm.serve import tokenize as tokenize_routes
from mmllm.serve import tools as serve_tools
from mmllm.serve.engine import Delta, Done, Engine, Event, Failed, GenRequest
from mmllm.serve.protocol import APIError, Limits

log = logging.getLogger(__name__)
STOPPING = "the server is shutting down; the request was not completed"

ENGINE, SETTINGS, STATS = web.AppKey("engine", Engine), web.AppKey("settings", dict), \
    web.AppKey("stats", Counter)


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, max_prompt_tokens: int | None = None,
               max_tokens: int = 1024, max_n: int = 8, max_pending: int = 256,
               chat_template: str | None = None,
               image_limits: vision.ImageLimits | None = None) -> web.Application:
    """The aiohttp application serving ``engine`` (started and stopped with the app).

    Args:
        engine: the generation engine (the app starts it on startup, stops it on cleanup).
        model_name: the id listed by /v1/models and echoed in responses (any requested model
            name is accepted: the server has one model).
        api_key: required as ``Authorization: Bearer <key>`` (None: no authentication).
        max_body_bytes: larger request bodies get 413.
        max_prompt_tokens: longest prompt (default: the engine's max_seq_len - 1).
        max_tokens: largest ``max_tokens`` a request may ask (and the default).
        max_n: most choices (``n``) per request; each is a row of the batch.
        max_pending: requests queued or running at once; more get 429 (clients retry).
        chat_template: overrides the tokenizer's chat template.
        image_limits: what image content parts a chat request may carry (VLMs only).
    """
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors, _auth])
    limits = Limits(max_prompt_tokens=max_prompt_tokens or engine.max_seq_len - 1,
                    max_tokens=max_tokens, max_seq_len=engine.max_seq_len, max_n=max_n)
    app[ENGINE] = engine
    app[SETTINGS] = {"model": model_name, "api_key": api_key, "limits": limits,
                     "max_pending": max_pending, "max_body_bytes": max_body_bytes,
                     "created": int(time.time()),
                     "renderer": _renderer(engine.tokenizer, chat_template),
                     "lock": threading.Lock(), "image_limits": image_limits or vision.ImageLimits(),
                     "names": lp.TokenText(engine.tokenizer), "chat_template": chat_template}
    app[STATS] = Counter()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    tokenize_routes.add_routes(app)

    async def start_engine(app: web.Application) -> None:
        app[ENGINE].start()

    async def stop_engine(app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, app[ENGINE].stop)

    app.on_startup.append(start_engine)
    app.on_cleanup.append(stop_engine)
    return app


def _renderer(tokenizer, chat_template: str | None) -> ChatRenderer | ChatFormatError:
    """The chat renderer, or why there is none (a base model still serves /v1/completions)."""
    try:
        return ChatRenderer(tokenizer, chat_template=chat_template)
    except ChatFormatError as e:
        log.warning("no chat template: /v1/chat/completions answers 400 (%s)", e)
        return e


# ------------------------------------------------------------------------------ middlewares
def _error_response(err: APIError) -> web.Response:
    return web.json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except APIError as e:
        return _error_response(e)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[SETTINGS]["max_body_bytes"]
        return _error_response(APIError(413, f"the request body exceeds {limit} bytes",
                                        code="request_too_large"))
    except web.HTTPException as e:  # 404, 405 from the router
        if e.status < 400:
            raise
        return _error_response(APIError(e.status, e.reason or "error", code=str(e.status)))
    except Exception as e:  # never a dropped connection
        log.exception("request failed")
        return _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                        type="server_error"))


@web.middleware
async def _auth(request: web.Request, handler):
    key = request.app[SETTINGS]["api_key"]
    if key and request.path != "/health":
        given = request.headers.get("Authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           type="authentication_error", code="invalid_api_key")
    request.app[STATS][request.path] += 1
    return await handler(request)


# ------------------------------------------------------------------------------- handlers
async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "pending": request.app[ENGINE].pending})


async def models(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({"object": "list", "data": [
        {"id": s["model"], "object": "model", "created": s["created"], "owned_by": "mmllm"}]})


async def _json_body(request: web.Request) -> dict:
    try:
        body = await request.json()
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    s, engine, loop = request.app[SETTINGS], request.app[ENGINE], asyncio.get_running_loop()
    images = []
    if vision.has_image_parts(body):
        if not engine.takes_images:
            raise APIError(400, vision.NO_IMAGES, param="messages", code="images_not_supported")
        body, images = await loop.run_in_executor(None, vision.extract_images, body, s["image_limits"])
    tools = serve_tools.parse_tools(body)  # OpenAI function calling (mmllm.serve.tools)
    messages = protocol.chat_messages(serve_tools.tool_messages(body, tools))
    if isinstance(s["renderer"], ChatFormatError):
        raise APIError(400, f"this model has no chat template: {s['renderer']} (use /v1/completions)")
    def render() -> list[int]:
        with s["lock"]:  # the renderer's template-id cache is not thread-safe
            if images:
                span = vision.image_span_ids(engine.tokenizer, engine.model.num_image_tokens)
                return vision.encode_prompt(s["renderer"], messages, len(images), span)
            return s["renderer"].prompt(messages)

    try:  # off the event loop: a long conversation takes a while to tokenise
        prompt = await loop.run_in_executor(None, render)
    except ChatFormatError as e:
        raise APIError(400, f"cannot render the conversation: {e}", param="messages") from e
    pixels = await loop.run_in_executor(None, vision.preprocess, engine.model, images) if images else None
    return await _generate(request, serve_tools.without_tools(body), [prompt], chat=True, images=pixels,
                           tools=tools)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await _json_body(request)
    tokenizer = request.app[ENGINE].tokenizer
    prompts = await asyncio.get_running_loop().run_in_executor(
        None, protocol.completion_prompts, body, tokenizer)  # long prompts take a while to tokenise
    return await _generate(request, body, [ids for ids, _ in prompts], chat=False,
                           prompt_texts=[text for _, text in prompts])


async def _generate(request: web.Request, body: dict, prompts: list[list[int]], *, chat: bool,
                    images=None, tools: serve_tools.ToolSpec | None = None,
                    prompt_texts: list[str | None] | None = None):
    """Runs one request (``n`` choices per prompt, prompt-major as OpenAI orders them) through
    the engine: one JSON response, or server-sent events."""
    engine, s = request.app[ENGINE], request.app[SETTINGS]
    n = body.get("n") or 1
    reqs = [r for p in prompts for r in protocol.choices(
        protocol.parse_generation(body, p, s["limits"], chat=chat), n)]
    for req in reqs:
        req.images = images
    if len(reqs) > max(s["max_pending"], 1):  # could never be admitted: retrying would not help
        raise APIError(400, f"{len(prompts)} prompts x n={n} choices exceed the {s['max_pending']} "
                       "requests this server takes at once", param="prompt")
    if engine.pending + len(reqs) > s["max_pending"]:
        raise APIError(429, f"the server is busy ({engine.pending} requests in flight); retry later",
                       type="rate_limit_error", code="server_busy", headers={"Retry-After": "1"})
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()  # (choice index, event)
    loop = asyncio.get_running_loop()
    for i, req in enumerate(reqs):
        req.on_event = lambda event, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, event))
    rid = protocol.new_id("chatcmpl" if chat else "cmpl")
    for req in reqs:
        engine.submit(req)
    try:
        texts_of = [t for t in (prompt_texts or [None] * len(prompts)) for _ in range(n)]
        if body.get("stream"):
            return await _stream(request, body, reqs, events, rid, chat=chat, n=n,
                                 echo=texts_of if body.get("echo") else None)
        dones: dict[int, Done] = {}
        while len(dones) < len(reqs):
            i, event = await events.get()
            if isinstance(event, Done | Failed):
                _check_final(event)
                dones[i] = event
        finals = [dones[i] for i in range(len(reqs))]
        args = (s["names"], engine.tokenizer, finals, reqs, texts_of, chat, body.get("echo"))
        texts, logprobs = _choice_texts(*args) if reqs[0].logprobs is None and not body.get("echo") \
            else await loop.run_in_executor(None, _choice_texts, *args)  # echo: O(T) decodes a prompt
        out = protocol.response(rid, s["model"], finals, chat=chat, n=n, texts=texts, logprobs=logprobs)
        return web.json_response(serve_tools.apply_tool_calls(out, tools) if tools else out)
    finally:
        for req in reqs:
            req.cancelled.set()  # a client gone mid-generation frees its rows at the next step


def _choice_texts(names: lp.TokenText, tokenizer, dones: list[Done], reqs: list[GenRequest],
                  prompt_texts: list[str | None], chat: bool, echo: bool) -> tuple[list[str], list]:
    """Per choice: its text (the prompt first when echoed) and its ``logprobs`` object."""
    texts, logprobs = [], []
    for d, req, prompt_text in zip(dones, reqs, prompt_texts):
        obj = None
        if d.logprobs is not None:
            obj = lp.chat_logprobs(d.logprobs, names) if chat else \
                lp.completion_logprobs(d.logprobs, d.offsets, names)
        text = d.text
        if echo:
            text, obj = lp.echo_choice(tokenizer, names, req.prompt, prompt_text, d.text, obj,
                                       d.prompt_logprobs)
        texts.append(text)
        logprobs.append(obj)
    return texts, logprobs


def _delta_logprobs(names: lp.TokenText, event: Delta, chat: bool, shift: int = 0) -> dict | None:
    """The ``logprobs`` of a streamed delta's tokens (offsets ``shift`` on past an echoed prompt)."""
    if event.logprobs is None:
        return None
    return lp.chat_logprobs(event.logprobs, names) if chat else \
        lp.completion_logprobs(event.logprobs, [o + shift for o in event.offsets], names)


def _echo_head(names: lp.TokenText, tokenizer, req: GenRequest, prompt_text: str | None,
               event: Event) -> tuple[str, dict | None]:
    """The first streamed chunk of an echoed choice: its prompt (and the prompt's logprobs)."""
    empty = lp.completion_logprobs([], [], names) if req.logprobs is not None else None
    return lp.echo_choice(tokenizer, names, req.prompt, prompt_text, "", empty,
                          getattr(event, "prompt_logprobs", None))


def _check_final(event: Done | Failed) -> None:
    """Raises the APIError of a request the engine did not complete."""
    if isinstance(event, Failed):
        raise APIError(500, event.message, type="server_error")
    if event.finish_reason == "cancelled":
        raise APIError(503, STOPPING, type="server_error", code="shutting_down")


async def _stream(request: web.Request, body: dict, reqs: list[GenRequest], events: asyncio.Queue,
                  rid: str, *, chat: bool, n: int = 1, echo: list[str | None] | None = None) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format (choices interleaved), then ``data: [DONE]``.

    Args:
        echo: per choice, its prompt string (None: token ids) when the prompts are echoed; each
            choice's first chunk is then its prompt.
    """
    model, names = request.app[SETTINGS]["model"], request.app[SETTINGS]["names"]
    tokenizer, loop, heads = request.app[ENGINE].tokenizer, asyncio.get_running_loop(), {}
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(obj) -> None:
        await resp.write(f"data: {json.dumps(obj) if isinstance(obj, dict) else obj}\n\n".encode())

    try:
        if chat:
            for i in range(len(reqs)):
                await send(protocol.chunk(rid, model, chat=True, index=i, role=True))
        dones: dict[int, Done] = {}
        while len(dones) < len(reqs):
            i, event = await events.get()
            if echo is not None and i not in heads and not isinstance(event, Failed):
                text, obj = await loop.run_in_executor(None, _echo_head, names, tokenizer, reqs[i], echo[i], event)
                await send(protocol.chunk(rid, model, chat=chat, index=i, text=text, logprobs=obj))
                heads[i] = len(text)  # later offsets count the echoed prompt
            if isinstance(event, Delta):
                await send(protocol.chunk(rid, model, chat=chat, index=i, text=event.text,
                                          logprobs=_delta_logprobs(names, event, chat, heads.get(i, 0))))
                continue
            try:
                _check_final(event)
            except APIError as e:  # headers are sent: the error goes in the stream
                await send(e.body())
                break
            dones[i] = event
            await send(protocol.chunk(rid, model, chat=chat, index=i, done=event))
        options = body.get("stream_options")
        if len(dones) == len(reqs) and isinstance(options, dict) and options.get("include_usage"):
            await send(protocol.usage_chunk(rid, model, chat=chat, dones=[dones[i] for i in sorted(dones)], n=n))
        await send("[DONE]")
        await resp.write_eof()
    except ConnectionResetError:  # the client left: nothing to answer; its rows are cancelled
        for req in reqs:
            req.cancelled.set()
    return resp
