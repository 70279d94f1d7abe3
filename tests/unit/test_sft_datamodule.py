"""SFTDataModule: row formats, bad rows with file:line, stats, packed batches, inspect-batch, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmllm.config import compose_config
from mmllm.data.chat import MaskError
from mmllm.data.inspect import format_batch, inspect_batches
from mmllm.data.sft import BadRowError, SFTDataModule, to_messages
from mmllm.losses import IGNORE_INDEX

FIX = Path(__file__).resolve().parents[1] / "eval" / "fixtures"
CHATS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Two plus two?"},
                  {"role": "assistant", "content": "Four."},
                  {"role": "user", "content": "And three plus three?"},
                  {"role": "assistant", "content": "Six."}]},
    {"conversations": [{"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Blue."}]},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
]


def _write(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _dm(tmp_path: Path, path: Path, prepare: bool = True, **kw) -> SFTDataModule:
    kw = {"seq_len": 160, "batch_size": 4, "vocab_size": 320, **kw}
    dm = SFTDataModule(sources=[{"name": "chat", "path": str(path)}], cache_dir=str(tmp_path / "cache"), **kw)
    if prepare:
        dm.prepare_data()
    return dm


def _supervised_texts(batch, tok) -> list[str]:
    """Decoded supervised targets of every document, in row order."""
    out = []
    ids, labels = batch["input_ids"], batch["labels"]
    docs = batch.get("doc_ids", torch.zeros_like(ids))
    for b in range(ids.shape[0]):
        for d in docs[b].unique().tolist():
            lab = labels[b][docs[b] == d]
            targets = lab[lab != IGNORE_INDEX].tolist()
            if targets:
                out.append(tok.decode(targets))
    return out


def test_row_formats_become_messages():
    assert to_messages(CHATS[2]) == [{"role": "user", "content": "Name a colour."},
                                     {"role": "assistant", "content": "Blue."}]
    assert to_messages(CHATS[3], system_prompt="Sys") == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"}]


@pytest.mark.parametrize("tokenizer,packing", [(None, True), (None, False), ("smollm2", True)],
                         ids=["kit-packed", "kit-padded", "smollm2-packed"])
def test_batches_supervise_exactly_the_assistant_turns(tmp_path, tokenizer, packing):
    dm = _dm(tmp_path, _write(tmp_path / "chat.jsonl", CHATS), packing=packing, tokenizer=tokenizer)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    keys = {"input_ids", "labels", "doc_ids", "position_ids"} if packing else {"input_ids", "labels"}
    assert all(set(b) == keys for b in batches)
    got = sorted(t for b in batches for t in _supervised_texts(b, dm.tokenizer))
    want = sorted(["Paris.<|im_end|>", "Four.<|im_end|>Six.<|im_end|>", "Blue.<|im_end|>",
                   "Bonjour<|im_end|>"])
    assert got == want
    if packing:
        assert sum(b["input_ids"].shape[0] for b in batches) < len(CHATS)  # rows were shared
    if tokenizer == "smollm2":  # its own template: a default system prompt, never supervised
        assert "You are a helpful AI assistant named SmolLM" in dm.tokenizer.decode(batches[0]["input_ids"][0])
    stats = dm.summary()["sources"]["chat"]
    assert stats["rows"] == 4 and 0 < stats["supervised_fraction"] < 0.5


def test_bad_rows_name_file_and_line_or_are_counted(tmp_path):
    path = _write(tmp_path / "chat.jsonl", CHATS[:2] + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "assistant"}]},
        {"prompt": "no known format"},
    ], extra_lines=("{not json",))
    dm = _dm(tmp_path, path, prepare=False)
    with pytest.raises(BadRowError, match=r"chat.jsonl:3: message 1: empty assistant turn"):
        dm.prepare_data()  # rank 0 renders once: a bad row stops the run before training starts
    dm = _dm(tmp_path, path, on_bad_row="skip")
    dm.setup("fit")
    stats = dm.stats["chat"]
    assert stats.rows == 2 and stats.skipped == {"malformed": 3, "bad_json": 1}
    assert any(e.startswith(f"{path}:6: bad JSON") for e in stats.examples)
    assert any(e.startswith(f"{path}:5: unknown row format") for e in stats.examples)


def test_unexpected_supervised_fraction_stops_the_run(tmp_path):
    path = _write(tmp_path / "chat.jsonl", CHATS)
    dm = SFTDataModule(sources=[{"name": "chat", "path": str(path), "supervised_fraction": [0.6, 1.0]}],
                       cache_dir=str(tmp_path / "cache"), seq_len=64, batch_size=2, vocab_size=320)
    with pytest.raises(MaskError, match="source 'chat': supervised fraction"):
        dm.prepare_data()


def test_rendered_rows_are_cached_and_invalidated(tmp_path, monkeypatch):
    path = _write(tmp_path / "chat.jsonl", CHATS)
    first = _dm(tmp_path, path)
    first.setup("fit")
    again = _dm(tmp_path, path, prepare=False)
    monkeypatch.setattr(again, "render_sources", lambda: pytest.fail("rendered twice"))
    again.prepare_data()
    again.setup("fit")
    assert again.summary() == first.summary()
    for a, b in zip(first.train_dataloader(), again.train_dataloader()):
        assert set(a) == set(b)
    _write(path, CHATS[:3])  # the data changed: a new fingerprint, rendered again
    changed = _dm(tmp_path, path)
    changed.setup("fit")
    assert changed.stats["chat"].rows == 3


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path):
    long = {"messages": [{"role": "user", "content": "Tell me."},
                         {"role": "assistant", "content": "word " * 200}]}
    path = _write(tmp_path / "chat.jsonl", CHATS + [long])
    dm = _dm(tmp_path, path, seq_len=120, overlong="drop")
    dm.setup("fit")
    assert dm.packing_stats["train"].dropped == {"overlong": 1}
    dm = _dm(tmp_path, path, seq_len=120, overlong="truncate")
    dm.setup("fit")
    assert dm.packing_stats["train"].truncated == 1
    assert max(b["input_ids"].shape[1] for b in dm.train_dataloader()) <= 120


def test_format_batch_marks_supervised_tokens(tmp_path):
    dm = _dm(tmp_path, _write(tmp_path / "chat.jsonl", CHATS[:2]), seq_len=256)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    text = format_batch(batch, dm.tokenizer, color=False)
    assert "[[Paris.<|im_end|>]]" in text and "[[Four.<|im_end|>]]" in text
    assert "<|im_start|>assistant\n[[" in text  # the header is not marked
    assert "--- document 1" in text and "!!" not in text
    colored = format_batch(batch, dm.tokenizer, color=True)
    assert "\033[42;30mParis.<|im_end|>\033[0m" in colored
    corrupt = {k: v.clone() for k, v in batch.items()}
    t = int((corrupt["labels"][0] != IGNORE_INDEX).nonzero()[0])
    corrupt["labels"][0, t] = (corrupt["labels"][0, t] + 1) % 300
    assert "!!" in format_batch(corrupt, dm.tokenizer, color=False)


@pytest.fixture
def flan_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLLM_EVAL_DATA", str(FIX))
    return compose_config("train", ["data=sft_flan", "debug=tiny", "data.seq_len=256",
                                    "data.vocab_size=512", "trainer.max_steps=8",
                                    "trainer.val_check_interval=4", "trainer.enable_progress_bar=false",
                                    "logger=csv"],
                          output_dir=tmp_path / "run", data_dir=tmp_path / "data")


def test_inspect_batch_on_the_flan_config(flan_cfg):
    text = inspect_batches(flan_cfg, batches=1, max_rows=2, color=False)
    assert text.count("=== row") == 2 and "[[" in text
    stats = json.loads(text.split("##### data statistics\n")[1])
    assert set(stats["sources"]) == {"capitals", "arc_easy", "boolq", "triviaqa", "gsm8k_cot", "gsm8k"}
    assert all(0 < s["supervised_fraction"] < 1 for s in stats["sources"].values())


@pytest.mark.slow
def test_inspect_batch_command_prints_the_marked_batch(tmp_path):
    import subprocess
    import sys

    path = _write(tmp_path / "chat.jsonl", CHATS)
    out = subprocess.run(
        [sys.executable, "-m", "mmllm", "inspect-batch", "data=sft", f"data.sources=[{{name: c, path: '{path}'}}]",
         f"paths.data_dir={tmp_path / 'data'}", "data.vocab_size=320", "data.seq_len=256",
         "+inspect.rows=1"], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "=== row 0" in out.stdout and "=== row 1" not in out.stdout and "[[" in out.stdout
    assert '"supervised_fraction"' in out.stdout
    assert not (tmp_path / "outputs").exists()  # no run directory for an inspection


@pytest.mark.slow
def test_causal_lm_module_trains_on_flan_sft_batches(flan_cfg):
    """The FLAN config end to end through mmllm.train: CausalLMModule learns from packed batches."""
    import csv

    from mmllm.train import train

    metrics = train(flan_cfg)
    assert metrics["train/tokens_seen"] > 0
    with open(Path(flan_cfg.paths.output_dir) / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[1] < val[0]  # held-out supervised loss goes down
    logged = [float(r["data/gsm8k_cot/supervised_fraction"]) for r in rows
              if r.get("data/gsm8k_cot/supervised_fraction")]
    assert len(logged) == 1 and 0 < logged[0] < 1  # the data statistics reach the loggers
