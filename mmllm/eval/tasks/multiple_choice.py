"""Multiple choice by log-likelihood: acc and length-normalised acc_norm (lm-eval's definitions)."""

from __future__ import annotations

from mmllm.eval.metrics import multiple_choice_scores
from mmllm.eval.runner import ModelRunner
from mmllm.eval.tasks.base import Task, TaskResult, mean_and_stderr
from mmllm.eval.templates import Example, Verbalizer


class MultipleChoiceTask(Task):
    """Scores every choice's continuation; the most likely one is the prediction.

    For a prefix template the scored continuation of a choice is its ``[Z]`` text; for a cloze
    template it is ``[Z]`` plus the text after it (conditioned on the choice), or, with
    ``score_suffix_only``, only the text after it with the choice moved into the context (partial
    scoring, WinoGrande). ``acc_norm`` divides by the characters of the ``[Z]`` text, as lm-eval.

    Args:
        verbalizer: label -> ``[Z]`` word (e.g. ``{"positive": "great"}``); predictions map back
            to labels through it. None: the choice texts (or labels, see ``score_labels``).
        score_labels: fill ``[Z]`` with the labels (MMLU letters) instead of the choice texts.
        score_suffix_only: partial scoring of cloze templates (see above).
        **kwargs: see :class:`Task`.
    """

    def __init__(self, *, verbalizer: dict[str, str] | None = None, score_labels: bool = False,
                 score_suffix_only: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.template is None:
            raise ValueError(f"multiple-choice task {self.name} needs a template")
        if score_suffix_only and not self.template.is_cloze:
            raise ValueError("score_suffix_only needs text after [Z] in the template")
        self.verbalizer = Verbalizer(verbalizer)
        self.score_labels, self.score_suffix_only = score_labels, score_suffix_only

    def words(self, example: Example) -> list[str]:
        """The ``[Z]`` text of every choice."""
        if example.gold is None:
            raise ValueError(f"task {self.name}: example without a gold choice: {example.fields}")
        return self.verbalizer.words(example, use_labels=self.score_labels)

    def demo_answer(self, example: Example) -> str:
        return self.words(example)[example.gold]

    def requests(self, context: str, example: Example) -> list[tuple[str, str]]:
        """``(context, continuation)`` of every choice."""
        after = self.template.suffix(example.fields)
        if self.score_suffix_only:
            return [(context + w, after) for w in self.words(example)]
        return [(context, w + after) for w in self.words(example)]

    def run(self, runner: ModelRunner, *, limit: int | None = None,
            num_fewshot: int | None = None) -> TaskResult:
        """Scores all choices of all examples in one batched call; returns acc and acc_norm."""
        examples = self.examples(limit)
        contexts = self.contexts(examples, num_fewshot)
        requests, spans = [], []
        for ctx, ex in zip(contexts, examples):
            reqs = self.requests(ctx, ex)
            spans.append((len(requests), len(requests) + len(reqs)))
            requests += reqs
        lls = [ll for ll, _ in runner.loglikelihood(requests)]
        accs, norms, samples = [], [], []
        for ex, ctx, (a, b) in zip(examples, contexts, spans):
            words = self.words(ex)
            s = multiple_choice_scores(lls[a:b], words, ex.gold)
            accs.append(s["acc"])
            norms.append(s["acc_norm"])
            samples.append({"context": ctx, "choices": words, "loglikelihoods": lls[a:b],
                            "gold": ex.gold, "gold_label": ex.labels[ex.gold],
                            "pred_label": ex.labels[s["pred"]],
                            "pred_norm_label": ex.labels[s["pred_norm"]],
                            "acc": s["acc"], "acc_norm": s["acc_norm"]})
        metrics = {**mean_and_stderr("acc", accs), **mean_and_stderr("acc_norm", norms)}
        return TaskResult(name=self.name, metrics=metrics, n=len(examples), samples=samples)
