"""The offline visual-instruction teacher (its replies parse for every kind, broken ones are
filtered), the bundled images' contexts, and stage 2's judge / caption scoring with a fixed
judge whose scores give hand-computed relative scores."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from mmllm.data.visual_instruct import KINDS, ImageContext, VisualInstructGenerator, parse_qa
from mmllm.data.visual_template_teacher import (
    VisualTemplateTeacher,
    parse_context,
    skimage_contexts,
)
from mmllm.stages.vlm import VLMStage2Stage
from mmllm.stages.vlm_instruct import caption_scores, hold_out, judge_items
from mmllm.teacher import Teacher, TeacherError

CAT = ImageContext(image="cat.png", captions=["A tabby cat on a sofa.", "Its eyes are green."],
                   boxes=[{"category": "cat", "bbox": [0, 0, 50, 100]}], width=200, height=100, id="cat")
PAGE = ImageContext(image="page.png", captions=["Scanned page."], id="page")  # no box


def _replies(teacher, ctx):
    return {k: teacher.chat(VisualInstructGenerator.prompt(k, ctx)) for k in KINDS}


def test_template_replies_parse_for_every_kind_and_use_the_context():
    assert parse_context(CAT.text()) == (["A tabby cat on a sofa.", "Its eyes are green."],
                                         [("cat", (0.0, 0.0, 0.25, 1.0))])
    replies = _replies(VisualTemplateTeacher(), CAT)
    turns = parse_qa(replies["conversation"])
    assert turns == [("What does this image show?", "In this image you can see a tabby cat on a sofa."),
                     ("Where is the cat in the picture?", "The cat is in the left part of the picture."),
                     ("What else can you tell me about it?", "Looking more closely, its eyes are green.")]
    assert "Its eyes are green." in replies["detail"] and "[" not in replies["detail"]
    ((question, answer),) = parse_qa(replies["complex"])
    assert question.endswith("why?") and "the cat" in answer

    gen = VisualInstructGenerator(teacher=VisualTemplateTeacher(), seed=0)
    entries = gen.generate([CAT, PAGE])
    assert sorted(e["id"] for e in entries) == sorted(f"{c}-{k}" for c in ("cat", "page") for k in KINDS)
    assert gen.stats == {f"kept_{k}": 2 for k in KINDS}  # nothing filtered
    assert _replies(VisualTemplateTeacher(), CAT) == replies  # deterministic


def test_broken_replies_are_filtered_with_their_reason():
    gen = VisualInstructGenerator(teacher=VisualTemplateTeacher(malformed_fraction=1.0))
    assert gen.generate([CAT, PAGE]) == []
    assert gen.stats == {"parse_failure": 2, "mentions_context": 2, "too_short": 2}
    some = VisualInstructGenerator(teacher=VisualTemplateTeacher(malformed_fraction=0.5))
    contexts = [ImageContext(image=f"{i}.png", captions=[f"A red ball number {i} on grass."], id=str(i))
                for i in range(20)]
    kept = len(some.generate(contexts))
    assert 0 < kept < 60 and kept + sum(v for k, v in some.stats.items() if not k.startswith("kept")) == 60


def test_other_prompts_are_failed_requests():
    with pytest.raises(TeacherError, match="only VisualInstructGenerator prompts"):
        VisualTemplateTeacher().chat([{"role": "user", "content": "hello"}])
    assert VisualTemplateTeacher(on_error="skip").chat([{"role": "user", "content": "hi"}]) is None
    with pytest.raises(ValueError, match="malformed_fraction"):
        VisualTemplateTeacher(malformed_fraction=2.0)
    with pytest.raises(ValueError, match=r"unknown instructions options \['eval'\]"):
        VLMStage2Stage(instructions={"teacher": None, "eval": 3})


def test_skimage_contexts_write_images_with_whole_image_boxes(tmp_path):
    contexts = {c.id: c for c in skimage_contexts(tmp_path, max_side=64)}
    cat = contexts["chelsea"]
    assert cat.captions == ["Chelsea the cat."] and cat.text().endswith("cat: [0.00, 0.00, 1.00, 1.00]")
    with Image.open(tmp_path / cat.image) as im:
        assert max(im.size) == 64 and (cat.width, cat.height) == im.size
    assert contexts["page"].boxes == []  # no single object: captions only
    assert len(contexts["rocket"].captions) == 2  # one caption per sentence


def test_hold_out_spreads_over_kinds():
    entries = [{"id": f"{i}-{k}"} for i in range(4) for k in KINDS]
    train, held = hold_out(entries, 4, seed=0)
    assert len(held) == 4 and len(train) == 8 and not {e["id"] for e in held} & {e["id"] for e in train}
    assert {e["id"].split("-")[1] for e in held} == set(KINDS)  # every kind before a second of one
    assert hold_out(entries, 4, seed=0) == (train, held)


class FixedJudge(Teacher):
    """Replies "8 6" (Assistant 1 gets 8), or junk when the question mentions a dog."""

    def __init__(self) -> None:
        super().__init__(model="fixed", progress=False, on_error="skip")

    def _complete(self, messages, sampling):
        if "dog" in messages[-1]["content"]:
            return "I think both are fine."
        return "8 6\nAssistant 1 is more detailed."


ITEMS = [{"id": "a-detail", "category": "detail", "question": "<image>\nDescribe the cat.",
          "answer": "a cat", "reference": "A tabby cat on a sofa.", "context": "A cat."},
         {"id": "b-complex", "category": "complex", "question": "Why?\n<image>",
          "answer": "because", "reference": "Because it is raining.", "context": "Rain."},
         {"id": "c-complex", "category": "complex", "question": "Where is the dog?",
          "answer": "here", "reference": "On the left.", "context": "A dog."}]


def test_judge_relative_scores_hand_computed(tmp_path):
    # One order (reference shown first): the reference gets 8, the model 6 -> 6 / 8 = 75 %.
    out = judge_items(ITEMS, teacher=FixedJudge(), judge_options={"both_orders": False},
                      out_path=tmp_path / "judged.json")
    assert out["relative"] == 75.0 and out["overall"]["model"] == 6.0 and out["overall"]["reference"] == 8.0
    assert (out["requests"], out["parsed_replies"], out["unparsed"], out["failed_requests"]) == (3, 2, 1, 0)
    assert out["scored"] == 2 and out["by_kind"]["complex"] == {
        "model": 6.0, "reference": 8.0, "relative": 75.0, "n": 1, "unscored": 1}
    rows = json.loads((tmp_path / "judged.json").read_text())
    assert rows[0]["question"] == "Describe the cat." and rows[2]["model_score"] is None
    # Both orders: each answer gets 8 once and 6 once -> 7 / 7 = 100 %.
    both = judge_items(ITEMS[:2], teacher=FixedJudge())
    assert both["relative"] == 100.0 and both["requests"] == 4 and both["unparsed"] == 0
    # Every reply junk: nothing scored, no number invented.
    none = judge_items(ITEMS[2:], teacher=FixedJudge())
    assert none["relative"] is None and none["scored"] == 0 and none["unparsed"] == 2


def test_caption_scores():
    perfect = caption_scores([{"generated": "a cat on a red sofa", "reference": "A cat on a red sofa."},
                              {"generated": "two dogs play in the park", "reference": "Two dogs play in the park."}])
    assert perfect["BLEU-1"] == pytest.approx(1.0) and perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-3)
    empty = caption_scores([{"generated": "", "reference": "A cat."}, {"generated": "cat", "reference": "A cat."}])
    assert empty["BLEU-1"] < 1.0 and caption_scores([]) == {}
