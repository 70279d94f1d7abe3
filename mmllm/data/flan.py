"""FLAN-style instruction data from the eval stage's task formats.

Benchmark records are read and converted exactly as the eval stage reads them
(:class:`mmllm.eval.data.TaskData` with a converter of :mod:`mmllm.eval.formats`), then phrased as
instructions with one of several templates per task kind (FLAN, Wei et al. 2022; Chung et al.
2022): zero- or few-shot (demonstrations inline in the prompt, as FLAN, or as earlier
unsupervised turns), with a chain-of-thought rationale (GSM8K's worked solutions, MATH's
solutions) or the bare answer. Tasks are mixed examples-proportionally with a per-task cap
(:func:`examples_proportional`): a task of n examples weighs ``min(n, cap)``.

Kinds and the :class:`~mmllm.eval.templates.Example` fields they use:
    ``multiple_choice``  question (or X), choices, gold; optional context (article/passage)
    ``yes_no``           passage, question, gold over choices ("no", "yes") (BoolQ)
    ``qa``               question, answers (closed-book: Natural Questions, TriviaQA)
    ``reading_qa``       context, question, answers (extractive: TyDiQA, SQuAD)
    ``math``             question (or problem), answers; rationale/solution for CoT
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from mmllm.eval.data import TaskData
from mmllm.eval.formats import LETTERS
from mmllm.eval.templates import Example

# (user template, assistant template); fields in braces, see _fields().
TEMPLATES: dict[str, list[tuple[str, str]]] = {
    "multiple_choice": [
        ("{question}\n\n{options}\n\nAnswer with the letter of the correct option.", "{letter}"),
        ("Question: {question}\nOptions:\n{options}\nWhich option is correct?", "{letter}. {answer}"),
        ("Choose the best answer.\n\n{question}\n{options}", "The answer is {letter}. {answer}"),
        ("{question}\nPick one of the following:\n{options}", "{answer}"),
        (("Read the question and select the right answer from the choices.\n\n"
          "Question: {question}\nChoices:\n{options}"), "{letter}"),
        ("Here is a multiple-choice question.\n{question}\n\n{options}\n\nWhat is the answer?",
         "{letter}. {answer}"),
    ],
    "yes_no": [
        ("{passage}\n\nBased on the passage above, {question}? Answer yes or no.", "{answer}"),
        (("Read the text and answer the question with yes or no.\n\nText: {passage}\n"
          "Question: {question}?"), "{answer}"),
        ("Passage: {passage}\n\nIs it true that {question}?", "{Answer}."),
        ("{passage}\n\nCan we conclude from this that the answer to \"{question}?\" is yes?",
         "{Answer}."),
        ("Does the following passage answer the question \"{question}?\" with a yes?\n\n{passage}",
         "{answer}"),
    ],
    "qa": [
        ("{question}", "{answer}"),
        ("Answer the following question.\n{question}", "{answer}"),
        ("Question: {question}\nAnswer:", "{answer}"),
        ("Please answer this trivia question: {question}", "The answer is {answer}."),
        ("Q: {question}\nGive a short answer.", "{answer}"),
        ("What is the answer to this question? {question}", "{answer}"),
    ],
    "reading_qa": [
        ("{context}\n\nAnswer the question based on the text above: {question}", "{answer}"),
        ("Read the passage and answer the question.\n\nPassage: {context}\nQuestion: {question}",
         "{answer}"),
        ("Context: {context}\n\nQ: {question}\nA:", "{answer}"),
        ("{question}\n\nFind the answer in this text:\n{context}", "{answer}"),
        ("Extract the answer to \"{question}\" from the following paragraph.\n\n{context}",
         "{answer}"),
    ],
    "math": [
        ("{question}", "{answer}"),
        ("Solve the following math problem. Give only the final answer.\n\n{question}", "{answer}"),
        ("Question: {question}\nAnswer:", "{answer}"),
        ("Compute the answer to this word problem: {question}", "The answer is {answer}."),
        ("{question}\nWhat is the final numerical answer?", "{answer}"),
    ],
    "math_cot": [
        ("{question}\nLet's think step by step.", "{rationale}\nThe answer is {answer}."),
        ("Solve the following problem, showing your reasoning.\n\n{question}",
         "{rationale}\nThe answer is {answer}."),
        ("Question: {question}\nExplain your solution step by step, then state the answer.",
         "{rationale}\nSo the answer is {answer}."),
        ("{question}\n\nWork it out carefully before answering.", "{rationale}\nFinal answer: {answer}"),
        ("Answer this word problem. Reason through it first.\n{question}",
         "{rationale}\nTherefore, the answer is {answer}."),
    ],
}
KINDS = ("multiple_choice", "yes_no", "qa", "reading_qa", "math")
FEWSHOT_FORMATS = ("inline", "multi_turn")
_CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def _fields(ex: Example, kind: str) -> dict[str, str] | None:
    """Template fields of an example, or None when it lacks what ``kind`` needs."""
    f = ex.fields
    question = f.get("question") or f.get("problem") or f.get("X") or ""
    out = {"question": question.strip(), "passage": f.get("passage", ""),
           "context": f.get("context") or f.get("passage") or f.get("article") or ""}
    if kind in ("multiple_choice", "yes_no"):
        if ex.gold is None:
            return None
        out["options"] = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices))
        out["letter"], out["answer"] = LETTERS[ex.gold], ex.choices[ex.gold]
        out["Answer"] = out["answer"].capitalize()
        return out
    if not ex.answers:
        return None
    out["answer"] = ex.answers[0]
    rationale = f.get("rationale") or f.get("solution") or ""
    out["rationale"] = _CALCULATOR.sub("", rationale).strip()
    return out


class FlanTask:
    """One benchmark's training split phrased as instructions.

    Args:
        name: the task's name (its source name in statistics and mixing).
        kind: one of :data:`KINDS`.
        data: where the records come from (the eval stage's :class:`TaskData`).
        split: which split to convert (a train split: never train on what you evaluate).
        cot: answer with the rationale (``math`` only; examples without one are skipped).
        num_fewshot: shot counts drawn uniformly per example, e.g. ``[0, 3]`` mixes zero- and
            3-shot prompts; demonstrations come from the same split, never the example itself.
        fewshot_format: "inline" (demonstrations inside the user turn, as FLAN) or
            "multi_turn" (earlier user/assistant turns, not supervised).
        templates: indices into the kind's template list (default: all).
        limit: convert at most this many records' examples.
        seed: seed of the template / shot / demonstration choices.
    """

    def __init__(self, *, name: str, kind: str, data: TaskData, split: str = "train",
                 cot: bool = False, num_fewshot: Sequence[int] = (0,), fewshot_format: str = "inline",
                 templates: Sequence[int] | None = None, limit: int | None = None,
                 seed: int = 1234) -> None:
        if kind not in KINDS:
            raise ValueError(f"task {name}: unknown kind {kind!r}; expected one of {KINDS}")
        if cot and kind != "math":
            raise ValueError(f"task {name}: cot=True needs kind 'math' (rationales), got {kind!r}")
        if fewshot_format not in FEWSHOT_FORMATS:
            raise ValueError(f"task {name}: fewshot_format must be one of {FEWSHOT_FORMATS}")
        self.name, self.kind, self.data, self.split = name, kind, data, split
        self.cot, self.fewshot_format, self.limit, self.seed = cot, fewshot_format, limit, seed
        self.num_fewshot = [int(k) for k in num_fewshot]
        if not self.num_fewshot or min(self.num_fewshot) < 0:
            raise ValueError(f"task {name}: num_fewshot must be non-negative counts, got {num_fewshot}")
        pool = TEMPLATES["math_cot" if cot else kind]
        self.templates = [pool[i] for i in (range(len(pool)) if templates is None else templates)]
        self.skipped = 0

    def rows(self) -> list[dict]:
        """The instruction examples: ``{"messages", "source", "template", "shots", "cot"}`` dicts."""
        examples = self.data.examples(self.split)[:self.limit]
        usable = [(ex, f) for ex in examples if (f := _fields(ex, self.kind)) is not None
                  and (f.get("rationale") or not self.cot)]
        self.skipped = len(examples) - len(usable)
        rng = random.Random(self.seed)
        out = []
        for i, (_, fields) in enumerate(usable):
            t = rng.randrange(len(self.templates))
            k = min(rng.choice(self.num_fewshot), len(usable) - 1)
            demos = [usable[j][1] for j in rng.sample([j for j in range(len(usable)) if j != i], k)]
            out.append({"messages": self._messages(self.templates[t], fields, demos),
                        "source": self.name, "template": t, "shots": k, "cot": self.cot})
        return out

    def _messages(self, template: tuple[str, str], query: dict, demos: list[dict]) -> list[dict]:
        user_t, answer_t = template

        def user(f: dict) -> str:
            text = user_t.format_map(f)
            # Multiple-choice templates do not name the context: it goes first when there is one.
            if self.kind == "multiple_choice" and f["context"]:
                text = f"{f['context']}\n\n{text}"
            return text

        if self.fewshot_format == "inline":
            shots = "".join(f"{user(d)}\n{answer_t.format_map(d)}\n\n" for d in demos)
            return [{"role": "user", "content": shots + user(query)},
                    {"role": "assistant", "content": answer_t.format_map(query)}]
        turns = []
        for d in demos:
            turns += [{"role": "user", "content": user(d)},
                      {"role": "assistant", "content": answer_t.format_map(d), "train": False}]
        return turns + [{"role": "user", "content": user(query)},
                        {"role": "assistant", "content": answer_t.format_map(query)}]


def examples_proportional(sizes: Sequence[int], cap: int | None) -> list[float]:
    """FLAN's examples-proportional mixing rates: task i weighs ``min(n_i, cap)``."""
    capped = [min(n, cap) if cap is not None else n for n in sizes]
    total = sum(capped)
    if total <= 0:
        raise ValueError(f"no examples to mix (sizes {list(sizes)})")
    return [c / total for c in capped]


def mix_counts(sizes: Sequence[int], *, cap: int | None, num_examples: int | None = None) -> list[int]:
    """Examples drawn per task: ``min(n_i, cap)`` each (one pass over the capped mixture), or
    ``num_examples`` split by the mixing rates (largest remainder; above n_i a task repeats)."""
    if num_examples is None:
        return [min(n, cap) if cap is not None else n for n in sizes]
    rates = examples_proportional(sizes, cap)
    raw = [r * num_examples for r in rates]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[:num_examples - sum(counts)]:
        counts[i] += 1
    return counts


def mix_rows(pools: dict[str, list], *, cap: int | None, num_examples: int | None = None,
             seed: int = 1234) -> list:
    """Rows of several sources mixed by :func:`mix_counts` and shuffled (seeded).

    A source drawn ``c`` times takes ``c`` rows of successive seeded permutations of its pool
    (without replacement within a pass)."""
    names = list(pools)
    counts = mix_counts([len(pools[n]) for n in names], cap=cap, num_examples=num_examples)
    rng = random.Random(seed)
    out = []
    for name, c in zip(names, counts):
        pool = pools[name]
        while c > 0 and pool:
            order = rng.sample(range(len(pool)), len(pool))
            out += [pool[j] for j in order[:c]]
            c -= len(order)
    rng.shuffle(out)
    return out
