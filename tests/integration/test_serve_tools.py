"""`mmllm serve` function calling through the real openai client on loopback, with a scripted engine."""

from __future__ import annotations

import json

import openai
import pytest

from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.serve import ServerThread, create_app
from mmllm.serve.engine import Done
from mmllm.serve.tools import ToolSpec, parse_calls

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


class ScriptedEngine:
    """The engine interface the app uses; answers each request with the next scripted text."""

    def __init__(self, tokenizer, texts):
        self.tokenizer, self.max_seq_len, self.pending = tokenizer, 4096, 0
        self.texts, self.prompts = list(texts), []

    def start(self):
        return self

    def stop(self, timeout=None):
        pass

    def submit(self, req):
        self.prompts.append(self.tokenizer.decode(req.prompt))
        text = self.texts.pop(0)
        req.on_event(Done(text, "stop", len(req.prompt), len(self.tokenizer(text)["input_ids"])))
        return req


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(["call the calculator to add numbers. " * 50], vocab_size=300, show_progress=False)


def test_tool_call_round_trip_with_the_openai_client(tok):
    engine = ScriptedEngine(tok, [
        'Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>',
        "The answer is 5."])
    with ServerThread(create_app(engine, model_name="m")) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "What is 2+3?"}]
        r = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=32)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me compute."
        (call,) = choice.message.tool_calls
        assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "2+3"}
        assert call.id.startswith("call_") and call.type == "function"
        # The tools section reached the prompt as a system message.
        assert "You can call these functions" in engine.prompts[0] and '"name": "calculator"' in engine.prompts[0]
        # Next turn: the assistant's call and the tool result are accepted and rendered.
        msgs += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "5"}]
        r2 = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=32)
        assert r2.choices[0].finish_reason == "stop" and r2.choices[0].message.content == "The answer is 5."
        assert r2.choices[0].message.tool_calls is None
        assert '{"name": "calculator", "arguments": {"expression": "2+3"}}' in engine.prompts[1]
        assert "<|im_start|>tool\n5<|im_end|>" in engine.prompts[1]


def test_bad_tools_and_tool_choice_are_400(tok):
    engine = ScriptedEngine(tok, [])
    with ServerThread(create_app(engine, model_name="m")) as s:
        c = openai.OpenAI(base_url=s.url, api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.BadRequestError, match="not in tools"):
            c.chat.completions.create(model="m", messages=msgs, tools=TOOLS,
                                      tool_choice={"type": "function", "function": {"name": "nope"}})
        with pytest.raises(openai.BadRequestError, match="tools\\[0\\]"):
            c.chat.completions.create(model="m", messages=msgs, tools=[{"type": "function", "function": {}}])
        with pytest.raises(openai.BadRequestError, match="streaming with tools"):
            c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, stream=True)


def test_parse_calls_formats():
    spec = ToolSpec({"calculator": TOOLS[0]["function"]}, "auto")
    assert parse_calls('{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}', spec)[1] == \
        [("calculator", {"expression": "1"})]
    assert parse_calls("The sum is <API>calculator(400+25) →", spec) == \
        ("The sum is", [("calculator", {"expression": "400+25"})])
    assert parse_calls("calculator(7*6)", spec)[1] == [("calculator", {"expression": "7*6"})]
    # Undeclared functions and prose with parentheses are no calls.
    assert parse_calls('{"name": "search", "arguments": {}} and f(x) (maybe)', spec)[1] == []


def test_run_tool_turn_executes_calls_and_feeds_results_back():
    from mmllm.tools.builtin import default_registry
    from mmllm.tools.chat_loop import print_event, run_tool_turn, tools_system_message

    seen, printed = [], []

    def generate_fn(messages):
        seen.append(messages)
        if len(seen) == 1:
            return 'Computing. {"name": "calculator", "arguments": {"expression": "400+25"}}'
        return "It is " + messages[-1]["content"] + "."

    with default_registry() as reg:
        system = tools_system_message(reg)
        assert "calculator" in system["content"] and "<tool_call>" in system["content"]
        msgs = [system, {"role": "user", "content": "400+25?"}]
        added = run_tool_turn(msgs, generate_fn, reg, lambda e: print_event(e, printed.append))
    assert [m["role"] for m in added] == ["assistant", "tool", "assistant"]
    assert json.loads(added[0]["tool_calls"][0]["function"]["arguments"]) == {"expression": "400+25"}
    assert added[1]["content"] == "425" and added[1]["tool_call_id"] == added[0]["tool_calls"][0]["id"]
    assert added[2]["content"] == "It is 425."
    assert printed[0] == "[tool call] calculator({'expression': '400+25'})" and printed[1].startswith("[tool result] 425")
    # The second generation saw plain messages: the call rendered into the assistant content.
    assert all(isinstance(m["content"], str) for m in seen[1])
    assert '<tool_call>{"name": "calculator"' in seen[1][-2]["content"]
