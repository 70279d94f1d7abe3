"""Perplexity tasks: token perplexity, bits per byte and word perplexity of held-out text."""

from __future__ import annotations

from mmllm.eval.perplexity import summarize
from mmllm.eval.runner import ModelRunner
from mmllm.eval.tasks.base import Task, TaskResult


class PerplexityTask(Task):
    """Rolling log-likelihood of documents (one ``text`` field each, see ``formats.text``).

    Args:
        stride: tokens predicted per window after the first (None: the context length,
            lm-eval's disjoint windows; smaller: more context per prediction).
        **kwargs: see :class:`Task` (no template needed).
    """

    def __init__(self, *, stride: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stride = stride

    def run(self, runner: ModelRunner, *, limit: int | None = None,
            num_fewshot: int | None = None) -> TaskResult:
        """Scores every document; returns pooled perplexities (see :class:`PerplexityResult`)."""
        texts = [ex.fields["text"] for ex in self.examples(limit)]
        lls, counts = runner.loglikelihood_rolling(texts, stride=self.stride, return_counts=True)
        result = summarize(texts, [-x for x in lls], counts)
        samples = [{"text": t[:200], "nll": -ll, "tokens": n} for t, ll, n in zip(texts, lls, counts)]
        return TaskResult(name=self.name, metrics=result.metrics(), n=len(texts), samples=samples)
