"""The ``tools`` pipeline stage on a tiny real checkpoint: Gorilla data through the template teacher,
an SFT fine-tune (with tool-calling chats) evaluated by AST matching and held-out tool calls before and
after, Toolformer share (when the module is there) and a chat turn in which the model's own call (if it
writes one) really runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmllm.tools.catalog import load_catalog
from mmllm.tools.gorilla import GenerationStats, generate_pairs, to_chats

OUTCOMES = ("correct", "wrong_api", "hallucination", "parse_failure", "abstention")


def test_template_teacher_writes_distinct_pairs_calling_the_documented_api():
    from mmllm.teacher import TeacherError
    from mmllm.tools.template_teacher import TemplateTeacher

    catalog = load_catalog()[:6]
    stats = GenerationStats()
    pairs = generate_pairs(TemplateTeacher(), catalog, per_api=10, stats=stats)
    assert dict(stats) == {"pairs": 60}  # nothing dropped: every call parses and is the doc's own
    assert len({p["instruction"].casefold() for p in pairs}) == 60
    assert all(p["api_call"] == catalog[p["doc_index"]].api_call for p in pairs)
    assert "resnet-18" in pairs[0]["instruction"].lower() and "classify an image" in pairs[0]["instruction"]
    again = generate_pairs(TemplateTeacher(), catalog, per_api=10)
    assert again == pairs  # deterministic
    with pytest.raises(TeacherError, match="only Gorilla"):
        TemplateTeacher().chat([{"role": "user", "content": "hello"}])


def test_split_pairs_holds_out_the_last_of_every_api_and_keeps_one_for_training():
    from mmllm.stages.tools import split_pairs

    pairs = [{"doc_index": d, "i": i} for d in range(3) for i in range(3)] + [{"doc_index": 7, "i": 0}]
    train, test = split_pairs(pairs, 1)
    assert [(p["doc_index"], p["i"]) for p in test] == [(0, 2), (1, 2), (2, 2)]
    assert len(train) == 7 and {"doc_index": 7, "i": 0} in train


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A random tiny DecoderLM saved as a kit checkpoint; its BPE is trained on the catalog's chats."""
    import torch

    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.models.decoder_lm import DecoderLM
    from mmllm.tools.template_teacher import TemplateTeacher

    root = tmp_path_factory.mktemp("tiny_tools")
    catalog = load_catalog()
    rows = to_chats(generate_pairs(TemplateTeacher(), catalog, per_api=2), catalog, retrieval="oracle")
    from mmllm.tools.builtin import default_registry
    from mmllm.tools.tool_chats import plain_chat, tool_call_chats

    with default_registry() as reg:
        calls = [plain_chat(c) for c in tool_call_chats(40, reg, seed=1)]
    texts = [m["content"] for r in rows for m in r["messages"]] + [m["content"] for c in calls for m in c] \
        + ["What is 23 * 17? The answer is 391."] * 20
    tok = train_bpe_tokenizer(texts, vocab_size=700, show_progress=False)
    tok.save_pretrained(root / "tokenizer")
    config = {"vocab_size": len(tok), "dim": 48, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
              "hidden_dim": 128, "max_seq_len": 1024}
    torch.manual_seed(0)
    model = DecoderLM(**config)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": config,
                          "tokenizer": str(root / "tokenizer")}}, root / "final.ckpt")
    return root / "final.ckpt"


def _ctx(run: Path, ckpt: Path):
    from mmllm.stages.base import Marker, StageContext

    marker = Marker(stage="pretrain", target="x", fingerprint="f", run_id="p", started_at="", finished_at="",
                    seconds=0.0, outputs={"checkpoint": str(ckpt)}, record={}, config_updates={}, config={})
    return StageContext(name="tools", run_dir=run, cfg=OmegaConf.create({"seed": 0}), markers={"pretrain": marker})


