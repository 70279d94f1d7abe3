"""Tool-calling training chats (real results, masked from the loss) and the model-driven chat turn."""

from __future__ import annotations

import json

import pytest
import torch

from mmllm.tools.builtin import default_registry
from mmllm.tools.tool_chats import chat_turn, plain_chat, tool_call_chats


@pytest.fixture(scope="module")
def registry():
    with default_registry() as reg:
        yield reg


@pytest.fixture(scope="module")
def chats(registry):
    return tool_call_chats(60, registry, seed=3, exclude=["What is 23 * 17?"])


def test_chats_hold_real_results_in_the_serve_format(chats, registry):
    from mmllm.tools.chat_loop import tools_system_message

    questions = [c[1]["content"] for c in chats]
    assert len(set(questions)) == 60 and "What is 23 * 17?" not in questions
    assert chats == tool_call_chats(60, registry, seed=3, exclude=["What is 23 * 17?"])  # seeded
    tools = {c[2]["tool_calls"][0]["function"]["name"] for c in chats}
    assert "calculator" in tools and tools & {"weekday", "add_days", "days_between"}
    for c in chats:
        assert [m["role"] for m in c] == ["system", "user", "assistant", "tool", "assistant"]
        assert c[0] == tools_system_message(registry)  # what `mmllm chat --tools` shows the model
        fn = c[2]["tool_calls"][0]["function"]
        args = json.loads(fn["arguments"])
        if fn["name"] == "calculator":  # hand-check the arithmetic against Python's
            a, op, b = args["expression"].split()
            want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) // int(b)}[op]
            assert c[3]["content"] == str(want)
        assert c[3]["content"] in c[4]["content"]  # the answer quotes the result
    plain = plain_chat(chats[0])
    call = json.loads(plain[2]["content"].removeprefix("<tool_call>").removesuffix("</tool_call>"))
    assert call == {"name": chats[0][2]["tool_calls"][0]["function"]["name"],
                    "arguments": json.loads(chats[0][2]["tool_calls"][0]["function"]["arguments"])}


def test_the_tool_result_is_masked_exactly(chats):
    """The SFT rendering (ChatRenderer, as SFTDataModule renders rows) leaves exactly the tool
    result unsupervised among the turn's contents: un-masking it (ToolCallerModule's
    ``mask_tool_results=False``) changes the labels at exactly the result's positions."""
    from mmllm.data.chat import ChatRenderer
    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.modules.tool_caller import IGNORE, ToolCallerModule, tool_chat_row
    from mmllm.models import DecoderLM

    texts = [m["content"] for c in chats for m in plain_chat(c)]
    tok = train_bpe_tokenizer(texts, vocab_size=400, show_progress=False)
    renderer = ChatRenderer(tok)
    model = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=1024)
    unmasked = ToolCallerModule(model=model, mask_tool_results=False)
    for c in chats[:8]:
        plain = plain_chat(c)
        rendered = renderer(plain)
        labels = rendered.labels(IGNORE)
        row = tool_chat_row(c, renderer)
        assert row["input_ids"] == rendered.input_ids and row["labels"] == labels  # same rows either way
        result = next(s for s in rendered.spans if s.role == "tool" and s.part == "content")
        assert tok.decode(rendered.input_ids[result.start:result.end]) == c[3]["content"]
        assert not any(rendered.loss_mask[result.start:result.end])
        for k in (2, 4):  # the call and the answer are learned
            span = next(s for s in rendered.spans if s.message == k and s.part == "content")
            assert all(rendered.loss_mask[span.start:span.end])
        batch = {k: torch.tensor([v]) for k, v in row.items()}
        changed = (unmasked.effective_labels(batch)[0] != torch.tensor(labels)).nonzero().flatten().tolist()
        assert changed == list(range(result.start - 1, result.end - 1))  # labels[t] targets token t+1


class Scripted:
    """``generate_fn`` answering from a script; records the conversations it saw."""

    def __init__(self, *replies):
        self.replies, self.seen = list(replies), []

    def __call__(self, messages):
        self.seen.append(messages)
        return self.replies.pop(0)


