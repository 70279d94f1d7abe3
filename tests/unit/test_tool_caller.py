"""ToolCallerModule: the tool-call / tool-result masks, checked by decoding the supervised tokens."""

from __future__ import annotations

import json

import pytest
import torch

from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.models import DecoderLM
from mmllm.modules.tool_caller import IGNORE, ToolCallerModule, ToolChatDataset

CALL = {"id": "call_1", "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": "2+3"})}}
CONV = [{"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "assistant", "content": "The answer is 5."}]
CALL_TEXT = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'


@pytest.fixture(scope="module")
def data():
    tok = train_bpe_tokenizer(["What is 2+3? Let me compute. The answer is 5. calculator expression " * 30],
                              vocab_size=320, show_progress=False)
    return tok, ToolChatDataset([CONV, CONV[:2]], tok)


def _module(tok, **opts):
    model = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_seq_len=256)
    return ToolCallerModule(model=model, **opts)


@pytest.mark.parametrize(("opts", "expected"), [
    ({}, f"Let me compute.{CALL_TEXT}<|im_end|>The answer is 5.<|im_end|>"),
    ({"mask_tool_calls": True}, "Let me compute.<|im_end|>The answer is 5.<|im_end|>"),
    ({"mask_tool_results": False}, f"Let me compute.{CALL_TEXT}<|im_end|>5The answer is 5.<|im_end|>"),
])
def test_supervised_tokens_decode_to_exactly_the_expected_text(data, opts, expected):
    tok, ds = data
    batch = ds.collate([ds[0]])
    labels = _module(tok, **opts).effective_labels(batch)[0]
    ids = batch["input_ids"][0]
    targets = [int(ids[t + 1]) for t in range(len(ids) - 1) if labels[t] != IGNORE]
    assert tok.decode(targets) == expected
    assert all(int(labels[t]) == int(ids[t + 1]) for t in range(len(ids) - 1) if labels[t] != IGNORE)


def test_collate_pads_and_loss_counts_supervised_tokens(data):
    tok, ds = data
    batch = ds.collate([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["tool_call_mask"].shape
    assert len(ds[1]["input_ids"]) < batch["input_ids"].shape[1]
    assert (batch["labels"][1, len(ds[1]["input_ids"]):] == IGNORE).all()
    module = _module(tok, mask_tool_calls=True)
    module.model.init_weights()
    loss, _, n = module.forward_loss(batch)
    assert torch.isfinite(loss) and int(n) == int((module.effective_labels(batch) != IGNORE).sum())


def test_datamodule_reads_jsonl_and_trains(tmp_path, data):
    from mmllm.modules.tool_caller import ToolChatDataModule

    tok, _ = data
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps({"messages": CONV}) for _ in range(4)) + "\n")
    dm = ToolChatDataModule(path=str(tmp_path / "*.jsonl"), tokenizer=str(tmp_path / "tok"), seq_len=256,
                            batch_size=2, val_fraction=0.25)
    dm.setup("fit")
    assert len(dm.train_set) == 3 and len(dm.val_set) == 1
    batch = next(iter(dm.train_dataloader()))
    module = _module(tok)
    module.model.init_weights()
    opt = torch.optim.Adam(module.model.parameters(), lr=1e-2)
    losses = []
    for _ in range(10):
        loss, _, _ = module.forward_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
