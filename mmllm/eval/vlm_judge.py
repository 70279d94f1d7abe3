"""Vision-language evaluation: a LLaVA-Bench style judge through a teacher, and caption metrics.

The judge (:class:`VLMJudge`) follows LLaVA-Bench: a text-only teacher sees the image as its
symbolic context (captions, boxes), the question, a reference answer and the model's answer,
and scores each 1-10 for helpfulness, relevance, accuracy and level of detail with an
explanation. The reported number is the *relative score*, mean(model) / mean(reference) x 100,
overall and per category (conversation, detail, complex reasoning). Judges favour the answer
shown first, so by default each item is judged in both orders and the scores averaged. Replies
are parsed robustly ("8 7", "8, 7", "Assistant 1: 8/10 ... Assistant 2: 7"); an unparseable or
failed reply is counted, never scored.

Caption metrics (:func:`caption_metrics`): BLEU-1..4 and CIDEr with ``pycocoevalcap``'s scorers,
over COCO's PTB tokenisation (needs Java) or the same lower-casing and punctuation removal in
Python.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of answers."
JUDGE_INSTRUCTION = (
    "Please give feedback on the two AI assistants' answers to the user question above. The user "
    "asked the question while looking at an image; you cannot see it, so its content is given to "
    "you as the text description in [Context]. Rate each answer for helpfulness, relevance, "
    "accuracy and level of detail, as one overall score from 1 to 10 (higher is better).\n"
    "Output on the first line only the two scores, for Assistant 1 and Assistant 2, separated by "
    "a space. On the following lines explain your evaluation comprehensively, avoiding bias: the "
    "order in which the answers are shown must not affect your judgment.")


@dataclass
class JudgedItem:
    """The judgment of one answer.

    Attributes:
        id, category: the item's.
        model_score, reference_score: 1-10 (averaged over the orders judged); None if no reply
            could be parsed.
        explanations: the judge's text per order judged.
        failures: replies that failed or could not be parsed.
    """

    id: str
    category: str
    model_score: float | None = None
    reference_score: float | None = None
    explanations: list[str] = field(default_factory=list)
    failures: int = 0


def parse_scores(reply: str | None) -> tuple[float, float] | None:
    """The two 1-10 scores of a judge reply, or None.

    Accepts a first line of two numbers ("8 7", "8, 7", "8/10 7/10"), or anywhere in the reply
    "Assistant 1 ... <score>" and "Assistant 2 ... <score>".
    """
    if not reply:
        return None
    score = r"(10(?:\.0+)?|[1-9](?:\.\d+)?)"
    for line in reply.strip().splitlines()[:3]:
        line = re.sub(r"/\s*10\b", "", line.strip().strip("*`"))
        m = re.fullmatch(rf"(?:scores?:?\s*)?{score}\s*(?:[,;/]|\s|and)\s*{score}\.?", line, re.IGNORECASE)
        if m:
            return float(m.group(1)), float(m.group(2))
    found = []
    for k in (1, 2):
        m = re.search(rf"assistant\s*{k}\D{{0,40}}?(?:score\D{{0,10}}?)?\b{score}\b(?:\s*/\s*10)?",
                      reply, re.IGNORECASE)
        if not m:
            return None
        found.append(float(m.group(1)))
    return found[0], found[1]


def judge_prompt(*, context: str, question: str, first: str, second: str) -> list[dict]:
    """The judge conversation for two answers shown as Assistant 1 and 2."""
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
               f"[Assistant 1]\n{first}\n\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{second}\n\n[End of Assistant 2]\n\n[System]\n{JUDGE_INSTRUCTION}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


class VLMJudge:
    """LLaVA-Bench style scoring of a model's answers against reference answers.

    Args:
        teacher: a :class:`mmllm.teacher.Teacher` (a strong text model: GPT-4-class in LLaVA).
            Use ``on_error="skip"`` to count failed requests instead of raising.
        both_orders: judge every item with the reference first and with the model first, and
            average (cancels the judge's position bias; twice the requests).
        sampling: the judge's sampling params (low temperature: scores should be stable).
    """

    def __init__(self, *, teacher, both_orders: bool = True,
                 sampling: Mapping | None = None) -> None:
        self.teacher, self.both_orders = teacher, both_orders
        self.sampling = dict(sampling if sampling is not None else {"temperature": 0.2, "max_tokens": 1024})

    def judge(self, items: Sequence[Mapping]) -> list[JudgedItem]:
        """Scores items ``{"id", "question", "answer", "reference", "context", "category"?}``
        (``context``: the image's captions / boxes as text)."""
        requests, owners = [], []  # owners: (item index, model shown first?)
        for i, it in enumerate(items):
            for model_first in ((False, True) if self.both_orders else (False,)):
                first, second = (it["answer"], it["reference"]) if model_first else (it["reference"], it["answer"])
                requests.append(judge_prompt(context=it.get("context", ""), question=it["question"],
                                             first=first, second=second))
                owners.append((i, model_first))
        replies = self.teacher.chat_many(requests, desc="vlm judge", **self.sampling)
        scores: dict[int, list[tuple[float, float]]] = defaultdict(list)
        out = [JudgedItem(id=str(it.get("id", i)), category=str(it.get("category", "all")))
               for i, it in enumerate(items)]
        for (i, model_first), reply in zip(owners, replies):
            parsed = parse_scores(reply)
            if parsed is None:
                out[i].failures += 1
                log.warning("judge reply for %s not parsed: %r", out[i].id, (reply or "")[:120])
                continue
            ref, model = (parsed[1], parsed[0]) if model_first else parsed
            scores[i].append((model, ref))
            out[i].explanations.append(reply.strip().split("\n", 1)[-1].strip())
        for i, pairs in scores.items():
            out[i].model_score = sum(m for m, _ in pairs) / len(pairs)
            out[i].reference_score = sum(r for _, r in pairs) / len(pairs)
        return out


def summarize(judged: Sequence[JudgedItem]) -> dict[str, dict[str, float]]:
    """Per category and ``"all"``: mean model and reference scores, the relative score
    (model / reference x 100), items scored and items whose every reply failed."""
    groups: dict[str, list[JudgedItem]] = defaultdict(list)
    for j in judged:
        groups[j.category].append(j)
        if j.category != "all":
            groups["all"].append(j)
    summary = {}
    for name, items in groups.items():
        ok = [j for j in items if j.model_score is not None]
        model = sum(j.model_score for j in ok) / len(ok) if ok else float("nan")
        ref = sum(j.reference_score for j in ok) / len(ok) if ok else float("nan")
        summary[name] = {"model": model, "reference": ref,
                         "relative": model / ref * 100 if ok and ref else float("nan"),
                         "n": len(ok), "unscored": len(items) - len(ok)}
    return summary


# ----------------------------------------------------------------------------- LLaVA-Bench
def _jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def llava_bench_items(*, questions: str | Path, contexts: str | Path,
                      references: str | Path) -> list[dict]:
    """Judge items from LLaVA-Bench files (``questions.jsonl``: question_id, image, text,
    category; ``context.jsonl``: image, caption; the reference answers: question_id, text).
    Add each item's ``answer`` (:func:`answer_questions`) before :meth:`VLMJudge.judge`."""
    context = {c["image"]: c["caption"] for c in _jsonl(contexts)}
    refs = {r["question_id"]: r["text"] for r in _jsonl(references)}
    items = []
    for q in _jsonl(questions):
        if q["question_id"] not in refs or q.get("image") not in context:
            raise ValueError(f"question {q['question_id']} has no reference answer or no context")
        items.append({"id": str(q["question_id"]), "question": q["text"], "image": q.get("image"),
                      "context": context[q["image"]], "reference": refs[q["question_id"]],
                      "category": q.get("category", "all")})
    return items


def answer_questions(chat, items: Sequence[dict], *, image_dir: str | Path | None = None) -> list[dict]:
    """Items with the model's ``answer``: one fresh conversation per question, its image attached.

    Args:
        chat: a :class:`mmllm.chat.ChatSession` over the model (greedy for reproducible scores).
        items: dicts with ``question`` and optionally ``image`` (a file under ``image_dir``).
    """
    out = []
    for it in items:
        chat.reset()
        if it.get("image"):
            chat.attach_image(str(Path(image_dir or ".") / it["image"]))
        out.append({**it, "answer": chat.reply(it["question"])})
    return out


# -------------------------------------------------------------------------- caption metrics
_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
          "--", "...", ";"}


def simple_tokenize(text: str) -> str:
    """Lower-cased words with COCO's punctuation removed (PTB tokenisation without Java)."""
    words = re.findall(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]+", text.lower())
    return " ".join(w for w in words if w not in _PUNCT and not re.fullmatch(r"[^\w]+", w))


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], *,
                    tokenizer: str = "auto") -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr of predicted captions against reference captions.

    Args:
        predictions: image id -> the model's caption.
        references: image id -> its reference captions (every predicted id needs references).
        tokenizer: "ptb" (COCO's Stanford PTB tokenizer, needs Java), "simple" (Python), or
            "auto" (ptb when ``java`` is on PATH).

    Returns:
        ``{"BLEU-1", ..., "BLEU-4", "CIDEr"}`` (CIDEr as pycocoevalcap reports it, x10 scale).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        raise ValueError("no predictions to score")
    missing = [k for k in predictions if not references.get(k)]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references, e.g. {missing[:3]}")
    keys = sorted(predictions)
    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "simple"
    if tokenizer == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        ptb = PTBTokenizer()
        res = ptb.tokenize({k: [{"caption": predictions[k]}] for k in keys})
        gts = ptb.tokenize({k: [{"caption": c} for c in references[k]] for k in keys})
    elif tokenizer == "simple":
        res = {k: [simple_tokenize(predictions[k])] for k in keys}
        gts = {k: [simple_tokenize(c) for c in references[k]] for k in keys}
    else:
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = float(cider)
    return out
