"""Tool-calling chats to fine-tune on, and one chat turn in which the model makes its own call.

**Data.** :func:`tool_call_chats` writes arithmetic and calendar questions (varied templates,
seeded random operands) as OpenAI-style conversations in exactly the shape ``mmllm serve`` and
``mmllm chat --tools`` use: the registry's tools section as the system message
(:func:`mmllm.tools.chat_loop.tools_system_message`), the user's question, an assistant message
whose only content is the call (``tool_calls``, rendered as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` by
:func:`mmllm.serve.tools.render_call`), the ``tool`` message with the result the registry really
returned, and the assistant's answer quoting it. :func:`plain_chat` renders them to
``{"role", "content"}`` messages for :class:`mmllm.data.sft.SFTDataModule`, whose chat masks
supervise assistant turns only, so the tool result is never a training target (as
:class:`mmllm.modules.tool_caller.ToolCallerModule`'s default ``mask_tool_results``).

**The turn.** :func:`chat_turn` runs one user turn through
:func:`mmllm.tools.chat_loop.run_tool_turn` (the loop of ``mmllm chat --tools``) with any
``generate_fn(messages) -> text`` (:func:`lm_generate_fn` for a text LM; a VLM front end passes
its own) and says where the call came from: ``"model"`` (the model's first reply held a call of a
registry tool, which ran), ``"none"`` (it did not; its text is kept, nothing is faked) or
``"forced"`` (``force_call``: the caller wrote the first reply, the model only answers after the
result). :func:`first_call_scores` measures, over many questions at once, how often a model calls
on its own and with the right tool and arguments.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence

from mmllm.serve.tools import parse_calls
from mmllm.tools.chat_loop import registry_spec, run_tool_turn, tools_system_message
from mmllm.tools.registry import ToolRegistry

GenerateFn = Callable[[list[dict]], str]

# (question, call expression, answer) templates; {a} {b} are operands, {r} the tool's result.
_ARITH = {
    "+": (["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.", "What do {a} and {b} make together?",
           "A shop sold {a} apples in the morning and {b} in the afternoon. How many apples did it sell?"],
          "{a} + {b}"),
    "-": (["What is {a} - {b}?", "How much is {a} minus {b}?", "Subtract {b} from {a}.",
           "I had {a} dollars and spent {b}. How many dollars are left?"], "{a} - {b}"),
    "*": (["What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} x {b}.",
           "A box holds {b} pens. How many pens are in {a} boxes?"], "{a} * {b}"),
    "/": (["What is {a} / {b}?", "Divide {a} by {b}.", "How much is {a} divided by {b}?",
           "{a} cookies are shared equally by {b} children. How many does each child get?"], "{a} / {b}"),
}
_ANSWERS = ["The answer is {r}.", "{e} = {r}.", "It is {r}.", "That makes {r}.", "The result is {r}."]
_WEEKDAY = ["What day of the week was {d}?", "Which weekday is {d}?", "On what weekday does {d} fall?"]
_ADD = ["What date is {n} days after {d}?", "Which date comes {n} days after {d}?", "Add {n} days to {d}."]
_BETWEEN = ["How many days are there from {d} to {e}?", "How many days lie between {d} and {e}?",
            "Count the days from {d} until {e}."]


def _date(rng: random.Random) -> str:
    return (dt.date(1990, 1, 1) + dt.timedelta(days=rng.randrange(365 * 40))).isoformat()


def _arithmetic(rng: random.Random) -> tuple[str, str, dict, str]:
    op = rng.choice(list(_ARITH))
    a, b = rng.randint(2, 999), rng.randint(2, 99)
    if op == "/":
        a = b * rng.randint(2, 99)  # whole quotients read naturally in the answers
    questions, expr = _ARITH[op]
    e = expr.format(a=a, b=b)
    return rng.choice(questions).format(a=a, b=b), "calculator", {"expression": e}, \
        rng.choice(_ANSWERS).replace("{e}", e)


def _calendar(rng: random.Random) -> tuple[str, str, dict, str]:
    kind, d = rng.randrange(3), _date(rng)
    if kind == 0:
        return rng.choice(_WEEKDAY).format(d=d), "weekday", {"date": d}, f"{d} was a {{r}}."
    if kind == 1:
        n = rng.randint(2, 400)
        return rng.choice(_ADD).format(n=n, d=d), "add_days", {"date": d, "days": n}, \
            f"{n} days after {d} is {{r}}."
    e = _date(rng)
    d, e = min(d, e), max(d, e)
    return rng.choice(_BETWEEN).format(d=d, e=e), "days_between", {"start": d, "end": e}, \
        f"There are {{r}} days from {d} to {e}."


def tool_call_chats(n: int, registry: ToolRegistry, *, seed: int = 0, calendar_share: float = 0.3,
                    exclude: Iterable[str] = ()) -> list[list[dict]]:
    """``n`` distinct tool-calling conversations whose results come from ``registry``.

    Args:
        n: conversations.
        registry: executes every call (it must hold ``calculator``, and the calendar tools
            ``weekday``/``add_days``/``days_between`` when ``calendar_share`` > 0); its tools
            section is each conversation's system message.
        seed: operands and templates.
        calendar_share: share of date questions (the rest is arithmetic).
        exclude: user questions never to write (e.g. the evaluation question).

    Returns:
        OpenAI-style message lists: system, user, assistant ``tool_calls``, tool, assistant.

    Raises:
        RuntimeError: a call failed (the data would teach a wrong result), or fewer than ``n``
            distinct questions could be drawn.
    """
    rng, system = random.Random(seed), tools_system_message(registry)
    seen, out = {q.strip().casefold() for q in exclude}, []
    for _ in range(50 * n):
        if len(out) == n:
            break
        question, name, args, answer = (_calendar if rng.random() < calendar_share else _arithmetic)(rng)
        if question.casefold() in seen:
            continue
        seen.add(question.casefold())
        result = registry.call(name, args)
        if not result.ok:
            raise RuntimeError(f"{name}({args}) failed while writing training data: {result.content}")
        call_id = f"call_{len(out)}"
        out.append([system, {"role": "user", "content": question},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": call_id, "type": "function",
                         "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
                    result.message(call_id),
                    {"role": "assistant", "content": answer.replace("{r}", result.content)}])
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} distinct tool questions could be drawn, {n} requested")
    return out


def plain_chat(messages: Sequence[Mapping]) -> list[dict]:
    """``{"role", "content"}`` messages with assistant ``tool_calls`` rendered into the content
    exactly as ``mmllm serve`` renders them back to the model (the SFT rows' format)."""
    from mmllm.modules.tool_caller import to_chat

    return to_chat(messages)[0]


# ------------------------------------------------------------------------------ the turn
def lm_generate_fn(model, tokenizer, *, max_new_tokens: int = 48, answer_tokens: int | None = None) -> GenerateFn:
    """``fn(messages) -> text``: a greedy reply of a text LM to the rendered conversation.

    Args:
        model: a DecoderLM (anything :func:`mmllm.generation.generate_ids` runs).
        tokenizer: its tokenizer (chat template: the tokenizer's or the kit's ChatML).
        max_new_tokens: reply length, enough for a call (~40 tokens).
        answer_tokens: reply length after a ``tool`` message (default ``max_new_tokens``).
    """
    import torch

    from mmllm.data.chat import ChatRenderer
    from mmllm.data.special_tokens import SPECIAL_TOKENS
    from mmllm.generation import generate_ids

    renderer = ChatRenderer(tokenizer)
    end = tokenizer.get_vocab().get(SPECIAL_TOKENS.chat_end)
    eos = [i for i in (tokenizer.eos_token_id, end) if i is not None]

    def generate(messages: list[dict]) -> str:
        after_tool = bool(messages) and messages[-1]["role"] == "tool"
        with torch.no_grad():
            (ids,) = generate_ids(model.eval(), [renderer.prompt(messages)], eos_token_id=eos,
                                  max_new_tokens=(answer_tokens or max_new_tokens) if after_tool else max_new_tokens,
                                  pad_token_id=tokenizer.pad_token_id or 0)
        return tokenizer.decode(ids, skip_special_tokens=True).strip()
    return generate


def chat_turn(generate_fn: GenerateFn, registry: ToolRegistry, question: str, *,
              history: Sequence[Mapping] = (), force_call: Mapping | None = None,
              max_rounds: int = 2) -> tuple[list[dict], dict]:
    """One user turn with tools: the model's own call (if it makes one) runs, then it answers.

    Args:
        generate_fn: ``fn(messages) -> assistant text`` (plain ``{"role", "content"}`` messages,
            the tools section first).
        registry: the tools offered (the system message) and run.
        question: the user's message.
        history: earlier messages (after the tools section).
        force_call: ``{"name", "arguments"}``: written as the first reply instead of the model's
            (``call_source: "forced"``); None lets the model write it.
        max_rounds: model replies at most (a call, then the answer: 2).

    Returns:
        ``(transcript, record)``: the turn's plain messages from the user's on (calls in the
        ``<tool_call>`` format), and ``call_source`` ("model", "none", "forced"), ``tool``,
        ``arguments``, ``ok``, ``result``, ``answer``, ``answer_mentions_result`` (and ``text``:
        the first reply when no call was made).
    """
    messages = [tools_system_message(registry), *history, {"role": "user", "content": question}]
    first: list[str] = []

    def generate(msgs: list[dict]) -> str:
        if force_call is not None and not first:
            text = f"<tool_call>{json.dumps(dict(force_call), ensure_ascii=False)}</tool_call>"
        else:
            text = generate_fn(msgs)
        first.append(text)
        return text

    events: list[dict] = []
    raw = run_tool_turn(messages, generate, registry, events.append, max_rounds=max_rounds)
    calls = [e for e in events if e["type"] == "call"]
    results = [e for e in events if e["type"] == "result"]
    final = raw[-1] if raw and raw[-1]["role"] == "assistant" and not raw[-1].get("tool_calls") else None
    record: dict = {"call_source": "none", "tool": None, "arguments": None, "ok": None, "result": None}
    if calls:  # the first call of the turn and its result
        record |= {"call_source": "forced" if force_call is not None else "model", "tool": calls[0]["name"],
                   "arguments": calls[0]["arguments"], "ok": results[0]["ok"], "result": results[0]["content"]}
    else:
        record["text"] = first[0]
    record["answer"] = final["content"] if final is not None else None
    record["answer_mentions_result"] = bool(record["answer"] and record["result"]
                                            and record["result"].strip() in record["answer"])
    record["rounds"] = len(first)
    transcript = [messages[-1], *plain_chat(raw)]
    return transcript, record


def first_call_scores(model, tokenizer, registry: ToolRegistry, chats: Sequence[Sequence[Mapping]], *,
                      max_new_tokens: int = 48) -> dict:
    """How a model's first replies to held-out questions call tools (greedy, one batch).

    Args:
        chats: conversations of :func:`tool_call_chats` (their question and reference call).

    Returns:
        ``questions``, the shares ``called`` (a parseable call of a registry tool),
        ``right_tool`` and ``right_result`` (the call runs and returns the reference result),
        and up to 3 ``examples`` of the replies.
    """
    import torch

    from mmllm.data.chat import ChatRenderer
    from mmllm.data.special_tokens import SPECIAL_TOKENS
    from mmllm.generation import generate_ids

    renderer, spec = ChatRenderer(tokenizer), registry_spec(registry)
    end = tokenizer.get_vocab().get(SPECIAL_TOKENS.chat_end)
    prompts = [renderer.prompt(plain_chat(c[:2])) for c in chats]
    with torch.no_grad():
        new = generate_ids(model.eval(), prompts, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or 0,
                           eos_token_id=[i for i in (tokenizer.eos_token_id, end) if i is not None],
                           progress="tool-call eval")
    called = tool = right = 0
    examples = []
    for chat, ids in zip(chats, new):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        calls = parse_calls(text, spec)[1]
        ref = chat[2]["tool_calls"][0]["function"]
        if calls:
            called += 1
            tool += calls[0][0] == ref["name"]
            result = registry.call(*calls[0])
            right += result.ok and calls[0][0] == ref["name"] and result.content == chat[3]["content"]
        if len(examples) < 3:
            examples.append({"question": chat[1]["content"], "reply": text})
    n = max(len(chats), 1)
    return {"questions": len(chats), "called": round(called / n, 4), "right_tool": round(tool / n, 4),
            "right_result": round(right / n, 4), "examples": examples}
