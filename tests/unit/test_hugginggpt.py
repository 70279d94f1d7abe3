"""HuggingGPT: plan parsing and retries, BM25 + LLM selection with fallback, DAG execution."""

from __future__ import annotations

import json
import threading

import pytest

from mmllm.tools.builtin import default_registry
from mmllm.tools.hugginggpt import (
    HuggingGPT,
    PlanError,
    Task,
    extract_json,
    fill_placeholders,
    load_catalog,
    parse_plan,
    text_expert,
    tool_experts,
    topological_order,
)

PLAN = [
    {"id": 0, "task": "calculation", "args": {"expression": "400+25"}, "dep": [-1]},
    {"id": 1, "task": "date", "args": {"date": "2024-01-01"}, "dep": [-1]},
    {"id": 2, "task": "text-generation", "args": {"text": "sum <text>-0 on <text>-1"}, "dep": [0, 1]},
]


class ScriptedLLM:
    """Answers in turn from a script; records every conversation it saw."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def __call__(self, messages):
        self.seen.append(messages)
        return self.answers.pop(0)


def test_extract_json_and_parse_plan():
    text = "Sure! Here is the plan:\n```json\n" + json.dumps(PLAN) + "\n```\nDone [ok]."
    tasks = parse_plan(text)
    assert [t.dep for t in tasks] == [[], [], [0, 1]]
    assert extract_json('answer: {"id": "x", "reason": "y"} bye', dict) == {"id": "x", "reason": "y"}
    with pytest.raises(PlanError, match="no JSON list"):
        parse_plan("no plan at all")
    with pytest.raises(PlanError, match="dep must be"):
        parse_plan('[{"id": 0, "task": "t", "args": {}, "dep": "none"}]')
    # A placeholder is a dependency even when dep forgets it.
    assert parse_plan('[{"id": 3, "task": "t", "args": {"x": "<image>-1"}, "dep": [-1]}]')[0].dep == [1]


def test_dag_errors_and_placeholders():
    with pytest.raises(PlanError, match="cycle"):
        topological_order([Task(0, "a", {}, [1]), Task(1, "a", {}, [0])])
    with pytest.raises(PlanError, match="unknown tasks"):
        topological_order([Task(0, "a", {}, [7])])
    assert topological_order([Task(2, "a", {}, [0, 1]), Task(0, "a", {}), Task(1, "a", {}, [0])]) == [0, 1, 2]
    assert fill_placeholders({"a": ["<text>-0 and <image>-1"], "n": 3}, {0: "x", 1: "y"}) == \
        {"a": ["x and y"], "n": 3}


def test_bad_plan_retries_with_error_then_fails():
    llm = ScriptedLLM(["not json", json.dumps(PLAN[:1])])
    hg = HuggingGPT(llm=llm, experts={"calculator": lambda a: "1"})
    assert [t.task for t in hg.plan("add")] == ["calculation"]
    assert "invalid" in llm.seen[1][-1]["content"] and llm.seen[1][-2]["content"] == "not json"
    llm = ScriptedLLM(["[]", "[1]", "nope"])
    with pytest.raises(PlanError, match="after 3 attempts"):
        HuggingGPT(llm=llm, experts={"calculator": lambda a: "1"}, max_retries=2).plan("add")


def test_selection_ranks_by_bm25_and_falls_back():
    with default_registry() as reg:
        experts = tool_experts(reg)
        task = Task(0, "date", {"start": "2024-01-01", "end": "2024-03-01", "q": "how many days between"})
        hg = HuggingGPT(llm=ScriptedLLM(["I like the first one"]), experts=experts)
        assert hg.candidates(task)[0]["id"] == "days_between"
        entry, why = hg.select(task, "how many days")
        assert entry["id"] == "days_between" and why.startswith("fallback")
        second = hg.candidates(task)[1]["id"]
        hg = HuggingGPT(llm=ScriptedLLM([json.dumps({"id": second, "reason": "r"})]), experts=experts)
        assert hg.select(task, "q") == (hg.candidates(task)[1], "llm: r")
        outside = next(e["id"] for e in hg.catalog if e["task"] == "date" and e not in hg.candidates(task))
        hg = HuggingGPT(llm=ScriptedLLM([json.dumps({"id": outside})]), experts=experts)
        assert hg.select(task, "q")[0]["id"] == "days_between"  # not a candidate: fallback
    # The VLM slot is never chosen without an expert behind it.
    assert "image-to-text" not in hg.task_types and any(e["expert"] == "vlm" for e in load_catalog())


def test_plan_runs_in_dependency_order_with_parallel_tasks():
    # The two independent tasks meet at a barrier before either returns: run one after the other,
    # the first would wait for the second forever (a broken barrier after 30 s fails the task).
    both = threading.Barrier(2, timeout=30)
    met = []

    def together(name, fn):
        def run(args):
            both.wait()
            met.append(name)
            return fn(args)
        return run

    with default_registry() as reg:
        tools = tool_experts(reg)
        seen_prompt = []
        experts = {"calculator": together("calc", tools["calculator"]), "weekday": together("weekday", tools["weekday"]),
                   "lm": text_expert(lambda p: seen_prompt.append(p) or "LM says " + p)}
        llm = ScriptedLLM([json.dumps(PLAN), "The answer is 425 on Monday."])
        hg = HuggingGPT(llm=llm, experts=experts)
        out = hg.run("What is 400+25, and the weekday of 2024-01-01?")
    res = out["results"]
    assert res[0].output == "425" and res[1].output == "Monday" and res[1].model == "weekday"
    assert seen_prompt == ["sum 425 on Monday"] and res[2].output == "LM says sum 425 on Monday"
    assert sorted(met) == ["calc", "weekday"] and not both.broken  # the independent tasks overlapped
    assert res[2].start >= max(res[0].end, res[1].end)  # the dependant started after both
    assert out["answer"] == "The answer is 425 on Monday."
    assert '"output": "425"' in llm.seen[-1][0]["content"]


def test_failed_task_skips_dependants():
    def boom(args):
        raise RuntimeError("down")
    llm = ScriptedLLM([json.dumps(PLAN)])
    hg = HuggingGPT(llm=llm, experts={"calculator": boom, "weekday": lambda a: "Monday", "lm": lambda a: "x"})
    res = hg.execute(hg.plan("q"), "q")
    assert not res[0].ok and "down" in res[0].output and res[1].ok
    assert not res[2].ok and res[2].output.startswith("skipped")


def test_default_experts_and_the_vlm_slot():
    from mmllm.tools.hugginggpt import default_experts

    with default_registry() as reg:
        experts = default_experts(reg, generate_fn=str.upper, vlm=lambda image, q: f"{q} -> a cat in {image}")
        assert experts["lm"]({"text": "hi"}) == "HI" and experts["calculator"]({"expression": "1+1"}) == "2"
        assert experts["vlm"]({"image": "cat.png"}) == "Describe the image. -> a cat in cat.png"
        with pytest.raises(TypeError, match="args.image"):
            experts["vlm"]({"text": "what?"})
        hg = HuggingGPT(llm=ScriptedLLM([]), experts=experts)
        assert {"image-to-text", "text-generation", "calculation"} <= set(hg.task_types)
        with pytest.raises(RuntimeError, match="error"):
            experts["calculator"]({"expression": "1/0"})
