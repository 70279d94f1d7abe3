"""Generative tasks: generate, extract the answer, compare with the references."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mmllm.eval.metrics import exact_match, first_line, normalize_answer, normalized_match, token_f1
from mmllm.eval.runner import ModelRunner
from mmllm.eval.tasks.base import Task, TaskResult, mean_and_stderr
from mmllm.eval.templates import Example, Verbalizer

METRICS = ("exact_match", "normalized_match", "f1")


class GenerativeTask(Task):
    """Greedy (or sampled) generation scored by exact / normalised match and token F1.

    Args:
        extract: generation -> answer string (``metrics.extract_last_number`` for GSM8K's
            ``####`` / last number, ``metrics.extract_boxed`` for MATH, ``metrics.first_line``
            for short-answer QA); passed from YAML with ``_partial_: true``.
        normalize: the normalisation of ``normalized_match`` (default SQuAD's).
        metrics: any of ``exact_match``, ``normalized_match``, ``f1``.
        stop: strings that end a generation.
        max_new_tokens: generation budget.
        temperature: 0 for greedy.
        demo_field: example field holding a demonstration's answer (GSM8K's worked solution
            ``target``); None uses the first reference answer.
        verbalizer: for classification by generation: label -> word; the extracted answer is
            mapped back to a label and compared with the gold label.
        **kwargs: see :class:`Task`.
    """

    def __init__(self, *, extract: Callable[[str], str] = first_line,
                 normalize: Callable[[str], str] = normalize_answer,
                 metrics: Sequence[str] = ("exact_match", "normalized_match"),
                 stop: Sequence[str] = ("\n\n",), max_new_tokens: int = 64, temperature: float = 0.0,
                 demo_field: str | None = None, verbalizer: dict[str, str] | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        unknown = set(metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}: expected some of {METRICS}")
        if self.template is None:
            raise ValueError(f"generative task {self.name} needs a template")
        self.extract, self.normalize, self.metric_names = extract, normalize, list(metrics)
        self.stop, self.max_new_tokens, self.temperature = list(stop), max_new_tokens, temperature
        self.demo_field = demo_field
        self.verbalizer = Verbalizer(verbalizer) if verbalizer else None

    def references(self, example: Example) -> list[str]:
        """Correct answers (the gold label when a verbalizer maps answers to labels)."""
        if self.verbalizer is not None:
            return [example.labels[example.gold]]
        return example.answers

    def demo_answer(self, example: Example) -> str:
        if self.demo_field is not None:
            return example.fields[self.demo_field]
        if self.verbalizer is not None:
            return self.verbalizer.mapping[example.labels[example.gold]]
        return example.answers[0]

    def score(self, prediction: str, refs: Sequence[str]) -> dict[str, float]:
        """The configured metrics of one prediction."""
        out = {}
        if "exact_match" in self.metric_names:
            out["exact_match"] = exact_match(prediction, refs)
        if "normalized_match" in self.metric_names:
            out["normalized_match"] = normalized_match(prediction, refs, self.normalize)
        if "f1" in self.metric_names:
            out["f1"] = token_f1(prediction, refs)
        return out

    def run(self, runner: ModelRunner, *, limit: int | None = None,
            num_fewshot: int | None = None) -> TaskResult:
        """Generates for every example, extracts and scores the answers."""
        examples = self.examples(limit)
        # "Answer: " -> "Answer:": the model writes the space itself (tokenisation of " 42").
        prompts = [c.rstrip(" ") for c in self.contexts(examples, num_fewshot)]
        gens = runner.generate(prompts, max_new_tokens=self.max_new_tokens, stop=self.stop,
                               temperature=self.temperature, seed=self.seed)
        per_metric: dict[str, list[float]] = {m: [] for m in self.metric_names}
        samples = []
        for ex, prompt, gen in zip(examples, prompts, gens):
            pred = self.extract(gen)
            if self.verbalizer is not None:
                pred = self.verbalizer.label_of(pred) or pred
            refs = self.references(ex)
            scores = self.score(pred, refs)
            for k, v in scores.items():
                per_metric[k].append(v)
            samples.append({"prompt": prompt, "generation": gen, "prediction": pred,
                            "references": refs, **scores})
        metrics: dict[str, float] = {}
        for k, vals in per_metric.items():
            metrics.update(mean_and_stderr(k, vals))
        return TaskResult(name=self.name, metrics=metrics, n=len(examples), samples=samples)
