"""Tools declared with a JSON schema, a registry that validates, times out and caps every call.

A :class:`Tool` is a name, a description and a JSON schema of its arguments (the OpenAI
function-calling ``parameters`` object), plus the function that runs it. A
:class:`ToolRegistry` holds tools and is the one way a model's call reaches them:
:meth:`ToolRegistry.call` parses the arguments (a dict or a JSON string), validates them
against the schema (``jsonschema``), runs the tool under a wall-clock timeout and caps its
output. Whatever goes wrong (unknown tool, bad JSON, a schema violation, an exception, a
timeout) comes back as ``ToolResult(ok=False, content="error: ...")``: text the model sees on
its next turn, never an exception in the caller's loop.

Timeouts: the call runs on a worker thread; past ``timeout`` the caller gets an error result at
once. A Python thread cannot be killed, so a tool that can run unboundedly must bound itself
(the calculator refuses expensive inputs; the python tool runs in a killed-on-timeout sandbox
process); the registry's pool is bounded (``max_workers``) so stuck tools cannot multiply.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import jsonschema


class ToolError(Exception):
    """Raised by a tool for a bad request it understood (the message goes to the model)."""


@dataclass(frozen=True)
class ToolResult:
    """What one tool call returned.

    Attributes:
        name: the tool called.
        ok: False for any failure (the content then starts with ``"error: "``).
        content: the text the model sees (at most the registry's ``max_output_chars``).
        seconds: wall time of the call.
        truncated: the tool's output was longer than the cap and was cut.
    """

    name: str
    ok: bool
    content: str
    seconds: float = 0.0
    truncated: bool = False

    def message(self, tool_call_id: str | None = None) -> dict:
        """The result as an OpenAI-style ``{"role": "tool", ...}`` chat message."""
        msg = {"role": "tool", "name": self.name, "content": self.content}
        return msg | ({"tool_call_id": tool_call_id} if tool_call_id else {})


@dataclass
class Tool:
    """One callable tool with an OpenAI-style schema.

    Args:
        name: the function name the model calls (``^[a-zA-Z0-9_.-]{1,64}$``).
        description: what it does, for the model's prompt.
        parameters: JSON schema of the arguments (``{"type": "object", "properties": ...,
            "required": [...]}``); validated on every call.
        fn: ``fn(**arguments) -> str`` (non-strings are JSON-encoded).
        timeout: this tool's timeout in seconds (None: the registry's).
    """

    name: str
    description: str
    parameters: dict
    fn: Callable[..., object]
    timeout: float | None = None
    _validator: object = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 64 or not all(c.isalnum() or c in "_.-" for c in self.name):
            raise ValueError(f"tool name must match [a-zA-Z0-9_.-]{{1,64}}, got {self.name!r}")
        jsonschema.Draft202012Validator.check_schema(self.parameters)
        self._validator = jsonschema.Draft202012Validator(self.parameters)

    def schema(self) -> dict:
        """The OpenAI ``tools=[...]`` entry: ``{"type": "function", "function": {...}}``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def validate(self, arguments: Mapping) -> None:
        """Raises :class:`ToolError` naming the first schema violation."""
        errors = sorted(self._validator.iter_errors(dict(arguments)), key=lambda e: list(e.path))
        if errors:
            where = "/".join(str(p) for p in errors[0].path) or "arguments"
            raise ToolError(f"invalid arguments for {self.name} ({where}): {errors[0].message}")


class ToolRegistry:
    """The tools a model may call, and the one safe way to call them.

    Args:
        tools: tools to register (names must be unique).
        timeout: default seconds per call.
        max_output_chars: longer outputs are cut to this many characters (marked truncated).
        max_workers: threads running calls at once (bounds tools stuck past their timeout).
    """

    def __init__(self, *, tools: Iterable[Tool] = (), timeout: float = 10.0, max_output_chars: int = 4000,
                 max_workers: int = 4) -> None:
        if timeout <= 0 or max_output_chars <= 0 or max_workers < 1:
            raise ValueError("timeout, max_output_chars and max_workers must be positive")
        self.timeout, self.max_output_chars = timeout, max_output_chars
        self._tools: dict[str, Tool] = {}
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="tool")
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> Tool:
        if tool.name in self._tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def schemas(self) -> list[dict]:
        """Every tool's OpenAI ``tools`` entry (for a chat request or a system prompt)."""
        return [t.schema() for t in self._tools.values()]

    def call(self, name: str, arguments: Mapping | str | None = None) -> ToolResult:
        """Runs tool ``name`` on ``arguments`` (a dict or its JSON text); never raises.

        Returns:
            A :class:`ToolResult`; on any failure ``ok=False`` and ``content`` says why.
        """
        start = time.perf_counter()
        try:
            tool = self._tools.get(name)
            if tool is None:
                raise ToolError(f"unknown tool {name!r}; available: {', '.join(self._tools) or 'none'}")
            args = self._parse_arguments(arguments)
            tool.validate(args)
            timeout = tool.timeout or self.timeout
            future = self._pool.submit(tool.fn, **args)
            try:
                out = future.result(timeout=timeout)
            except FutureTimeout:
                future.cancel()
                raise ToolError(f"{name} timed out after {timeout:g} s") from None
        except Exception as exc:  # noqa: BLE001 (every failure becomes text for the model)
            text = str(exc) if isinstance(exc, ToolError) else f"{name} failed: {type(exc).__name__}: {exc}"
            content, cut = self._cap("error: " + text)
            return ToolResult(name, False, content, time.perf_counter() - start, cut)
        content, cut = self._cap(out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str))
        return ToolResult(name, True, content, time.perf_counter() - start, cut)

    @staticmethod
    def _parse_arguments(arguments: Mapping | str | None) -> dict:
        if arguments is None or arguments == "":
            return {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ToolError(f"arguments are not valid JSON: {exc}") from None
        if not isinstance(arguments, Mapping):
            raise ToolError(f"arguments must be a JSON object, got {type(arguments).__name__}")
        return dict(arguments)

    def _cap(self, text: str) -> tuple[str, bool]:
        if len(text) <= self.max_output_chars:
            return text, False
        note = f"... [truncated {len(text) - self.max_output_chars} chars]"
        return text[:max(0, self.max_output_chars - len(note))] + note, True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
