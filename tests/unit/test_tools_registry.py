"""The tool registry (validation, timeout, output cap, errors as results) and the built-ins."""

import datetime as dt
import threading

import pytest

from mmllm.tools import Tool, ToolError, ToolRegistry, default_registry, python_tool, translate_tool

OBJ = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}, "required": ["n"],
       "additionalProperties": False}


@pytest.fixture(scope="module")
def registry():
    release = threading.Event()

    def hang(n):
        release.wait(30)
        return "late"

    def boom(n):
        raise KeyError("no such row")

    reg = ToolRegistry(timeout=0.3, max_output_chars=100, tools=[
        Tool(name="echo", description="echo n", parameters=OBJ, fn=lambda n: f"n={n}"),
        Tool(name="big", description="long output", parameters=OBJ, fn=lambda n: "x" * n),
        Tool(name="data", description="a dict", parameters=OBJ, fn=lambda n: {"n": n, "sq": n * n}),
        Tool(name="hang", description="never returns", parameters=OBJ, fn=hang),
        Tool(name="boom", description="raises", parameters=OBJ, fn=boom),
        Tool(name="refuse", description="ToolError", parameters=OBJ, fn=lambda n: (_ for _ in ()).throw(ToolError("n too odd"))),
    ])
    yield reg
    release.set()
    reg.close()


def test_call_ok_with_dict_and_json_arguments(registry):
    assert registry.call("echo", {"n": 3}).content == "n=3"
    r = registry.call("echo", '{"n": 4}')
    assert r.ok and r.content == "n=4" and not r.truncated
    assert registry.call("data", {"n": 3}).content == '{"n": 3, "sq": 9}'
    assert r.message("call_1") == {"role": "tool", "name": "echo", "content": "n=4", "tool_call_id": "call_1"}


@pytest.mark.parametrize("name,args,needle", [
    ("nope", {"n": 1}, "unknown tool 'nope'"),
    ("echo", "{n: 1", "not valid JSON"),
    ("echo", "[1, 2]", "must be a JSON object"),
    ("echo", {}, "'n' is a required property"),
    ("echo", {"n": "3"}, "is not of type 'integer'"),
    ("echo", {"n": -1}, "less than the minimum"),
    ("echo", {"n": 1, "extra": 2}, "Additional properties"),
    ("boom", {"n": 1}, "boom failed: KeyError"),
    ("refuse", {"n": 1}, "n too odd"),
])
def test_failures_become_error_results(registry, name, args, needle):
    r = registry.call(name, args)
    assert not r.ok and r.content.startswith("error: ") and needle in r.content, r.content


def test_timeout_returns_an_error_result(registry):
    r = registry.call("hang", {"n": 1})
    assert not r.ok and "timed out after 0.3 s" in r.content
    assert registry.call("echo", {"n": 5}).ok  # the registry still works


def test_output_cap(registry):
    r = registry.call("big", {"n": 1000})
    assert r.ok and r.truncated and len(r.content) == 100 and r.content.endswith("chars]")
    assert registry.call("big", {"n": 100}).content == "x" * 100


def test_schemas_and_bad_declarations(registry):
    s = registry.schemas()[0]
    assert s == {"type": "function", "function": {"name": "echo", "description": "echo n", "parameters": OBJ}}
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Tool(name="echo", description="", parameters=OBJ, fn=str))
    with pytest.raises(ValueError, match="tool name"):
        Tool(name="bad name!", description="", parameters=OBJ, fn=str)
    import jsonschema
    with pytest.raises(jsonschema.SchemaError):  # not a JSON schema
        Tool(name="t", description="", parameters={"type": 5}, fn=str)


def test_calendar_tools():
    reg = default_registry(clock=lambda: dt.date(2024, 2, 28))
    assert reg.call("today").content == "2024-02-28 (Wednesday)"
    assert reg.call("weekday", {"date": "1969-07-20"}).content == "Sunday"
    assert reg.call("add_days", {"date": "2024-02-28", "days": 2}).content == "2024-03-01"  # leap year
    assert reg.call("add_days", {"date": "2023-02-28", "days": 1}).content == "2023-03-01"
    assert reg.call("days_between", {"start": "2024-01-01", "end": "2025-01-01"}).content == "366"
    assert reg.call("days_between", {"start": "2024-03-01", "end": "2024-02-01"}).content == "-29"
    bad = reg.call("weekday", {"date": "31/12/2024"})
    assert not bad.ok and "YYYY-MM-DD" in bad.content
    assert "outside years" in reg.call("add_days", {"date": "9999-12-31", "days": 1}).content
    assert reg.call("calculator", {"expression": "2 * 21"}).content == "42"


class _FakeTranslator:
    """A teacher double: 'translates' by a lookup table, records its prompts."""

    def __init__(self):
        self.prompts = []

    def chat(self, messages):
        self.prompts.append(messages)
        return {"Good morning": "Bonjour"}.get(messages[-1]["content"].split("\n\n", 1)[1], "?") + "\n"


def test_translate_through_a_teacher_and_a_callable():
    teacher = _FakeTranslator()
    reg = ToolRegistry(tools=[translate_tool(teacher)])
    r = reg.call("translate", {"text": "Good morning", "target_language": "French", "source_language": "English"})
    assert r.ok and r.content == "Bonjour"
    assert teacher.prompts[0][-1]["content"].startswith("Translate from English to French:")
    reg2 = ToolRegistry(tools=[translate_tool(lambda text, tgt, src: f"[{src}->{tgt}] {text[::-1]}")])
    assert reg2.call("translate", {"text": "abc", "target_language": "de"}).content == "[auto->de] cba"


def test_python_tool_runs_in_the_sandbox():
    from mmllm.sandbox import SandboxUnavailable, resolve_isolation
    try:
        resolve_isolation("auto")
    except SandboxUnavailable as exc:
        pytest.skip(f"no sandbox here: {exc}")
    reg = ToolRegistry(tools=[python_tool(timeout=1.5)])
    assert reg.call("python", {"code": "print(sum(range(10)))"}).content.strip() == "45"
    err = reg.call("python", {"code": "import os\nos.listdir('/work')"})
    assert not err.ok and "python failed" in err.content
    assert "timed out" in reg.call("python", {"code": "while True: pass"}).content


def test_hydra_configs_instantiate():
    from pathlib import Path

    import hydra
    from omegaconf import OmegaConf

    from mmllm.config import CONF_DIR

    cfg = OmegaConf.load(Path(CONF_DIR) / "tools" / "default.yaml")
    reg = hydra.utils.instantiate(cfg)
    assert reg.names == ["calculator", "today", "weekday", "add_days", "days_between"]
    assert reg.timeout == 10.0 and reg.call("calculator", {"expression": "6*7"}).content == "42"
    wiki = OmegaConf.load(Path(CONF_DIR) / "tools" / "wiki_search.yaml")
    assert wiki.search._target_ == "mmllm.tools.search.BM25Index.from_corpus"
    wiki.search.source = [{"text": "Owls hunt at night.", "title": "Owl"}]
    wiki = OmegaConf.merge(cfg, {k: v for k, v in wiki.items() if k != "defaults"})
    assert hydra.utils.instantiate(wiki).call("search", {"query": "owls"}).content.startswith("[1] Owl")
