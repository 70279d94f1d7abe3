"""A deterministic template teacher for Gorilla pair generation in offline demos and tests.

:func:`mmllm.tools.gorilla.generate_pairs` asks a teacher to write instructions for an API
document. A real teacher (:class:`~mmllm.teacher.OpenAITeacher`, a large
:class:`~mmllm.teacher.LocalTeacher`) writes varied, realistic ones; the pipeline's own tiny
model writes junk. :class:`TemplateTeacher` exists so that the pipeline (and its tests) can run
the Gorilla path end to end offline, with no model: it reads the API document out of the
self-instruct prompt and fills fixed templates from its ``functionality``, ``description`` and
``domain`` fields. Its instructions are formulaic (they also name the model in plain words), so
data made with it shows the plumbing works, not what a real teacher's data would teach.
"""

from __future__ import annotations

import json
import re

from mmllm.teacher.base import Teacher, TeacherError

# Where the self-instruct prompt (mmllm.tools.gorilla.SELF_INSTRUCT_PROMPT) puts the document
# and the number of instructions asked for.
_DOC = re.compile(r"Here is the documentation of one API:\n(\{.*\})\n\nWrite ", re.DOTALL)
_COUNT = re.compile(r"Write (\d+) different")

TEMPLATES = (
    "I need to {f}. Load {name} for me.",
    "Set up {name} so that I can {f}.",
    "Which call gives me {name}? I want to {f}.",
    "My {domain} project has to {f}; please use {name}.",
    "Get {name} ready: the task is to {f}.",
    "For {domain}, load {name}, I want to {f}.",
    "Could you load {name}? It should {f}.",
    "Build {name} for me to {f}.",
)


def _phrase(text: str) -> str:
    """``"Classify an image ..."`` -> ``"classify an image ..."`` (no final period)."""
    text = " ".join(str(text).split()).rstrip(".")
    return text[:1].lower() + text[1:] if text[:2] != text[:2].upper() else text


def _model_name(doc: dict) -> str:
    """The model the document describes, in plain words: the description's head
    (``"ResNet-18, an 18-layer ..."`` -> ``"ResNet-18"``), else the API's last name part."""
    head = re.split(r"[,;(]", str(doc.get("description") or ""), maxsplit=1)[0].strip().rstrip(".")
    return head if 0 < len(head) <= 60 else str(doc["api_name"]).rsplit(".", 1)[-1]


def template_instructions(doc: dict, n: int) -> list[str]:
    """``n`` distinct instructions for one API document (its fields filled into :data:`TEMPLATES`).

    Args:
        doc: an API document (Gorilla's fields; ``api_name`` and ``functionality`` at least).
        n: how many (beyond ``len(TEMPLATES)`` a counter makes them distinct).
    """
    fields = {"f": _phrase(doc.get("functionality") or doc["api_name"]), "name": _model_name(doc),
              "domain": str(doc.get("domain") or "machine learning").lower()}
    out = []
    for i in range(n):
        text = TEMPLATES[i % len(TEMPLATES)].format(**fields)
        out.append(text if i < len(TEMPLATES) else f"{text} (request {i // len(TEMPLATES) + 1})")
    return out


class TemplateTeacher(Teacher):
    """A teacher that answers Gorilla self-instruct prompts from templates; for offline demos only.

    It understands only :data:`mmllm.tools.gorilla.SELF_INSTRUCT_PROMPT` (the document and the
    number of instructions are parsed out of it) and answers with the JSON array the prompt asks
    for, each pair calling the documented ``api_call``. Any other prompt is a failed request
    (:class:`~mmllm.teacher.TeacherError`, or None under ``on_error="skip"``). Deterministic: the
    same prompt always gets the same answer.

    Args:
        model: the name in cache keys and records.
        kwargs: the :class:`~mmllm.teacher.Teacher` options (``cache_path``, ``on_error``, ...).
    """

    def __init__(self, *, model: str = "template", **kwargs) -> None:
        kwargs.setdefault("progress", False)
        kwargs.setdefault("max_concurrency", 1)
        super().__init__(model=model, **kwargs)

    def _complete(self, messages: list[dict], sampling: dict) -> str:
        user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
        doc_match, count = _DOC.search(user), _COUNT.search(user)
        if doc_match is None or count is None:
            raise TeacherError("TemplateTeacher answers only Gorilla self-instruct prompts "
                               "(mmllm.tools.gorilla.SELF_INSTRUCT_PROMPT)")
        try:
            doc = json.loads(doc_match.group(1))
        except json.JSONDecodeError as exc:
            raise TeacherError(f"the API document in the prompt is not JSON: {exc}") from None
        if not isinstance(doc, dict) or "api_call" not in doc or "api_name" not in doc:
            raise TeacherError("the API document in the prompt has no api_call/api_name")
        pairs = [{"instruction": text, "api_call": doc["api_call"]}
                 for text in template_instructions(doc, int(count.group(1)))]
        return json.dumps(pairs, ensure_ascii=False)