def test_a_call_the_model_writes_runs_and_the_model_answers_after_it(registry):
    gen = Scripted('{"name": "calculator", "arguments": {"expression": "23 * 17"}}', "23 * 17 is 391.")
    transcript, rec = chat_turn(gen, registry, "What is 23 * 17?")
    assert rec["call_source"] == "model" and rec["tool"] == "calculator" and rec["ok"]
    assert rec["arguments"] == {"expression": "23 * 17"} and rec["result"] == "391"
    assert rec["answer"] == "23 * 17 is 391." and rec["answer_mentions_result"] and rec["rounds"] == 2
    assert [m["role"] for m in transcript] == ["user", "assistant", "tool", "assistant"]
    assert transcript[2]["content"] == "391"
    # The second reply saw the tools section, the call in the serve format and the real result.
    second = gen.seen[1]
    assert second[0]["role"] == "system" and "calculator" in second[0]["content"]
    assert second[2]["content"].startswith("<tool_call>") and second[3] == {"role": "tool", "content": "391"}


def test_no_call_is_recorded_as_none_with_the_text(registry):
    gen = Scripted("I think it is about 400.")
    transcript, rec = chat_turn(gen, registry, "What is 23 * 17?")
    assert rec["call_source"] == "none" and rec["tool"] is None and rec["result"] is None
    assert rec["text"] == rec["answer"] == "I think it is about 400." and not rec["answer_mentions_result"]
    assert [m["role"] for m in transcript] == ["user", "assistant"] and len(gen.seen) == 1
    # A call of a tool the registry lacks is no call either (it never runs).
    _, rec = chat_turn(Scripted('{"name": "rm_rf", "arguments": {"path": "/"}}'), registry, "hi")
    assert rec["call_source"] == "none"


def test_forced_call_and_a_failing_call(registry):
    gen = Scripted("It is 391.")
    transcript, rec = chat_turn(gen, registry, "What is 23 * 17?",
                                force_call={"name": "calculator", "arguments": {"expression": "23 * 17"}})
    assert rec["call_source"] == "forced" and rec["result"] == "391" and len(gen.seen) == 1
    gen = Scripted('<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>', "Oops.")
    _, rec = chat_turn(gen, registry, "What is 1/0?")
    assert rec["call_source"] == "model" and rec["ok"] is False and rec["result"].startswith("error:")
    assert rec["answer"] == "Oops."


def test_bfcl_finetune_data_is_valid_bfcl_and_shares_no_function_with_the_eval_set():
    """benchmarks/bfcl_finetune.py's training chats: every target passes the kit's BFCL checker
    against the offered docs, irrelevance rows make no call, and no function is a BFCL one."""
    import importlib.util
    from pathlib import Path

    from mmllm.tools import bfcl

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bfcl_finetune", root / "benchmarks" / "bfcl_finetune.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    eval_names = {f["name"] for ex in bfcl.load_bfcl(root / "tests" / "fixtures" / "bfcl") for f in ex.functions}
    rows, names = bench.training_chats(30, seed=0, exclude=eval_names | {"translate"})
    assert "translate" not in names and not set(names) & eval_names and "calculator" in names
    assert {r["category"] for r in rows} == set(bfcl.CATEGORIES)
    for r in rows:
        system, user, target = r["messages"]
        docs = json.loads(system["content"].split("\n")[1])
        assert {d["name"] for d in docs} <= set(names)
        calls = bfcl.decode_output(target["content"])
        if r["category"] == "irrelevance":
            assert calls == [] and not {d["name"] for d in docs} & set(user["content"].split())
            continue
        truth = [{n: {k: [v] for k, v in a.items()}} for n, a in calls]
        ex = bfcl.BFCLExample("t", r["category"], [user], docs, truth)
        assert bfcl.check_output(ex, target["content"]).valid, (target["content"], docs)
        assert (len(calls) > 1) == r["category"].startswith("parallel")
