"""A chat turn with an image and a tool call: the chat loop over a tiny random VisionLanguageModel,
the pipeline's final ``chat`` stage on fakes of the vlm_stage2 / tools outputs, and
``mmllm chat --image X --tools`` through the CLI with a scripted stdin."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mmllm.data.special_tokens import SPECIAL_TOKENS
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import IMG_FEATURE, add_vlm_tokens
from mmllm.errors import UserError
from mmllm.models import DecoderLM
from mmllm.models.vlm import build_vlm
from mmllm.nn.connectors import MLPConnector
from mmllm.nn.vision import TINY_VIT, VisionEncoder
from mmllm.serve.images import encode_prompt, image_span_ids, preprocess
from mmllm.stages import Marker, StageContext
from mmllm.stages.chat import FinalChatStage
from mmllm.tools.builtin import default_registry
from mmllm.tools.chat_loop import ModelReplier, run_tool_turn, tools_system_message, user_message

TEXT = ("What is 23 * 17? The answer is 391. Here is a picture of coins on a table. Hello there, "
        "how can I help you today? calculator expression arguments name") * 20
CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "23 * 17"}}</tool_call>'
# max_seq_len: the tools' schemas run to ~1.5k tokens with a 400-token BPE.
LM = {"dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64, "max_seq_len": 2048}


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """(LM tokenizer, VLM tokenizer = the LM's + the image tokens), both saved."""
    d = tmp_path_factory.mktemp("tok")
    base = train_bpe_tokenizer([TEXT], vocab_size=400, show_progress=False, special_tokens=SPECIAL_TOKENS.tokens())
    base.save_pretrained(str(d / "lm"))
    from transformers import AutoTokenizer

    vlm_tok = AutoTokenizer.from_pretrained(str(d / "lm"))
    add_vlm_tokens(vlm_tok)
    vlm_tok.save_pretrained(str(d / "vlm"))
    return base, vlm_tok, d


@pytest.fixture(scope="module")
def vlm(toks):
    _, vlm_tok, _ = toks
    torch.manual_seed(0)
    encoder = VisionEncoder(model_cfg=TINY_VIT, feature_layer=-2, keep_cls=False)
    lm = DecoderLM(vocab_size=len(toks[0]), **LM)
    return build_vlm(connector=MLPConnector(in_dim=encoder.width, out_dim=LM["dim"]),
                     image_token_id=vlm_tok.convert_tokens_to_ids(IMG_FEATURE), vocab_size=len(vlm_tok),
                     lm=lm, vision=encoder).eval()


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (40, 30), (200, 160, 40))


