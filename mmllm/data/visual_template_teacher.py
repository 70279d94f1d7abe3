"""Offline visual instructions: a deterministic template teacher and the bundled images' contexts.

:class:`~mmllm.data.visual_instruct.VisualInstructGenerator` asks a text-only teacher to write
conversations, detailed descriptions and reasoning questions about an image from its symbolic
context (captions and boxes). A real teacher (:class:`~mmllm.teacher.OpenAITeacher`, a large
:class:`~mmllm.teacher.LocalTeacher`) writes varied, grounded data; the pipeline's own tiny model
writes junk. :class:`VisualTemplateTeacher` exists so that the pipeline (and its tests) can run
the LLaVA path end to end offline, with no model: it reads the captions and boxes back out of
the generator's prompt and fills fixed templates with them, in the reply format the generator
parses. Its data restates the captions and turns boxes into "top left" / "centre" words; it
shows that the plumbing (prompting, parsing, filtering, LLaVA JSON, training, judging) works,
not what a real teacher's data would teach.

:func:`skimage_contexts` gives scikit-image's bundled photographs as
:class:`~mmllm.data.visual_instruct.ImageContext` (captions from their docstrings, a whole-image
box for those with one main object), written as PNG files so that the LLaVA JSON made from them
is read back by :class:`~mmllm.data.vlm_data.LlavaInstructSource` like any other.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from mmllm.data.visual_instruct import KINDS, SYSTEM, ImageContext
from mmllm.teacher.base import Teacher, TeacherError

# A box line of ImageContext.text(): "category: [x1, y1, x2, y2]" (normalised).
_BOX = re.compile(r"^(?P<cat>[^:\[\]]+):\s*\[(?P<xy>[\d.,\s]+)\]$")

# The one object that fills each skimage photograph (a whole-image box); others get no box.
SKIMAGE_OBJECTS = {"astronaut": "person", "camera": "person", "coffee": "cup", "chelsea": "cat",
                   "rocket": "rocket", "horse": "horse", "clock": "clock", "cell": "cell",
                   "moon": "moon", "colorwheel": "color wheel"}


def _lower_first(text: str) -> str:
    """``"Coffee cup."`` -> ``"coffee cup"`` (acronyms and names like "DSCOVR" kept)."""
    text = " ".join(text.split()).rstrip(".")
    first = text.split(" ", 1)[0]
    return text if len(first) > 1 and first.isupper() else text[:1].lower() + text[1:]


def _where(box: tuple[float, float, float, float]) -> str:
    """Where a normalised box lies in plain words ("the centre", "the top left part")."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    return f"the {row} {col} part".replace("  ", " ") if row or col else "the centre"


def parse_context(text: str) -> tuple[list[str], list[tuple[str, tuple[float, ...]]]]:
    """``(captions, [(category, box)])`` of an :meth:`ImageContext.text` block."""
    captions, boxes = [], []
    for line in (ln.strip() for ln in text.splitlines()):
        m = _BOX.match(line)
        if m:
            coords = tuple(float(v) for v in m.group("xy").split(","))
            if len(coords) == 4:
                boxes.append((m.group("cat").strip(), coords))
                continue
        if line:
            captions.append(line)
    return captions, boxes


def _object_sentence(cat: str, box: tuple[float, ...]) -> str:
    area = max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])
    size = ", filling most of the frame" if area > 0.5 else ""
    return f"The {cat} is in {_where(box)} of the picture{size}."


def conversation_reply(captions: list[str], boxes: list) -> str:
    """Question / answer turns: what the picture shows, where each object is, what else is seen."""
    turns = [("What does this image show?", f"In this image you can see {_lower_first(captions[0])}.")]
    for cat, box in boxes:
        turns.append((f"Where is the {cat} in the picture?", _object_sentence(cat, box)))
    if len(captions) > 1:
        turns.append(("What else can you tell me about it?",
                      f"Looking more closely, {_lower_first(captions[1])}."))
    return "\n===\n".join(f"Question:\n{q}\n===\nAnswer:\n{a}" for q, a in turns)


def detail_reply(captions: list[str], boxes: list) -> str:
    """A description: every caption sentence, then where each object is."""
    parts = [f"This picture shows {_lower_first(captions[0])}."]
    parts += [c if c.endswith((".", "!", "?")) else f"{c}." for c in captions[1:]]
    parts += [_object_sentence(cat, box) for cat, box in boxes]
    parts.append("That is everything that can be seen clearly in the picture.")
    return " ".join(parts)


