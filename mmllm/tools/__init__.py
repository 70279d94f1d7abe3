"""Tool use: a registry of JSON-schema tools, built-in tools, Gorilla and BFCL.

* :mod:`mmllm.tools.registry`: :class:`Tool` (name, description, JSON schema, function) and
  :class:`ToolRegistry`, which validates arguments, times out and caps every call and turns any
  failure into a :class:`ToolResult` the model reads (``ok=False``), never an exception.
* Built-ins: :mod:`~mmllm.tools.calculator` (``ast`` whitelist, never ``eval``), calendar/date,
  translation through a model, sandboxed python (:mod:`~mmllm.tools.builtin`), BM25 search over
  a local corpus (:mod:`~mmllm.tools.search`).
* :mod:`~mmllm.tools.catalog`: an API catalog in Gorilla's schema (a small real one ships).
* :mod:`~mmllm.tools.gorilla`: self-instruct <instruction, API> data through a teacher, chats
  with and without the retrieved API doc, evaluation by AST sub-tree matching
  (:mod:`~mmllm.tools.ast_match`); ``python -m mmllm.tools.gorilla generate|evaluate``.
* :mod:`~mmllm.tools.bfcl`: the Berkeley Function Calling Leaderboard: data fetch and loader,
  output decoding, the kit's checker (:mod:`~mmllm.tools.bfcl_checker`);
  ``python -m mmllm.tools.bfcl fetch|evaluate``.

Hydra: ``mmllm/conf/tools/{default,wiki_search}.yaml`` (``hydra.utils.instantiate`` gives a registry).
"""

from mmllm.tools.builtin import calendar_tools, default_registry, python_tool, translate_tool
from mmllm.tools.calculator import calculate, calculator_tool, evaluate
from mmllm.tools.registry import Tool, ToolError, ToolRegistry, ToolResult
from mmllm.tools.search import BM25Index, Passage, search_tool

__all__ = ["BM25Index", "Passage", "Tool", "ToolError", "ToolRegistry", "ToolResult", "calculate",
           "calculator_tool", "calendar_tools", "default_registry", "evaluate", "python_tool", "search_tool",
           "translate_tool"]