class Scripted(ModelReplier):
    """The real prompt construction (image embeddings in place) with scripted replies."""

    def __init__(self, *args, replies, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replies, self.prompts, self.seen = list(replies), [], []

    def __call__(self, messages, on_text=lambda s: None) -> str:
        self.seen.append([dict(m) for m in messages])
        self.prompts.append(self.prompt(messages))
        return self.replies.pop(0)


def test_replier_decodes_like_the_vlm_and_refuses_images_for_a_text_model(vlm, toks, image):
    _, tok, _ = toks
    messages = [user_message("What is in this picture?", n_images=1)]
    replier = ModelReplier(vlm, tok, images=[image], max_new_tokens=8)
    got = replier(messages)
    ids = encode_prompt(replier.renderer, messages, 1, image_span_ids(tok, vlm.num_image_tokens))
    (want,) = vlm.generate([ids], [preprocess(vlm, [image])], max_new_tokens=8, eos_token_id=replier.stop_ids,
                           pad_token_id=tok.pad_token_id or 0)
    assert got == tok.decode(want, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
    with pytest.raises(ValueError, match="1 <image> placeholders but 0 images"):
        ModelReplier(vlm, tok)(messages)
    with pytest.raises(UserError, match="does not take images") as err:
        ModelReplier(vlm.decoder, tok, images=[image])
    assert "checkpoint=" in err.value.fix


def test_tool_turn_with_an_image_executes_the_call_and_keeps_the_image(vlm, toks, image):
    _, tok, _ = toks
    registry = default_registry()
    # The first reply makes two calls: max_calls=1 runs the first and refuses the second.
    replier = Scripted(vlm, tok, images=[image], replies=[CALL + CALL.replace("23 * 17", "2 + 2"),
                                                           "23 * 17 = 391."])
    events = []
    messages = [tools_system_message(registry), user_message("What is 23 * 17?", n_images=1)]
    added = run_tool_turn(messages, replier, registry, events.append, max_calls=1)
    assert [m["role"] for m in added] == ["assistant", "tool", "tool", "assistant"]
    assert added[1]["content"] == "391" and added[2]["content"].startswith("error: not run")
    assert [e["type"] for e in events] == ["call", "result", "call", "limit", "result", "answer"]
    # The reply after the results saw them, the call rendered back, and the image again.
    second = replier.seen[1]
    assert second[2]["content"].startswith("<tool_call>") and second[3] == {"role": "tool", "content": "391"}
    features = vlm.image_embeddings(images=preprocess(vlm, [image]))[0]  # (M, D)
    for prompt in replier.prompts:
        (embeds,) = prompt["inputs_embeds"]
        ids = encode_prompt(replier.renderer, second if prompt is replier.prompts[1] else replier.seen[0], 1,
                            image_span_ids(tok, vlm.num_image_tokens))
        slots = torch.tensor(ids) == vlm.image_token_id
        torch.testing.assert_close(embeds[slots], features)
    assert len(replier.prompts[1]["inputs_embeds"][0]) > len(replier.prompts[0]["inputs_embeds"][0])
    registry.close()


# ------------------------------------------------------------------------------ the stage
def _marker(name: str, outputs: dict) -> Marker:
    return Marker(stage=name, target="test", fingerprint="f", run_id=name, started_at="0", finished_at="1",
                  seconds=0.0, outputs={k: str(v) for k, v in outputs.items()}, record={}, config_updates={},
                  config={})


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory, vlm, toks):
    """A run directory with fakes of vlm_stage1 (tokenizer), vlm_stage2 (vlm.pt, connector) and
    tools (a kit checkpoint of an LM with other weights than the VLM's decoder)."""
    base, _, tok_dir = toks
    run = tmp_path_factory.mktemp("run")
    s2 = run / "stages" / "vlm_stage2"
    s2.mkdir(parents=True)
    torch.save({"model_config": vlm.config, "state_dict": vlm.state_dict()}, s2 / "vlm.pt")
    vlm.connector.save(s2 / "connector.safetensors")
    torch.manual_seed(1)
    tools_lm = DecoderLM(vocab_size=len(base), **LM)
    ckpt = run / "stages" / "tools" / "gorilla.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": tools_lm.config,
                          "tokenizer": str(tok_dir / "lm")},
                "state_dict": {f"model.{k}": v for k, v in tools_lm.state_dict().items()}}, ckpt)
    markers = {"vlm_stage1": _marker("vlm_stage1", {"tokenizer": tok_dir / "vlm"}),
               "vlm_stage2": _marker("vlm_stage2", {"checkpoint": s2 / "vlm.pt",
                                                    "connector": s2 / "connector.safetensors"}),
               "tools": _marker("tools", {"checkpoint": ckpt}),
               "tokenize": _marker("tokenize", {"tokenizer": tok_dir / "lm"})}
    return run, markers, tools_lm


def _run_stage(run, markers, **options) -> tuple[FinalChatStage, StageContext]:
    stage = FinalChatStage(max_new_tokens=6, **options)
    stage.name = "chat"
    ctx = StageContext(name="chat", run_dir=run, cfg=OmegaConf.create({"seed": 0}), markers=dict(markers))
    stage.run(ctx)
    return stage, ctx


@pytest.fixture(scope="module")
def unscripted(stage_run):
    """The stage run as it is: the random model writes no call (recorded as such)."""
    run, markers, _ = stage_run
    return _run_stage(run, markers)


def test_final_chat_stage_swaps_the_lm_and_records_the_turn(stage_run, unscripted, vlm, toks, monkeypatch):
    from mmllm.checkpoint import load_model

    run, markers, tools_lm = stage_run
    stage, ctx = unscripted
    rec = ctx.record["chat"]
    assert rec["call_source"] == "none" and rec["calls"] == [] and rec["tool"] is None
    assert rec["answer"] == ctx.record["transcript"][-1]["content"]
    assert [m["role"] for m in ctx.record["transcript"]] == ["system", "user", "assistant"]
    assert ctx.record["transcript"][1]["content"] == "<image>\nWhat is 23 * 17?"
    assert all(p.exists() for p in stage.outputs(ctx).values())
    assert Image.open(rec["image"]).size == (384, 303)  # skimage.data.coins, saved for the report
    # The checkpoint: the tools LM's weights, the VLM's connector, encoder and image-token rows.
    model, tok = load_model(stage.outputs(ctx)["checkpoint"])
    image_rows = rec["model"]["kept_rows"]
    assert len(image_rows) == 3 and min(image_rows) >= len(toks[0]) and tok.get_vocab() == toks[1].get_vocab()
    emb, want = model.decoder.embed_tokens.weight, tools_lm.embed_tokens.weight
    torch.testing.assert_close(emb[:len(toks[0])], want)
    torch.testing.assert_close(emb[image_rows], vlm.decoder.embed_tokens.weight[image_rows])
    torch.testing.assert_close(model.decoder.layers[0].attn.q_proj.weight, tools_lm.layers[0].attn.q_proj.weight)
    for a, b in zip(model.connector.state_dict().values(), vlm.connector.state_dict().values()):
        torch.testing.assert_close(a, b)

    # A model that calls the calculator: executed, fed back, the answer after it recorded.
    replies = iter([CALL, "23 * 17 is 391."])
    seen = []

    def scripted(self, messages, on_text=lambda s: None):
        seen.append(self.prompt(messages))  # the real prompt: the image in place every time
        return next(replies)

    monkeypatch.setattr(ModelReplier, "__call__", scripted)
    _, ctx = _run_stage(run, markers)
    rec = ctx.record["chat"]
    assert rec["call_source"] == "model" and rec["tool"] == "calculator" and rec["result"] == "391"
    assert rec["arguments"] == {"expression": "23 * 17"} and rec["answer"] == "23 * 17 is 391."
    assert rec["answer_mentions_result"] is True and rec["rounds"] == 2
    assert [m["role"] for m in ctx.record["transcript"]] == ["system", "user", "assistant", "tool", "assistant"]
    call_message = ctx.record["transcript"][2]
    assert call_message["content"] == CALL and call_message["tool_calls"]  # the call as the model wrote it
    assert ctx.record["transcript"][3]["content"] == "391"
    assert all("inputs_embeds" in p for p in seen) and len(seen) == 2
    saved = json.loads((run / "stages" / "chat" / "transcript.json").read_text())
    assert saved == ctx.record["transcript"]


