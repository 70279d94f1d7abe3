"""Task: examples + a prompt template + k-shot demonstrations -> metrics on a ModelRunner."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from mmllm.eval.data import TaskData
from mmllm.eval.runner import ModelRunner
from mmllm.eval.templates import Example, Template, fewshot_context, sample_demos


@dataclass
class TaskResult:
    """What a task run produced.

    Attributes:
        name: the task's name.
        metrics: metric name -> value (means over examples; ``*_stderr`` standard errors).
        n: examples evaluated.
        samples: one record per example (prompt, prediction, reference, scores).
    """

    name: str
    metrics: dict[str, float]
    n: int
    samples: list[dict] = field(default_factory=list)


def mean_and_stderr(name: str, values: Sequence[float]) -> dict[str, float]:
    """``{name: mean, name_stderr: sample std / sqrt(n)}`` (lm-eval's mean_stderr)."""
    n = len(values)
    mu = sum(values) / n if n else float("nan")
    var = sum((v - mu) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return {name: mu, f"{name}_stderr": math.sqrt(var / n) if n else float("nan")}


class Task:
    """Base class of evaluation tasks.

    Args:
        name: the task's name (report key).
        data: where its examples come from.
        template: prompt template with ``[X]``/field slots and one ``[Z]`` (see ``templates``).
        num_fewshot: demonstrations drawn from ``data.train_split`` before each query.
        fewshot_sampler: ``"random"`` (seeded per example) or ``"first"`` (lm-eval's first_n).
        fewshot_delimiter: between demonstrations and before the query.
        description: text placed before the demonstrations.
        limit: evaluate only the first ``limit`` examples (None: all).
        seed: seed of the demonstration sampling.
    """

    def __init__(self, *, name: str, data: TaskData, template: str | None = None, num_fewshot: int = 0,
                 fewshot_sampler: str = "random", fewshot_delimiter: str = "\n\n",
                 description: str = "", limit: int | None = None, seed: int = 1234) -> None:
        if num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
        self.name, self.data = name, data
        self.template = Template(template) if template is not None else None
        self.num_fewshot, self.fewshot_sampler = num_fewshot, fewshot_sampler
        self.fewshot_delimiter, self.description = fewshot_delimiter, description
        self.limit, self.seed = limit, seed

    def examples(self, limit: int | None = None) -> list[Example]:
        """The evaluation examples (the first ``limit`` of them)."""
        limit = self.limit if limit is None else limit
        exs = self.data.examples()
        return exs[:limit] if limit is not None else exs

    def demo_answer(self, example: Example) -> str:
        """The ``[Z]`` text of a demonstration (its gold answer); subclasses define it."""
        raise NotImplementedError

    def contexts(self, examples: Sequence[Example], num_fewshot: int | None = None) -> list[str]:
        """Prompt text before ``[Z]`` of every example, k-shot demonstrations included."""
        if self.template is None:
            raise ValueError(f"task {self.name} has no template")
        k = self.num_fewshot if num_fewshot is None else num_fewshot
        pool = self.data.train_examples() if k else []
        out = []
        for i, ex in enumerate(examples):
            demos = sample_demos(pool, k, seed=self.seed + i, exclude=ex, sampler=self.fewshot_sampler)
            out.append(fewshot_context(self.template, ex, demos, self.demo_answer,
                                       delimiter=self.fewshot_delimiter, description=self.description))
        return out

    def run(self, runner: ModelRunner, *, limit: int | None = None,
            num_fewshot: int | None = None) -> TaskResult:
        """Evaluates ``runner``'s model; subclasses implement it."""
        raise NotImplementedError
