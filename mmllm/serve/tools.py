"""OpenAI function calling for ``mmllm serve``: ``tools`` / ``tool_choice`` in, ``tool_calls`` out.

A request's ``tools`` are rendered into the prompt as a system message (the function schemas and
the call format ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``); earlier assistant
``tool_calls`` are rendered back in that format and ``tool`` messages keep their role, so a
conversation continues after the client ran the tools. The completion is searched for calls of
the declared functions: a JSON object ``{"name", "arguments"}`` (inside ``<tool_call>`` or bare,
since the engine drops special tokens from the text), or the Toolformer syntax
``<API>name(args)`` / a completion that is exactly ``name(args)``. Found calls become
``message.tool_calls`` (arguments as a JSON string, as OpenAI sends them) with
``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from mmllm.data.special_tokens import SPECIAL_TOKENS
from mmllm.serve.protocol import APIError

CHOICES = ("none", "auto", "required")
_TOOLFORMER = re.compile(r"(?:<API>)?\s*([A-Za-z0-9_.-]{1,64})\((.*?)\)\s*(?:→|</API>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolSpec:
    """The parsed ``tools`` of a request: function name -> schema, and the tool_choice."""

    functions: dict[str, dict]
    choice: str  # "none", "auto", "required" or a function name (forced)


def parse_tools(body: Mapping) -> ToolSpec | None:
    """The request's tools (None when it declares none); APIError for a malformed declaration."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return None
    if body.get("stream"):
        raise APIError(400, "streaming with tools is not supported by this server; send stream=false",
                       param="stream")
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list", param="tools")
    functions = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) and t.get("type") == "function" else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           param="tools")
        functions[fn["name"]] = dict(fn)
    if isinstance(choice, Mapping):
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        choice = name
    elif choice is None:
        choice = "auto"
    elif choice not in CHOICES:
        raise APIError(400, f"tool_choice must be one of {CHOICES} or a function, got {choice!r}",
                       param="tool_choice")
    return ToolSpec(functions, choice)


def without_tools(body: Mapping) -> dict:
    """The body minus the fields this module handles (the generation parser refuses them)."""
    return {k: v for k, v in body.items() if k not in ("tools", "tool_choice", "parallel_tool_calls")}


def system_prompt(spec: ToolSpec) -> str:
    """The tools section of the prompt."""
    schemas = "\n".join(json.dumps(f, ensure_ascii=False) for f in spec.functions.values())
    call = f'{SPECIAL_TOKENS.tool_call_start}{{"name": <function name>, "arguments": <arguments object>}}' \
           f"{SPECIAL_TOKENS.tool_call_end}"
    rule = {"auto": "Call a function when it helps; otherwise answer directly.",
            "required": "You must call one of the functions."}.get(spec.choice, f"You must call {spec.choice}.")
    return f"You can call these functions:\n{schemas}\nTo call one, reply with {call}\n{rule}"


def render_call(call: Mapping) -> str:
    """An OpenAI ``tool_calls`` entry in the prompt's call format."""
    fn = call.get("function") or {}
    args = fn.get("arguments") or "{}"
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        pass  # kept as the client sent it
    body = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
    return f"{SPECIAL_TOKENS.tool_call_start}{body}{SPECIAL_TOKENS.tool_call_end}"


def tool_messages(body: Mapping, spec: ToolSpec | None) -> dict:
    """``body`` whose messages are plain ``{"role", "content"}`` ones: assistant ``tool_calls``
    rendered into the content, the tools section added to (or as) the system message."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return dict(body)  # protocol.chat_messages reports it
    out = []
    for m in messages:
        if isinstance(m, Mapping) and m.get("role") == "assistant" and m.get("tool_calls"):
            text = (m.get("content") or "") + "".join(render_call(c) for c in m["tool_calls"])
            m = {"role": "assistant", "content": text}
        elif isinstance(m, Mapping) and m.get("role") == "tool":
            m = {"role": "tool", "content": m.get("content") if m.get("content") is not None else ""}
        out.append(m)
    if spec is not None and spec.choice != "none":
        section = system_prompt(spec)
        if out and isinstance(out[0], Mapping) and out[0].get("role") in ("system", "developer") \
                and isinstance(out[0].get("content"), str):
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return dict(body) | {"messages": out}


def _json_calls(text: str, names: set[str]) -> tuple[list[tuple[str, dict]], list[tuple[int, int]]]:
    """Every JSON object ``{"name": <declared>, "arguments"|"parameters": {...}}`` in ``text``."""
    decoder, calls, spans, pos = json.JSONDecoder(), [], [], 0
    while (start := text.find("{", pos)) != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
        if isinstance(obj, dict) and obj.get("name") in names and isinstance(args, dict | str):
            calls.append((obj["name"], json.loads(args) if isinstance(args, str) and args.startswith("{") else args))
            spans.append((start, end))
        pos = end
    return calls, spans


def parse_calls(text: str, spec: ToolSpec) -> tuple[str, list[tuple[str, dict | str]]]:
    """``(content without the calls, [(name, arguments)])`` of a completion."""
    names = set(spec.functions)
    calls, spans = _json_calls(text, names)
    if not calls:
        for m in _TOOLFORMER.finditer(text):
            whole = m.group(0).strip()
            if m.group(1) in names and (whole.startswith("<API>") or text.strip() == whole):
                args = m.group(2).strip()
                calls.append((m.group(1), json.loads(args) if args.startswith("{") else _single_arg(spec, m.group(1), args)))
                spans.append(m.span())
    content = text
    for start, end in reversed(spans):
        content = content[:start] + content[end:]
    for tag in (SPECIAL_TOKENS.tool_call_start, SPECIAL_TOKENS.tool_call_end, "<API>", "</API>"):
        content = content.replace(tag, "")
    return content.strip(), calls


def _single_arg(spec: ToolSpec, name: str, text: str) -> dict:
    """Toolformer's ``name(text)``: the text bound to the function's one required parameter."""
    params = spec.functions[name].get("parameters") or {}
    required = params.get("required") or list(params.get("properties", {}))[:1]
    return {required[0]: text.strip("\"'")} if len(required) == 1 else {"input": text}


def apply_tool_calls(response: dict, spec: ToolSpec) -> dict:
    """Rewrites the choices of a chat completion whose text holds calls into ``tool_calls``."""
    if spec.choice == "none":
        return response
    for choice in response["choices"]:
        message = choice["message"]
        content, calls = parse_calls(message["content"] or "", spec)
        if spec.choice not in CHOICES:  # a forced function: only its calls count
            calls = [c for c in calls if c[0] == spec.choice]
        if not calls:
            continue
        message["content"] = content or None
        message["tool_calls"] = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                  "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
                                 for name, args in calls]
        choice["finish_reason"] = "tool_calls"
    return response
