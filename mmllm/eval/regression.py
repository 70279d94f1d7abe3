"""Regression check of a fine-tune: the eval suite before and after training, per-task differences.

Fine-tuning (SFT, RLHF) can cost the base model's abilities; this measures it. The same tasks run
on the model before the first step and after the last, and every metric's difference is written
as JSON and a markdown table, with a ``regressed`` flag where the metric got worse by more than
``tolerance`` (the direction of each metric is known: accuracies up, perplexities down).

Use :class:`RegressionCheck` as a training callback (``experiment=sft_*`` add it as
``callbacks.regression``), or :func:`suite_metrics` + :func:`compare` directly (the ``sft``
pipeline stage does).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L

from mmllm.eval.evaluator import evaluate
from mmllm.eval.tasks.base import Task

log = logging.getLogger(__name__)

# Metric-name parts of lower-is-better metrics; everything else (acc, exact_match, pass@k, f1) is
# higher-is-better. Counts (tokens, bytes, words) and standard errors are not compared.
LOWER_IS_BETTER = ("perplexity", "ppl", "bits_per_byte", "nll", "loss")
NOT_COMPARED = ("tokens", "bytes", "words")


def suite_metrics(model, tokenizer, tasks: Mapping[str, Task] | Sequence[Task], *,
                  limit: int | None = None, batch_size: int = 16) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of ``tasks`` (no stderr or counts), the model left as it was.

    Args:
        model: a DecoderLM (its train/eval mode is restored afterwards).
        tokenizer: its tokenizer.
        tasks: Task objects (or name -> Task, as Hydra instantiates them).
        limit: examples per task (None: each task's own).
        batch_size: rows per forward.
    """
    was_training = model.training
    try:
        report = evaluate(model, tokenizer, tasks, batch_size=batch_size, limit=limit, progress=False)
    finally:
        model.train(was_training)
    return {task: {k: float(v) for k, v in metrics.items()
                   if not k.endswith("_stderr") and k not in NOT_COMPARED}
            for task, metrics in report["results"].items()}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is an improvement (perplexities, bits per byte)."""
    return any(part in metric for part in LOWER_IS_BETTER)


def compare(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]], *,
            tolerance: float = 0.0) -> dict:
    """Per-task, per-metric differences.

    Args:
        before, after: :func:`suite_metrics` results.
        tolerance: a metric regressed when it got worse by more than this (absolute).

    Returns:
        ``{"tasks": {task: {metric: {"before", "after", "delta", "regressed"}}}, "regressed":
        ["task/metric", ...]}`` (``delta = after - before``; metrics in only one side are skipped).
    """
    tasks, regressed = {}, []
    for task, b_metrics in before.items():
        for metric, b in b_metrics.items():
            a = after.get(task, {}).get(metric)
            if a is None:
                continue
            delta = a - b
            worse = -delta if not lower_is_better(metric) else delta
            bad = bool(math.isfinite(worse) and worse > tolerance) or (math.isfinite(b) and not math.isfinite(a))
            tasks.setdefault(task, {})[metric] = {"before": b, "after": a, "delta": delta, "regressed": bad}
            if bad:
                regressed.append(f"{task}/{metric}")
    return {"tasks": tasks, "regressed": regressed, "tolerance": tolerance}


def format_diff(diff: dict) -> str:
    """A markdown table of :func:`compare`'s result (one row per task and metric)."""
    lines = ["| task | metric | before | after | delta | |", "|---|---|---:|---:|---:|---|"]
    for task, metrics in diff["tasks"].items():
        for metric, d in metrics.items():
            arrow = "lower is better" if lower_is_better(metric) else ""
            flag = "REGRESSED" if d["regressed"] else arrow
            lines.append(f"| {task} | {metric} | {d['before']:.4f} | {d['after']:.4f} | "
                         f"{d['delta']:+.4f} | {flag} |")
    return "\n".join(lines)


def write_diff(diff: dict, output_dir: str | Path, *, name: str = "regression") -> tuple[Path, Path]:
    """Writes ``<name>.json`` and ``<name>.md`` into ``output_dir``; returns both paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / f"{name}.json", out / f"{name}.md"

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return {k: clean(v) for k, v in x.items()} if isinstance(x, dict) else x

    js.write_text(json.dumps(clean(diff), indent=2))
    md.write_text(format_diff(diff) + "\n")
    return js, md


class RegressionCheck(L.Callback):
    """Evaluates ``tasks`` when ``fit`` starts and when it ends; writes and prints the differences.

    The model is ``pl_module.model``, the tokenizer the datamodule's (as
    :class:`mmllm.callbacks.eval_callback.EvalCallback`). Results: ``<output_dir>/regression.json``
    and ``regression.md``, :attr:`diff`, and ``regression/<task>/<metric>_delta`` in the loggers.

    Args:
        tasks: Task objects or name -> Task (e.g. the ``quick`` suite's capitals tasks).
        output_dir: where the JSON and table go (None: the trainer's ``default_root_dir``).
        limit: examples per task (keep it small: it runs twice per fit).
        batch_size: rows per forward.
        tolerance: absolute worsening that counts as a regression.
        fail_on_regression: raise at the end of fit when some metric regressed (CI gates).
    """

    def __init__(self, *, tasks: Mapping[str, Task] | Sequence[Task], output_dir: str | None = None,
                 limit: int | None = 32, batch_size: int = 16, tolerance: float = 0.0,
                 fail_on_regression: bool = False) -> None:
        super().__init__()
        self.tasks = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
        if not self.tasks:
            raise ValueError("RegressionCheck needs at least one task")
        self.output_dir, self.limit, self.batch_size = output_dir, limit, batch_size
        self.tolerance, self.fail_on_regression = tolerance, fail_on_regression
        self.before: dict | None = None
        self.diff: dict | None = None

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule else None
        if tokenizer is None:
            raise AttributeError("RegressionCheck needs the datamodule's tokenizer "
                                 "(trainer.datamodule.tokenizer)")
        model = getattr(pl_module, "model", pl_module)
        return suite_metrics(model, tokenizer, self.tasks, limit=self.limit, batch_size=self.batch_size)

    # Every rank evaluates (a sharded FSDP2/TP model needs all of them in each forward); rank 0
    # writes and prints.
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.before = self._metrics(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.before is None:
            return
        self.diff = compare(self.before, self._metrics(trainer, pl_module), tolerance=self.tolerance)
        self.diff["step"] = trainer.global_step
        if not trainer.is_global_zero:
            return
        js, _ = write_diff(self.diff, self.output_dir or trainer.default_root_dir)
        print(f"\nregression check (before -> after {trainer.global_step} steps):\n"
              f"{format_diff(self.diff)}\nwritten to {js}")
        flat = {f"regression/{t}/{m}_delta": d["delta"] for t, ms in self.diff["tasks"].items()
                for m, d in ms.items()}
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        if self.fail_on_regression and self.diff["regressed"]:
            raise RuntimeError(f"fine-tuning regressed {self.diff['regressed']} by more than "
                               f"{self.tolerance} (see {js})")
