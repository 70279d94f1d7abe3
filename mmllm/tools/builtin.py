"""Built-in tools: calendar/date, translation through a model, Python in the sandbox.

Each ``*_tool()`` returns a :class:`~mmllm.tools.registry.Tool`; :func:`default_registry`
registers the calculator, the calendar tools and (given their back ends) search, translation
and python. Dates are ISO ``YYYY-MM-DD``; a malformed date is an error result naming the format.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence

from mmllm.tools.calculator import calculator_tool
from mmllm.tools.registry import Tool, ToolError, ToolRegistry

_DATE = {"type": "string", "description": "ISO date, YYYY-MM-DD"}
MAX_DAYS = 3_650_000  # ~10,000 years: beyond it date arithmetic leaves datetime's range anyway


def _date(text: str, what: str = "date") -> dt.date:
    try:
        return dt.date.fromisoformat(text.strip())
    except (ValueError, AttributeError):
        raise ToolError(f"{what} must be an ISO date YYYY-MM-DD, got {text!r}") from None


def today(*, clock: Callable[[], dt.date] = dt.date.today) -> str:
    d = clock()
    return f"{d.isoformat()} ({d.strftime('%A')})"


def weekday(date: str) -> str:
    return _date(date).strftime("%A")


def add_days(date: str, days: int) -> str:
    if abs(days) > MAX_DAYS:
        raise ToolError(f"days must be within +-{MAX_DAYS}")
    try:
        return (_date(date) + dt.timedelta(days=days)).isoformat()
    except OverflowError:
        raise ToolError("the resulting date is outside years 1-9999") from None


def days_between(start: str, end: str) -> str:
    """Days from ``start`` to ``end`` (negative when ``end`` is earlier)."""
    return str((_date(end, "end") - _date(start, "start")).days)


def calendar_tools(*, clock: Callable[[], dt.date] = dt.date.today) -> list[Tool]:
    """``today``, ``weekday``, ``add_days`` and ``days_between``.

    Args:
        clock: the source of today's date (tests pin it).
    """
    obj = lambda props, req: {"type": "object", "properties": props, "required": req,
                              "additionalProperties": False}
    return [
        Tool(name="today", description="Today's date and weekday.", parameters=obj({}, []),
             fn=lambda: today(clock=clock)),
        Tool(name="weekday", description="The weekday (Monday..Sunday) of a date.",
             parameters=obj({"date": _DATE}, ["date"]), fn=weekday),
        Tool(name="add_days", description="The date a number of days after (or before, if negative) a date.",
             parameters=obj({"date": _DATE, "days": {"type": "integer"}}, ["date", "days"]), fn=add_days),
        Tool(name="days_between", description="The number of days from start to end (negative if end is earlier).",
             parameters=obj({"start": _DATE, "end": _DATE}, ["start", "end"]), fn=days_between),
    ]


def translate_tool(translator: Callable[[str, str, str], str] | object, *, timeout: float | None = 60.0) -> Tool:
    """``translate(text, target_language, source_language="auto")`` through a model.

    Args:
        translator: ``fn(text, target, source) -> str``, or a teacher (:class:`mmllm.teacher.Teacher`:
            anything with ``chat(messages) -> str``), asked with a fixed translation prompt.
    """
    if hasattr(translator, "chat"):
        teacher = translator

        def translator(text: str, target: str, source: str) -> str:
            src = "" if source == "auto" else f" from {source}"
            answer = teacher.chat([
                {"role": "system", "content": "You are a translator. Reply with the translation only."},
                {"role": "user", "content": f"Translate{src} to {target}:\n\n{text}"}])
            if answer is None:
                raise ToolError("the translation model returned nothing")
            return answer.strip()

    def run(text: str, target_language: str, source_language: str = "auto") -> str:
        return translator(text, target_language, source_language)

    return Tool(
        name="translate", description="Translate text into another language.", timeout=timeout,
        parameters={"type": "object", "additionalProperties": False, "required": ["text", "target_language"],
                    "properties": {"text": {"type": "string", "maxLength": 8000},
                                   "target_language": {"type": "string", "description": "e.g. French"},
                                   "source_language": {"type": "string", "default": "auto"}}},
        fn=run)


def python_tool(*, timeout: float = 5.0, memory_mb: int = 512, isolation: str = "auto",
                packages: Sequence[str] = ()) -> Tool:
    """``python(code)``: runs a program in :mod:`mmllm.sandbox` and returns its stdout.

    The program never runs in this process: the sandbox (bubblewrap, rlimits, no network) kills
    it after ``timeout`` seconds. A program that fails returns its stderr tail as an error result.
    """
    from mmllm.sandbox import run_program

    def run(code: str) -> str:
        result = run_program(code, timeout=timeout, memory_mb=memory_mb, isolation=isolation, packages=packages)
        if result.status == "timeout":
            raise ToolError(f"python timed out after {timeout:g} s")
        if not result.passed:
            tail = result.stderr.strip().splitlines()[-5:]
            raise ToolError("python failed: " + ("\n".join(tail) or result.reason))
        return result.stdout if result.stdout.strip() else "(no output; print() what you need)"

    return Tool(name="python", description="Run a Python program in a sandbox (no network, no files); "
                                           "returns what it prints.", timeout=timeout + 5.0,
                parameters={"type": "object", "additionalProperties": False, "required": ["code"],
                            "properties": {"code": {"type": "string", "maxLength": 20000}}},
                fn=run)


def default_registry(*, search=None, translator=None, python: bool = False,
                     clock: Callable[[], dt.date] = dt.date.today, timeout: float = 10.0,
                     max_output_chars: int = 4000, max_workers: int = 4,
                     only: Sequence[str] | None = None) -> ToolRegistry:
    """A registry with the calculator and the calendar tools, plus the optional ones.

    Args:
        search: a :class:`mmllm.tools.search.BM25Index` to expose as ``search``.
        translator: a translation callable or teacher (see :func:`translate_tool`).
        python: register the sandboxed ``python`` tool.
        clock: today's date source.
        timeout, max_output_chars, max_workers: the :class:`ToolRegistry` limits.
        only: keep just these tools, in this order (a small model's prompt lists fewer schemas);
            a name the registry would not have is an error.
    """
    tools = [calculator_tool(), *calendar_tools(clock=clock)]
    if search is not None:
        from mmllm.tools.search import search_tool
        tools.append(search_tool(search))
    if translator is not None:
        tools.append(translate_tool(translator))
    if python:
        tools.append(python_tool())
    if only is not None:
        by_name = {t.name: t for t in tools}
        unknown = [n for n in only if n not in by_name]
        if unknown:
            raise ValueError(f"tools {unknown} are not available (the registry has {sorted(by_name)})")
        tools = [by_name[n] for n in only]
    return ToolRegistry(tools=tools, timeout=timeout, max_output_chars=max_output_chars, max_workers=max_workers)
