"""Fine-tuning on tool-use conversations: assistant ``tool_calls`` and ``tool`` results.

A conversation is OpenAI-style: an assistant message may carry ``tool_calls`` (rendered into its
content as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, the format
``mmllm serve`` prompts for and parses) and ``tool`` messages hold results. :func:`tool_chat_row`
renders it with :class:`mmllm.data.chat.ChatRenderer` and tags every token: ``labels`` supervise
the assistant turns (calls included), ``tool_call_mask`` marks the call tokens and
``tool_result_mask`` the tool results. :class:`ToolCallerModule` applies its options to those tags
in the loss: ``mask_tool_results`` (default True: never learn to imitate tool output) and
``mask_tool_calls`` (default False: learning the calls is the point; True trains only the prose).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from mmllm.data.chat import ChatRenderer, check_rendered
from mmllm.modules.causal_lm import CausalLMModule
from mmllm.serve.tools import render_call

IGNORE = -100


def to_chat(messages: Sequence[Mapping]) -> tuple[list[dict], dict[int, int]]:
    """Plain ``{"role", "content"}`` messages, and for each assistant message with calls the
    character offset where its calls start in the content."""
    out, call_start = [], {}
    for k, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            text = m.get("content") or ""
            call_start[k] = len(text)
            m["content"] = text + "".join(render_call(c) for c in m.pop("tool_calls"))
        m.pop("tool_call_id", None)
        m.pop("name", None)
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out, call_start


def _tokens_from(renderer: ChatRenderer, content: str, span_ids: list[int], char: int) -> list[bool]:
    """Per token of ``content``: does it reach past character ``char`` (the call's start)?"""
    enc = renderer.tokenizer(content, add_special_tokens=False, split_special_tokens=True,
                             return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(span_ids):
        raise ValueError("the content tokens differ from the rendered ones; cannot locate the tool call")
    return [end > char for _, end in enc["offset_mapping"]]


def tool_chat_row(messages: Sequence[Mapping], renderer: ChatRenderer) -> dict[str, list]:
    """One conversation as ``input_ids``, ``labels`` (kit convention: ``labels[t]`` targets token
    t+1), ``tool_call_mask`` and ``tool_result_mask`` (per input token)."""
    chat, call_start = to_chat(messages)
    rendered = renderer(chat)
    check_rendered(rendered, chat)
    n = len(rendered.input_ids)
    calls, results = [False] * n, [False] * n
    for span in rendered.spans:
        if span.part != "content":
            continue
        if span.role == "tool":
            results[span.start:span.end] = [True] * (span.end - span.start)
        elif span.message in call_start:
            ids = rendered.input_ids[span.start:span.end]
            calls[span.start:span.end] = _tokens_from(renderer, chat[span.message]["content"], ids,
                                                      call_start[span.message])
    return {"input_ids": rendered.input_ids, "labels": rendered.labels(IGNORE),
            "tool_call_mask": calls, "tool_result_mask": results}


class ToolChatDataset(Dataset):
    """Tool-use conversations rendered once (rows longer than ``max_len`` are cut and counted).

    Args:
        conversations: lists of OpenAI-style messages.
        tokenizer: the model's tokenizer (its chat template, or the kit's ChatML).
        max_len: tokens per row at most.
    """

    def __init__(self, conversations: Sequence[Sequence[Mapping]], tokenizer, *, max_len: int = 2048) -> None:
        renderer = ChatRenderer(tokenizer)
        self.rows = [tool_chat_row(c, renderer) for c in conversations]
        self.truncated = sum(len(r["input_ids"]) > max_len for r in self.rows)
        self.rows = [{k: v[:max_len] for k, v in r.items()} for r in self.rows]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list]:
        return self.rows[i]

    def collate(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Right-pads a batch (pad positions: ignored labels, attention_mask 0)."""
        T = max(len(r["input_ids"]) for r in rows)
        pad = {"input_ids": self.pad_id, "labels": IGNORE, "tool_call_mask": False, "tool_result_mask": False}
        batch = {k: torch.tensor([list(r[k]) + [v] * (T - len(r[k])) for r in rows]) for k, v in pad.items()}
        batch["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (T - len(r["input_ids"]))
                                                for r in rows])
        return batch


class ToolCallerModule(CausalLMModule):
    """A :class:`CausalLMModule` whose loss honours the tool masks of :func:`tool_chat_row` batches.

    Args:
        mask_tool_results: no loss on tool results (default True).
        mask_tool_calls: no loss on the assistant's call tokens (default False).
        **kwargs: :class:`CausalLMModule` arguments.
    """

    def __init__(self, *, mask_tool_results: bool = True, mask_tool_calls: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_tool_results, self.mask_tool_calls = mask_tool_results, mask_tool_calls

    def effective_labels(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's (B, T) labels with the options applied (a token t+1 is the target of t)."""
        labels = batch["labels"].clone()
        ids = batch["input_ids"]
        if not self.mask_tool_results and "tool_result_mask" in batch:
            on = batch["tool_result_mask"][:, 1:]
            labels[:, :-1] = torch.where(on, ids[:, 1:], labels[:, :-1])
        if self.mask_tool_calls and "tool_call_mask" in batch:
            labels[:, :-1] = labels[:, :-1].masked_fill(batch["tool_call_mask"][:, 1:], IGNORE)
        return labels

    def forward_loss(self, batch: dict[str, torch.Tensor]):
        batch = dict(batch) | {"labels": self.effective_labels(batch)}
        batch = {k: v for k, v in batch.items() if k not in ("tool_call_mask", "tool_result_mask")}
        return super().forward_loss(batch)