def complex_reply(captions: list[str], boxes: list) -> str:
    """One reasoning question (what the picture is for) answered from the main subject."""
    subject = f"the {boxes[0][0]}" if boxes else _lower_first(captions[0])
    answer = (f"The picture shows {_lower_first(captions[0])}. Because the picture is centred on "
              f"{subject}, that is its main subject, so the photograph was most likely taken to "
              f"show {subject} itself rather than its surroundings.")
    return f"Question:\nWhat is the main subject of this picture, and why?\n===\nAnswer:\n{answer}"


# Kind-specific ways a reply can fail the generator's filters (malformed_fraction).
BROKEN = {
    "conversation": lambda reply: reply.replace("\n===\n", "\n"),  # no separators: parse failure
    "detail": lambda reply: f"The caption says: {reply}",  # mentions the context
    "complex": lambda reply: "Question:\nWhy?\n===\nAnswer:\nIt depends.",  # too short
}


class VisualTemplateTeacher(Teacher):
    """A teacher that answers VisualInstructGenerator prompts from templates; offline demos only.

    It understands only the generator's prompts (:meth:`VisualInstructGenerator.prompt`: the kind
    is recognised by the system message, the image context is the last user message) and answers
    in the format the generator parses. Any other prompt is a failed request
    (:class:`~mmllm.teacher.TeacherError`, or None under ``on_error="skip"``). Deterministic: the
    same prompt always gets the same answer.

    Args:
        malformed_fraction: share of replies broken on purpose, chosen by a hash of the prompt
            (conversation: no '===' separators; detail: mentions "the caption"; complex: a
            too-short answer), to show the generator's filters at work.
        model: the name in cache keys and records.
        kwargs: the :class:`~mmllm.teacher.Teacher` options (``cache_path``, ``on_error``, ...).
    """

    def __init__(self, *, malformed_fraction: float = 0.0, model: str = "visual-template",
                 **kwargs) -> None:
        if not 0.0 <= malformed_fraction <= 1.0:
            raise ValueError(f"malformed_fraction must be in [0, 1], got {malformed_fraction}")
        kwargs.setdefault("progress", False)
        kwargs.setdefault("max_concurrency", 1)
        super().__init__(model=f"{model}@{malformed_fraction:g}", **kwargs)
        self.malformed_fraction = malformed_fraction

    def _complete(self, messages: list[dict], sampling: dict) -> str:
        system = next((m["content"] for m in messages if m.get("role") == "system"), None)
        kind = next((k for k in KINDS if SYSTEM[k] == system), None)
        context = messages[-1]["content"] if messages and messages[-1].get("role") == "user" else ""
        if kind is None or not context.strip():
            raise TeacherError("VisualTemplateTeacher answers only VisualInstructGenerator prompts "
                               "(mmllm.data.visual_instruct.VisualInstructGenerator.prompt)")
        captions, boxes = parse_context(context)
        if not captions:
            raise TeacherError("the image context in the prompt has no caption")
        reply = {"conversation": conversation_reply, "detail": detail_reply,
                 "complex": complex_reply}[kind](captions, boxes)
        return BROKEN[kind](reply) if self._broken(kind, context) else reply

    def _broken(self, kind: str, context: str) -> bool:
        digest = hashlib.sha256(f"{kind}\n{context}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64 < self.malformed_fraction


def skimage_contexts(image_dir: str | Path, *, max_side: int = 448) -> list[ImageContext]:
    """scikit-image's bundled photographs as image contexts, their images written under ``image_dir``.

    Args:
        image_dir: where ``<name>.png`` files are written (the LLaVA JSON's ``image`` paths).
        max_side: images are shrunk to fit this side (the encoder resizes to far less anyway).

    Returns:
        One context per image present offline: ``id`` the skimage name, ``captions`` the
        sentences of its docstring caption, a whole-image box when :data:`SKIMAGE_OBJECTS` names
        its main object.
    """
    from mmllm.data.vlm_samples import skimage_pairs

    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for rec in skimage_pairs(augment=False):
        name = rec["id"].split("/", 1)[1]
        image = rec["images"][0].copy()
        image.thumbnail((max_side, max_side))
        image.save(image_dir / f"{name}.png")
        w, h = image.size
        boxes = [{"category": SKIMAGE_OBJECTS[name], "bbox": [0, 0, w, h]}] if name in SKIMAGE_OBJECTS else []
        captions = [s for s in re.split(r"(?<=[.!?])\s+", rec["caption"]) if s.strip()]
        out.append(ImageContext(image=f"{name}.png", captions=captions, boxes=boxes, width=w,
                                height=h, id=name))
    return out