def test_final_chat_stage_refuses_an_lm_of_another_architecture(stage_run, tmp_path):
    run, markers, _ = stage_run
    other = DecoderLM(vocab_size=300, **{**LM, "dim": 64})
    ckpt = tmp_path / "other.ckpt"
    torch.save({"mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": other.config},
                "state_dict": {f"model.{k}": v for k, v in other.state_dict().items()}}, ckpt)
    markers = {**markers, "tools": _marker("tools", {"checkpoint": ckpt})}
    markers.pop("tokenize")
    with pytest.raises(ValueError, match="dim: VLM 32 vs LM 64"):
        _run_stage(run, markers)


def test_swap_keeps_image_rows_inside_a_padded_vocabulary():
    """A model vocabulary larger than the tokenizer's holds the image tokens inside the LM's rows:
    those rows still come from the VLM (stage 2 trained them), tied head included."""
    from mmllm.stages.chat import swap_language_model

    torch.manual_seed(0)
    cfg = {**LM, "vocab_size": 64, "tie_embeddings": True, "max_seq_len": 32}
    vlm_lm, tools_lm = DecoderLM(**cfg), DecoderLM(**cfg)
    state, stats = swap_language_model({"decoder": vlm_lm.config}, {f"decoder.{k}": v for k, v in
                                                                    vlm_lm.state_dict().items()}, tools_lm, [60, 61])
    emb = state["decoder.embed_tokens.weight"]
    torch.testing.assert_close(emb[:60], tools_lm.embed_tokens.weight[:60])
    torch.testing.assert_close(emb[60:62], vlm_lm.embed_tokens.weight[60:62])
    torch.testing.assert_close(state["decoder.lm_head.weight"], emb)
    assert stats["replaced"] == len(tools_lm.state_dict()) and stats["lm_vocab"] == 64


# ------------------------------------------------------------------------------ the CLI
def test_cli_chat_with_image_and_tools(stage_run, unscripted, monkeypatch, capsys, tmp_path):
    """`mmllm chat checkpoint=<the stage's vlm_tools.ckpt> --image X --tools` on a scripted stdin:
    the model's call (scripted reply) is run and shown, the answer follows; the image reaches the
    prompt of both replies."""
    from mmllm import cli

    run, _, _ = stage_run
    stage, ctx = unscripted
    ckpt = stage.outputs(ctx)["checkpoint"]  # the stage's VLM with the tools LM
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "x.png")
    replies = iter([CALL, "It is 391."])
    prompts = []

    def scripted(self, messages, on_text=lambda s: None):
        prompts.append(self.prompt(messages))
        text = next(replies)
        on_text(text)
        return text

    monkeypatch.setattr(ModelReplier, "__call__", scripted)
    for var in ("HYDRA_FULL_ERROR", "_MMLLM_CLI_SET_HYDRA_FULL_ERROR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 23 * 17?\n/exit\n"))
    cli.main(["chat", f"checkpoint={ckpt}", "--image", str(tmp_path / "x.png"), "--tools", "temperature=0"])
    out = capsys.readouterr().out
    assert "[tool call] calculator({'expression': '23 * 17'})" in out
    assert re.search(r"\[tool result\] 391 \(", out) and out.rstrip().endswith("It is 391.")
    assert len(prompts) == 2 and all("inputs_embeds" in p for p in prompts)

    # A text LM given an image: a clear error saying what to pass.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chat", f"checkpoint={run / 'stages' / 'tools' / 'gorilla.ckpt'}", "--image",
                  str(tmp_path / "x.png"), "--tools"])
    assert "does not take images" in str(exit_.value.code) + capsys.readouterr().err
