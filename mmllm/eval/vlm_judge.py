"""Vision-language evaluation: a LLaVA-Bench style judge through a teacher, and caption metrics.

The judge (:class:`VLMJudge`) follows LLaVA-Bench: a text-only teacher sees the image as its
symbolic context (captions, boxes), the question, a reference answer and the model's answer,
and scores each 1-10 for helpfulness, relevance, accuracy and level of detail with an
explanation. The reported number is the *relative score*, mean(model) / mean(reference) x 100,
overall and per category (conversation, detail, complex reasoning). Judges favour the answer
shown first, so by default each item is judged in both orders and the scores averaged. Replies
are parsed robustly ("8 7", "8, 7", "Assistant 1: 8/10 ... Assistant 2: 7"); an unparseable or
failed reply is counted, never scored.

``scoring="logprob"`` (G-Eval) reads the judge's token probabilities instead of its text, so it
works with any teacher that has :meth:`~mmllm.teacher.Teacher.option_logprobs`, even a tiny one
whose replies never parse: each answer's score is the probability-weighted expected score over
the options "1".."10", asked in its own request (the same two-answer prompt, ending by asking
for Assistant k's score alone), so an order judged costs two requests.

Caption metrics (:func:`caption_metrics`): BLEU-1..4 and CIDEr with ``pycocoevalcap``'s scorers,
over COCO's PTB tokenisation (needs Java) or the same lower-casing and punctuation removal in
Python.
"""

from __future__ import annotations

import json
import logging
import math
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

SCORE_INSTRUCTION = (
    "Please rate Assistant {k}'s answer to the user question above. The user asked the question "
    "while looking at an image; you cannot see it, so its content is given to you as the text "
    "description in [Context]. Rate it for helpfulness, relevance, accuracy and level of detail, "
    "as one overall score from 1 to 10 (higher is better), without letting the order of the "
    "answers affect your judgment. Output only the score, a number from 1 to 10.")
SCORE_OPTIONS = tuple(str(s) for s in range(1, 11))


def expected_score(logprobs: Mapping[str, float] | None) -> float | None:
    """G-Eval's score: ``sum_s P(s) * s`` over score options (``{"1": logprob, ...}``), None for None."""
    if logprobs is None:
        return None
    probs = {float(k): math.exp(v) for k, v in logprobs.items()}
    return sum(k * p for k, p in probs.items()) / sum(probs.values())


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


def judge_prompt(*, context: str, question: str, first: str, second: str,
                 instruction: str = JUDGE_INSTRUCTION) -> list[dict]:
    """The judge conversation for two answers shown as Assistant 1 and 2."""
    content = (f"[Context]\n{context}\n\n[Question]\n{question}\n\n"
               f"[Assistant 1]\n{first}\n\n[End of Assistant 1]\n\n"
               f"[Assistant 2]\n{second}\n\n[End of Assistant 2]\n\n[System]\n{instruction}")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


class VLMJudge:
    """LLaVA-Bench style scoring of a model's answers against reference answers.

    Args:
        teacher: a :class:`mmllm.teacher.Teacher` (a strong text model: GPT-4-class in LLaVA).
            Use ``on_error="skip"`` to count failed requests instead of raising.
        both_orders: judge every item with the reference first and with the model first, and
            average (cancels the judge's position bias; twice the requests).
        sampling: the judge's sampling params (low temperature: scores should be stable);
            unused by logprob scoring.
        scoring: ``text`` (parse the two scores from the reply) or ``logprob`` (G-Eval: each
            score the expected value over "1".."10" under ``teacher.option_logprobs``).
    """

    def __init__(self, *, teacher, both_orders: bool = True, sampling: Mapping | None = None,
                 scoring: str = "text") -> None:
        if scoring not in ("text", "logprob"):
            raise ValueError(f"scoring must be 'text' or 'logprob', got {scoring!r}")
        self.teacher, self.both_orders, self.scoring = teacher, both_orders, scoring
        self.sampling = dict(sampling if sampling is not None else {"temperature": 0.2, "max_tokens": 1024})

    def judge(self, items: Sequence[Mapping]) -> list[JudgedItem]:
        """Scores items ``{"id", "question", "answer", "reference", "context", "category"?}``
        (``context``: the image's captions / boxes as text)."""
        owners = []  # (item index, model shown first?, first answer, second answer)
        for i, it in enumerate(items):
            for model_first in ((False, True) if self.both_orders else (False,)):
                first, second = (it["answer"], it["reference"]) if model_first else (it["reference"], it["answer"])
                owners.append((i, model_first, first, second))
        prompt = lambda i, a, b, **kw: judge_prompt(
            context=items[i].get("context", ""), question=items[i]["question"], first=a, second=b, **kw)
        if self.scoring == "logprob":
            requests = [prompt(i, a, b, instruction=SCORE_INSTRUCTION.format(k=k))
                        for i, _, a, b in owners for k in (1, 2)]
            lps = self.teacher.option_logprobs(requests, SCORE_OPTIONS, desc="vlm judge") if requests else []
            pairs = [(expected_score(lps[2 * j]), expected_score(lps[2 * j + 1])) for j in range(len(owners))]
            parsed = [None if None in p else p for p in pairs]
            notes = [None if p is None else f"expected scores over 1-10 from the judge's token "
                     f"probabilities: Assistant 1 {p[0]:.3f}, Assistant 2 {p[1]:.3f}" for p in parsed]
        else:
            requests = [prompt(i, a, b) for i, _, a, b in owners]
            notes = self.teacher.chat_many(requests, desc="vlm judge", **self.sampling)
            parsed = [parse_scores(r) for r in notes]
            notes = [r.strip().split("\n", 1)[-1].strip() if p else r for r, p in zip(notes, parsed)]
        return self._collect(items, [(i, mf) for i, mf, _, _ in owners], parsed, notes)

    @staticmethod
    def _collect(items: Sequence[Mapping], owners: list[tuple[int, bool]],
                 parsed: Sequence[tuple[float, float] | None], notes: Sequence[str | None]) -> list[JudgedItem]:
        """Per item, the model and reference scores averaged over the orders scored.

        Args:
            owners: per request, (item index, model answer shown first?).
            parsed: per request, (Assistant 1 score, Assistant 2 score), None when unscored.
            notes: per request, the explanation kept (or the raw reply when unscored).
        """
        scores: dict[int, list[tuple[float, float]]] = defaultdict(list)
        out = [JudgedItem(id=str(it.get("id", i)), category=str(it.get("category", "all")))
               for i, it in enumerate(items)]
        for (i, model_first), pair, note in zip(owners, parsed, notes):
            if pair is None:
                out[i].failures += 1
                log.warning("judge reply for %s not scored: %r", out[i].id, (note or "")[:120])
                continue
            ref, model = (pair[1], pair[0]) if model_first else pair
            scores[i].append((model, ref))
            out[i].explanations.append(note)
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
