"""``mmllm chat``: streamed replies equal direct generation, REPL commands, images for VLMs,
and the CLI over a tiny checkpoint with a scripted stdin."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from test_serve_images import FakeVLM, M  # the tiny fake VLM of the serving tests

from mmllm.chat import ChatSession, repl, run, translate_argv
from mmllm.config import compose_config
from mmllm.data.chat import render_prompt
from mmllm.data.special_tokens import SPECIAL_TOKENS
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.errors import UserError
from mmllm.generation import generate_ids
from mmllm.models.decoder_lm import DecoderLM
from mmllm.serve.images import IMG_END, IMG_FEATURE, IMG_START

TEXT = ("Hello there, how can I help you today? The cat sat on the mat. What is in this picture? "
        "A red square.") * 30


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer([TEXT], vocab_size=400, show_progress=False,
                               special_tokens=SPECIAL_TOKENS.tokens() + [IMG_START, IMG_FEATURE, IMG_END])


@pytest.fixture(scope="module")
def lm(tok):
    torch.manual_seed(0)
    return DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=64,
                     max_seq_len=256).eval()


def test_streamed_turns_equal_direct_generation(lm, tok):
    chat = ChatSession(lm, tok, temperature=0.0, max_new_tokens=12, max_seq_len=256)
    stops = chat.stop_ids
    history = []
    for text in ("Hello there", "What is in this picture?"):
        chunks: list[str] = []
        answer = chat.reply(text, on_text=chunks.append)
        history.append({"role": "user", "content": text})
        ids = generate_ids(lm, [render_prompt(history, tok)], max_new_tokens=12, eos_token_id=stops)[0]
        want = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "".join(chunks) == want and answer == want.strip()
        history.append({"role": "assistant", "content": answer})
    assert chat.messages == history  # the second turn saw the first


def test_repl_commands_with_scripted_stdin(lm, tok):
    chat = ChatSession(lm, tok, temperature=0.0, max_new_tokens=4, system="Be brief.")
    out = io.StringIO()
    repl(chat, io.StringIO("Hello there\n\n/help\n/image /nonexistent.png\n/reset\nHi\n/exit\nnever read\n"), out)
    text = out.getvalue()
    assert text.count("assistant> ") == 2 and "(conversation cleared)" in text
    assert "commands:" in text and "error: this model does not take images" in text
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[1]["content"] == "Hi"


def test_images_go_to_a_vlm_and_are_refused_by_a_text_model(lm, tok, tmp_path):
    Image.new("RGB", (12, 12), "red").save(tmp_path / "red.png")
    with pytest.raises(UserError, match="does not take images"):
        ChatSession(lm, tok).attach_image(str(tmp_path / "red.png"))
    vlm = FakeVLM(lm, tok.convert_tokens_to_ids(IMG_FEATURE)).eval()
    chat = ChatSession(vlm, tok, temperature=0.0, max_new_tokens=4)
    chat.attach_image(str(tmp_path / "red.png"))
    chat.reply("What is in this picture?")
    assert vlm.calls[-1] == (M, 1) and chat.messages[0]["content"].startswith("<image>\n")
    chat.reply("And now?")  # the image stays in the conversation
    assert vlm.calls[-1] == (M, 1)


def test_translate_argv():
    assert translate_argv(["checkpoint=x", "--image", "a b.png", "--image=c.png"]) == \
        ["checkpoint=x", "image=a b.png", "image=c.png"]


@pytest.mark.slow
def test_cli_chat_over_a_checkpoint(lm, tok, tmp_path):
    tok.save_pretrained(tmp_path / "tokenizer")
    config = {"vocab_size": len(tok), "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2,
              "hidden_dim": 64, "max_seq_len": 256}
    torch.save({"state_dict": {f"model.{k}": v for k, v in lm.state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": config,
                          "tokenizer": str(tmp_path / "tokenizer")}}, tmp_path / "last.ckpt")
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    cfg = compose_config("chat", [f"checkpoint={tmp_path / 'last.ckpt'}", "temperature=0",
                                  *translate_argv(["--image", str(tmp_path / "x.png")])])
    with pytest.raises(UserError, match="does not take images"):
        run(cfg, io.StringIO("Hello there\n"), io.StringIO())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mmllm", "chat", f"checkpoint={tmp_path / 'last.ckpt'}",
                           "temperature=0", "max_new_tokens=4"],
                          input="Hello there\n/exit\n", capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "mmllm chat:" in proc.stdout and proc.stdout.count("assistant> ") == 1


def test_tools_turn_runs_the_call_and_shows_it(lm, tok, monkeypatch):
    """`mmllm chat --tools`: a call the model writes is executed as it happens, shown, and its
    result goes back to the model, which then answers (the model's replies are scripted)."""
    from mmllm.tools.builtin import default_registry
    from mmllm.tools.chat_loop import print_event

    replies = iter(['<tool_call>{"name": "calculator", "arguments": {"expression": "12*7"}}</tool_call>',
                    "12 times 7 is 84."])
    seen: list[list[dict]] = []

    def scripted(self, on_text, record=True):
        seen.append([dict(m) for m in self.messages])
        return next(replies)

    monkeypatch.setattr(ChatSession, "_reply", scripted)
    shown: list[str] = []
    chat = ChatSession(lm, tok, tools=default_registry(), on_event=lambda e: print_event(e, shown.append))
    assert chat.messages[0]["role"] == "system" and "calculator" in chat.messages[0]["content"]
    assert chat.reply("What is 12*7?") == "12 times 7 is 84."
    assert shown[0].startswith("[tool call] calculator") and shown[1].startswith("[tool result] 84")
    assert "84" in seen[1][-1]["content"]  # the model's second reply saw the tool result
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert translate_argv(["checkpoint=x", "--tools"]) == ["checkpoint=x", "use_tools=true"]
