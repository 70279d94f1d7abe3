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

import random
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

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
        """Right-pads a batch (pad labels ignored; causal attention never lets a token see the
        padding after it, so no mask is needed, as in :func:`mmllm.data.packing.collate_padded`)."""
        T = max(len(r["input_ids"]) for r in rows)
        pad = {"input_ids": self.pad_id, "labels": IGNORE, "tool_call_mask": False, "tool_result_mask": False}
        return {k: torch.tensor([list(r[k]) + [v] * (T - len(r[k])) for r in rows]) for k, v in pad.items()}


class ToolChatDataModule(L.LightningDataModule):
    """Tool-use conversations from JSONL files (``{"messages": [...]}`` rows) for ``mmllm train``.

    Args:
        path: a file, glob or list of them.
        tokenizer: the tokenizer (a directory, file or hub id; :func:`mmllm.data.tokenizer.load_tokenizer`).
        seq_len: tokens per row at most (longer conversations are cut and counted).
        batch_size: rows per batch.
        val_fraction: share of conversations held out for validation.
        seed: the split's seed.
    """

    def __init__(self, *, path: str | Sequence[str], tokenizer: str, seq_len: int = 2048, batch_size: int = 8,
                 val_fraction: float = 0.0, num_workers: int = 0, seed: int = 1234) -> None:
        super().__init__()
        if not 0.0 <= val_fraction < 1.0 or seq_len < 2 or batch_size < 1:
            raise ValueError("need 0 <= val_fraction < 1, seq_len >= 2 and batch_size >= 1")
        self.path, self.tokenizer_dir, self.seq_len, self.batch_size = path, tokenizer, seq_len, batch_size
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.tokenizer = self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        from mmllm.data.conversations import BadRowError, read_rows
        from mmllm.data.tokenizer import load_tokenizer

        if self.train_set is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        conversations = []
        for where, row in read_rows(self.path):
            if isinstance(row, BadRowError):
                raise row
            if not isinstance(row, Mapping) or not isinstance(row.get("messages"), list):
                raise BadRowError(f"{where}: a row needs a 'messages' list")
            conversations.append(row["messages"])
        random.Random(self.seed).shuffle(conversations)
        n_val = int(len(conversations) * self.val_fraction)
        self.val_set = ToolChatDataset(conversations[:n_val], self.tokenizer, max_len=self.seq_len) if n_val else None
        self.train_set = ToolChatDataset(conversations[n_val:], self.tokenizer, max_len=self.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, collate_fn=self.train_set.collate,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=self.val_set.collate,
                          num_workers=self.num_workers)


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