def test_stage_finetunes_evaluates_before_after_and_runs_the_models_own_turn(tmp_path, tiny_ckpt):
    import torch

    from mmllm.checkpoint import load_lightning_checkpoint, load_tokenizer_from as load_tokenizer
    from mmllm.stages.tools import ToolUseStage

    stage = ToolUseStage(num_apis=4, per_api=3, eval_per_api=1, steps=24, batch_size=2, lr=3e-3,
                         seq_len=1024, max_new_tokens=40, answer_tokens=8, tool_chats=20, tool_eval=3,
                         toolformer={"sentences": ["He bought 12 eggs and 30 more, 42 eggs."],
                                     "tau_s": 0.0, "top_k": 2, "num_samples": 2, "max_call_tokens": 8})
    ctx = _ctx(tmp_path, tiny_ckpt)
    stage.run(ctx)
    g = ctx.record["gorilla"]
    assert (g["apis"], g["pairs"], g["train_pairs"], g["test_pairs"]) == (4, 12, 8, 4)
    assert g["teacher"] == "TemplateTeacher(template)" and g["model"].startswith("pretrain")
    for when in ("before", "after"):
        report = g[when]
        assert report["total"] == 4 and sum(report[o] for o in OUTCOMES) == 4
        assert report["accuracy"] == report["correct"] / 4
        assert {f"{o}_rate" for o in OUTCOMES[1:]} <= set(report)
    ft = g["finetune"]
    assert ft["steps"] == 24 and ft["loss_last5"] < ft["loss_first5"] - 0.5  # the SFT path learns
    assert 0.0 < ft["supervised_fraction"] < 1.0  # the user turn (with the API doc) is masked
    answers = [json.loads(line) for line in stage.outputs(ctx)["answers"].read_text().splitlines()]
    assert len(answers) == 4 and all(set(a) == {"instruction", "reference", "before", "after"} for a in answers)
    tuned, _, _ = load_lightning_checkpoint(stage.outputs(ctx)["checkpoint"])  # the fine-tuned weights
    base, _, _ = load_lightning_checkpoint(tiny_ckpt)
    assert not torch.equal(tuned.embed_tokens.weight, base.embed_tokens.weight)

    assert ft["tool_call_rows"] == 20 and 0.0 < ft["tool_call_supervised_fraction"] < 1.0
    rows = [json.loads(line) for line in stage.outputs(ctx)["tool_chats"].read_text().splitlines()]
    assert len(rows) == 20 and all([m["role"] for m in r["messages"]] == ["system", "user", "assistant", "tool",
                                                                         "assistant"] for r in rows)
    assert all(r["messages"][2]["content"].startswith("<tool_call>{") for r in rows)
    tc = ctx.record["tool_calls"]
    for when in ("before", "after"):
        assert tc[when]["questions"] == 3 and 0.0 <= tc[when]["right_result"] <= tc[when]["called"] <= 1.0

    transcript, turn = ctx.record["transcript"], ctx.record["tool_turn"]
    assert transcript[0] == {"role": "user", "content": "What is 23 * 17?"}
    assert turn["call_source"] in ("model", "none") and turn["expected_result"] == "391"
    if turn["call_source"] == "model":  # the model's own call ran through the registry
        assert [m["role"] for m in transcript][:3] == ["user", "assistant", "tool"]
        assert transcript[2]["content"] == turn["result"]
    else:  # nothing is faked: the model's text is kept
        assert [m["role"] for m in transcript] == ["user", "assistant"] and turn["result"] is None
        assert transcript[1]["content"] == turn["text"] and turn["result_correct"] is False
    assert json.loads(stage.outputs(ctx)["transcript"].read_text()) == transcript

    # force_call keeps the old path: the calculator call is written, runs for real, the model answers.
    from mmllm.tools.builtin import default_registry

    forced = ToolUseStage(force_call=True, answer_tokens=4)
    with default_registry() as reg:
        transcript, turn = forced._tool_turn(tuned, load_tokenizer(tiny_ckpt), reg)
    assert [m["role"] for m in transcript] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(transcript[1]["content"].removeprefix("<tool_call>").removesuffix("</tool_call>")) == \
        {"name": "calculator", "arguments": {"expression": "23 * 17"}}
    assert transcript[2]["content"] == "391" and turn["call_source"] == "forced" and turn["result_correct"]

    tf = ctx.record["toolformer"]
    try:
        import mmllm.tools.toolformer  # noqa: F401
    except ImportError:
        assert tf["available"] is False
    else:
        assert tf["available"] and tf["texts"] == 1 and tf["candidates"] >= 1
        assert tf["sampled"] >= tf["executed"] >= tf["kept"] >= 0


def test_stage_prefers_the_sft_checkpoint_and_builds_a_teacher_node(tmp_path, tiny_ckpt):
    from mmllm.stages.base import Marker
    from mmllm.stages.tools import ToolUseStage

    ctx = _ctx(tmp_path, tiny_ckpt)
    ctx.markers["sft"] = Marker(stage="sft", target="x", fingerprint="f", run_id="s", started_at="", finished_at="",
                                seconds=0.0, outputs={"checkpoint": str(tiny_ckpt)}, record={},
                                config_updates={}, config={})
    stage = ToolUseStage(teacher={"_target_": "mmllm.tools.template_teacher.TemplateTeacher", "model": "tmpl"})
    _, tok, tok_dir, source = stage._load_lm(ctx)
    assert source.startswith("sft (") and tok_dir == tiny_ckpt.parent / "tokenizer" and len(tok) > 256
    pairs, gen = stage._pairs(load_catalog()[:2], seed=0)
    assert gen == {"pairs": 8, "teacher": "TemplateTeacher(tmpl)"} and len(pairs) == 8
    with pytest.raises(ValueError, match="retrieval"):
        ToolUseStage(retrieval="web")
