"""Visual instruction generation (LLaVA's recipe) with a scripted teacher: prompts, parsing,
filters, and LLaVA JSON that the LLaVA reader reads back."""

from __future__ import annotations

import json

from PIL import Image

from mmllm.data.visual_instruct import (
    FEW_SHOT,
    ImageContext,
    VisualInstructGenerator,
    coco_contexts,
    generate_from_coco,
    parse_qa,
    write_llava_json,
)
from mmllm.data.vlm_data import LlavaInstructSource, ReadStats
from mmllm.teacher import Teacher


class ScriptedTeacher(Teacher):
    def __init__(self, script) -> None:
        super().__init__(model="scripted", progress=False, on_error="skip")
        self.script, self.seen = script, []

    def _complete(self, messages, sampling):
        self.seen.append(messages)
        return self.script(messages)


GOOD = {
    "conversation": "Question:\nWhat animal is shown?\n===\nAnswer:\nA tabby cat with green eyes "
                    "looks at the camera.\n===\nQuestion:\nIs it indoors?\n===\nAnswer:\nYes, it sits "
                    "in front of a plain wall inside a room.",
    "detail": "A tabby cat sits close to the camera, its green eyes wide open. Its fur is striped "
              "brown and grey, and long white whiskers spread out on both sides of its pink nose.",
    "complex": "Question:\nWhy might the cat be staring?\n===\nAnswer:\nCats stare at movement or "
               "at a person they expect food from; its ears are up, so it is alert rather than scared.",
}
BAD = {
    ("b", "conversation"): "I'm sorry, but I cannot see images.",
    ("b", "detail"): "The caption says there is a dog on a couch next to a red pillow and a lamp.",
    ("b", "complex"): "Question:\nWhy?\n===\nAnswer:\nBecause.",
    ("c", "conversation"): "What animal is shown? A dog.",
}


def _kind(messages) -> str:
    system = messages[0]["content"]
    return "conversation" if "conversation" in system else "detail" if "rich detail" in system else "complex"


def _script(messages):
    image = messages[-1]["content"].split(":")[0]  # the contexts below start with their id
    kind = _kind(messages)
    if (image, kind) == ("c", "detail"):
        raise RuntimeError("teacher down")
    return BAD.get((image, kind), GOOD[kind])


def test_context_text_normalises_coco_boxes():
    ctx = ImageContext(image="x.jpg", captions=["A cat. ", ""], width=100, height=200,
                       boxes=[{"category": "cat", "bbox": [10, 20, 30, 40]}])
    assert ctx.text() == "A cat.\ncat: [0.10, 0.10, 0.40, 0.30]"


def test_coco_contexts_join_captions_and_instances(tmp_path):
    (tmp_path / "caps.json").write_text(json.dumps({
        "images": [{"id": 5, "file_name": "5.jpg", "width": 50, "height": 50}],
        "annotations": [{"image_id": 5, "caption": "One."}, {"image_id": 5, "caption": "Two."}]}))
    (tmp_path / "inst.json").write_text(json.dumps({
        "categories": [{"id": 1, "name": "dog"}],
        "annotations": [{"image_id": 5, "category_id": 1, "bbox": [0, 0, 25, 50]}]}))
    (ctx,) = coco_contexts(tmp_path / "caps.json", tmp_path / "inst.json")
    assert (ctx.image, ctx.captions, ctx.id) == ("5.jpg", ["One.", "Two."], "5")
    assert ctx.text().splitlines()[-1] == "dog: [0.00, 0.00, 0.50, 1.00]"
    teacher = ScriptedTeacher(lambda m: GOOD[_kind(m)])
    path, stats = generate_from_coco(teacher=teacher, captions=tmp_path / "caps.json",
                                     instances=tmp_path / "inst.json", output=tmp_path / "out.json")
    entries = json.loads(path.read_text())
    assert [e["id"] for e in entries] == ["5-conversation", "5-detail", "5-complex"]
    assert "dog: [0.00, 0.00, 0.50, 1.00]" in teacher.seen[0][-1]["content"]
    assert stats["kept_detail"] == 1


def test_parse_qa():
    answer = "Yes, it sits in front of a plain wall inside a room."
    assert parse_qa(GOOD["conversation"])[1] == ("Is it indoors?", answer)
    assert parse_qa("Question: only a question") == []
    assert parse_qa("no format at all") == []


def test_generation_filters_and_writes_llava_json(tmp_path):
    contexts = [ImageContext(image=f"{n}.png", captions=[f"{n}: a cat on a sofa."], id=n)
                for n in ("a", "b", "c")]
    teacher = ScriptedTeacher(_script)
    gen = VisualInstructGenerator(teacher=teacher, seed=1)
    entries = gen.generate(contexts)
    assert sorted(e["id"] for e in entries) == ["a-complex", "a-conversation", "a-detail", "c-complex"]
    assert gen.stats == {"kept_conversation": 1, "kept_detail": 1, "kept_complex": 2, "refusal": 1,
                         "mentions_context": 1, "too_short": 1, "parse_failure": 1, "failed_request": 1}
    prompt = teacher.seen[0]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[2]["content"] in FEW_SHOT.values() and prompt[3]["content"].endswith("sofa.")
    conv = next(e for e in entries if e["id"] == "a-conversation")["conversations"]
    assert [t["from"] for t in conv] == ["human", "gpt", "human", "gpt"]
    assert conv[0]["value"].count("<image>") == 1 and "<image>" not in conv[2]["value"]

    for n in ("a", "c"):
        Image.new("RGB", (8, 8), "gray").save(tmp_path / f"{n}.png")
    path = write_llava_json(entries, tmp_path / "out" / "instruct.json")
    src = LlavaInstructSource(path=str(path), image_dir=str(tmp_path))
    stats = ReadStats()
    records = [r for u in src.units() for r in src.read_unit(u, stats=stats) if r]
    assert len(records) == 4 and stats.skipped == 0
    detail = next(r for r in records if r["id"] == "a-detail")
    assert detail["messages"][1] == {"role": "assistant", "content": GOOD["detail"]}
