"""Prompt templates with ``[X]`` / ``[Z]`` slots, k-shot demonstrations and verbalisers.

A template is a string with an input slot ``[X]`` and an answer slot ``[Z]`` (the notation of Liu et
al., "Pre-train, Prompt, and Predict"). ``[Z]`` at the end makes a *prefix* prompt
(``"Question: [X]\\nAnswer: [Z]"``); text after it makes a *cloze* prompt
(``"[X] Overall, it was a [Z] movie."``). Other slots ``[name]`` are filled from the example's
fields (``"[passage]\\nQuestion: [question]?\\nAnswer: [Z]"``); a bracketed name that is neither
``X``, ``Z`` nor a field stays as written (MBPP's ``[BEGIN]``). Slots are filled in one pass, so
text inside a field that looks like a slot is never substituted.

k-shot prompts are ``description + demo_1 + delim + ... + demo_k + delim + query``, each demo the
template filled with a train example and its verbalised gold answer, exactly the layout of
lm-eval (``fewshot_delimiter`` ``"\\n\\n"``).
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
_SLOT = re.compile(r"\[([A-Za-z_][A-Za-z0-9_]*)\]")


@dataclass
class Example:
    """One evaluation example in a task-independent form (what the format converters return).

    Attributes:
        fields: template slot values; ``"X"`` is the main input.
        choices: answer texts of a multiple-choice example (what fills ``[Z]`` by default).
        labels: the task's label for each choice (``"A"``, ``"true"``, ``"positive"``); defaults to
            the choices themselves.
        gold: index of the correct choice (multiple choice), else None.
        answers: reference answers of a generative example (any of them counts as correct).
        meta: anything else (code tests, the entry point, the source record's id).
    """

    fields: dict[str, str]
    choices: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    gold: int | None = None
    answers: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.choices and not self.labels:
            self.labels = list(self.choices)
        if len(self.labels) != len(self.choices):
            raise ValueError(f"{len(self.choices)} choices but {len(self.labels)} labels")
        if self.gold is not None and not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} out of range for {len(self.choices)} choices")


class Template:
    """A prompt template with ``[X]``, ``[Z]`` and named field slots.

    Args:
        text: the template; must contain ``[Z]`` exactly once.
    """

    def __init__(self, text: str) -> None:
        if text.count("[Z]") != 1:
            raise ValueError(f"a template needs exactly one answer slot [Z], got {text!r}")
        self.text = text
        self.before, self.after = text.split("[Z]")
        self._warned: set[str] = set()

    @property
    def is_cloze(self) -> bool:
        """True when text follows the answer slot (cloze); False for a prefix prompt."""
        return bool(self.after.strip())

    def fill(self, text: str, fields: Mapping[str, str]) -> str:
        def repl(m: re.Match) -> str:
            name = m.group(1)
            if name in fields:
                return str(fields[name])
            if name not in self._warned:
                self._warned.add(name)
                log.debug("template slot [%s] has no field; kept as written", name)
            return m.group(0)
        return _SLOT.sub(repl, text)

    def context(self, fields: Mapping[str, str]) -> str:
        """The filled text before ``[Z]``."""
        return self.fill(self.before, fields)

    def suffix(self, fields: Mapping[str, str]) -> str:
        """The filled text after ``[Z]`` ("" for prefix prompts and whitespace-only tails)."""
        return self.fill(self.after, fields) if self.is_cloze else ""

    def render(self, fields: Mapping[str, str], answer: str) -> str:
        """The whole filled template with ``answer`` in ``[Z]`` (a demonstration)."""
        return self.context(fields) + answer + self.fill(self.after, fields)


class Verbalizer:
    """Maps task labels to the words that fill ``[Z]`` and predicted words back to labels.

    Args:
        mapping: label -> word, e.g. ``{"positive": "great", "negative": "terrible"}``; None
            means the identity (the example's choice texts are used).
    """

    def __init__(self, mapping: Mapping[str, str] | None = None) -> None:
        self.mapping = dict(mapping or {})
        self.inverse = {_norm(v): k for k, v in self.mapping.items()}
        if len(self.inverse) != len(self.mapping):
            raise ValueError(f"verbalizer words must be distinct: {self.mapping}")

    def words(self, example: Example, *, use_labels: bool = False) -> list[str]:
        """The ``[Z]`` text of every choice of ``example``.

        Args:
            example: a multiple-choice example.
            use_labels: fill ``[Z]`` with the labels (MMLU's letters) instead of the choice texts.
        """
        if self.mapping:
            missing = [lab for lab in example.labels if lab not in self.mapping]
            if missing:
                raise KeyError(f"verbalizer has no word for labels {missing} (has {list(self.mapping)})")
            return [self.mapping[lab] for lab in example.labels]
        return list(example.labels if use_labels else example.choices)

    def label_of(self, text: str) -> str | None:
        """The label whose word matches ``text`` (case/space/punctuation-insensitive), else None."""
        if not self.mapping:
            return None
        return self.inverse.get(_norm(text))


def _norm(text: str) -> str:
    return re.sub(r"[^\w]+", " ", text.lower()).strip()


def sample_demos(pool: Sequence[Example], k: int, *, seed: int, exclude: Example | None = None,
                 sampler: str = "random") -> list[Example]:
    """Draws ``k`` demonstrations from ``pool`` (a train split).

    Args:
        pool: candidate demonstrations.
        k: how many.
        seed: the random seed (the same query gets the same demos across runs).
        exclude: the query itself, never used as its own demonstration.
        sampler: ``"random"`` (seeded sample) or ``"first"`` (the first k, as lm-eval's first_n).

    Returns:
        The demonstrations, in prompt order.
    """
    if k == 0:
        return []
    candidates = [d for d in pool if d is not exclude and d != exclude]
    if len(candidates) < k:
        raise ValueError(f"{k}-shot needs {k} demonstrations but the pool has {len(candidates)}")
    if sampler == "first":
        return candidates[:k]
    if sampler != "random":
        raise ValueError(f"unknown sampler {sampler!r}: expected 'random' or 'first'")
    return random.Random(seed).sample(candidates, k)


def fewshot_context(template: Template, query: Example, demos: Sequence[Example],
                    demo_answer, *, delimiter: str = "\n\n", description: str = "") -> str:
    """The prompt text before the query's ``[Z]``: description, demonstrations, query context.

    Args:
        template: the task template.
        query: the example being asked.
        demos: demonstrations (see :func:`sample_demos`).
        demo_answer: ``example -> str`` giving a demonstration's verbalised gold answer.
        delimiter: between demonstrations and before the query.
        description: text placed first; its slots are filled from the query's fields
            (``"The following are questions about [subject].\\n\\n"``).

    Returns:
        The context string; the answer slot's continuation is scored or generated after it.
    """
    shots = "".join(template.render(d.fields, demo_answer(d)) + delimiter for d in demos)
    return template.fill(description, query.fields) + shots + template.context(query.fields)
