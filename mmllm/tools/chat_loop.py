"""One assistant turn with tools: generate, run the calls it makes, feed the results back, repeat.

``mmllm chat --tools`` drives :func:`run_tool_turn` with its own ``generate_fn`` (the chat's model
on the rendered conversation) and prints the events; any other front end (a notebook, a script
over a served model) can do the same. Calls are found as ``mmllm serve`` finds them
(:func:`mmllm.serve.tools.parse_calls`: a ``{"name", "arguments"}`` JSON block or the Toolformer
syntax) and only for tools of the registry; each runs through :meth:`ToolRegistry.call`, which
never raises, so a failing tool is a ``tool`` message saying why.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence

from mmllm.serve.tools import ToolSpec, parse_calls, system_prompt, tool_messages
from mmllm.tools.registry import ToolRegistry

Event = dict  # {"type": "call" | "result" | "answer" | "limit", ...}


def registry_spec(registry: ToolRegistry) -> ToolSpec:
    """The registry's tools as a request's ``tools`` (for prompts and call parsing)."""
    return ToolSpec({s["function"]["name"]: s["function"] for s in registry.schemas()}, "auto")


def tools_system_message(registry: ToolRegistry) -> dict:
    """The system message that tells the model which tools it has and how to call them."""
    return {"role": "system", "content": system_prompt(registry_spec(registry))}


def run_tool_turn(messages: Sequence[dict], generate_fn: Callable[[list[dict]], str], registry: ToolRegistry,
                  on_event: Callable[[Event], None] = lambda e: None, *, max_rounds: int = 5) -> list[dict]:
    """Runs one assistant turn, executing tool calls as the model makes them.

    Args:
        messages: the conversation so far (ending with the user's message); not modified.
        generate_fn: ``fn(messages) -> assistant text`` (the model's next reply); it gets plain
            ``{"role", "content"}`` messages (earlier calls rendered into the assistant content
            in the ``<tool_call>`` format), ready for :class:`mmllm.data.chat.ChatRenderer`.
        registry: the tools the model may call.
        on_event: called with ``{"type": "call", "name", "arguments"}``, ``{"type": "result",
            "name", "ok", "content", "seconds"}``, ``{"type": "answer", "content"}`` and, when
            ``max_rounds`` replies all made calls, ``{"type": "limit"}``.
        max_rounds: model replies per turn at most (each may call tools).

    Returns:
        The messages the turn added: assistant messages with ``tool_calls``, their ``tool``
        results, and the final assistant answer (absent when the round limit was hit).
    """
    if max_rounds < 1:
        raise ValueError("max_rounds must be >= 1")
    spec, added = registry_spec(registry), []
    for _ in range(max_rounds):
        text = generate_fn(tool_messages({"messages": list(messages) + added}, None)["messages"])
        content, calls = parse_calls(text, spec)
        if not calls:
            added.append({"role": "assistant", "content": text})
            on_event({"type": "answer", "content": text})
            return added
        ids = [f"call_{uuid.uuid4().hex[:24]}" for _ in calls]
        added.append({"role": "assistant", "content": content or None, "tool_calls": [
            {"id": i, "type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
            for i, (name, args) in zip(ids, calls)]})
        for call_id, (name, args) in zip(ids, calls):
            on_event({"type": "call", "name": name, "arguments": args})
            result = registry.call(name, args)
            on_event({"type": "result", "name": name, "ok": result.ok, "content": result.content,
                      "seconds": result.seconds})
            added.append(result.message(call_id))
    on_event({"type": "limit"})
    return added


def print_event(event: Event, print_fn: Callable[[str], None] = print) -> None:
    """The CLI's rendering of an event (``on_event=print_event``)."""
    if event["type"] == "call":
        print_fn(f"[tool call] {event['name']}({event['arguments']})")
    elif event["type"] == "result":
        print_fn(f"[tool {'result' if event['ok'] else 'error'}] {event['content']} ({event['seconds']:.2f} s)")
    elif event["type"] == "limit":
        print_fn("[tool] round limit reached without a final answer")
