"""``evaluate(model, tokenizer, tasks)``: run a suite of tasks, report a table and JSON."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mmllm.eval.runner import ModelRunner
from mmllm.eval.tasks.base import Task

log = logging.getLogger(__name__)


def _as_list(tasks: Mapping[str, Task] | Sequence[Task] | Task) -> list[Task]:
    if isinstance(tasks, Task):
        return [tasks]
    items = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    bad = [t for t in items if not isinstance(t, Task)]
    if bad:
        raise TypeError(f"tasks must be mmllm.eval Task objects (instantiate the YAML first), got {bad[:1]}")
    names = [t.name for t in items]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return items


def evaluate(model, tokenizer, tasks: Mapping[str, Task] | Sequence[Task] | Task, *,
             batch_size: int = 16, limit: int | None = None, num_fewshot: int | None = None,
             max_length: int | None = None, reuse_prefix: bool = True, log_samples: bool = False,
             output_path: str | Path | None = None, progress: bool = True) -> dict:
    """Evaluates ``model`` on every task.

    Args:
        model: a DecoderLM.
        tokenizer: its HF tokenizer.
        tasks: Task objects (or a name -> Task mapping, as Hydra instantiates ``cfg.tasks``).
        batch_size: rows per forward.
        limit: examples per task (None: each task's own limit / all).
        num_fewshot: overrides every task's k-shot setting.
        max_length: context length (default: the model's).
        reuse_prefix: compute shared prompt prefixes once (KV-cache reuse).
        log_samples: include per-example records in the report.
        output_path: also write the report there as JSON.
        progress: tqdm bars.

    Returns:
        ``{"results": {task: {metric: value}}, "n": {task: examples}, "seconds": {task: s},
        "config": {...}, ["samples": {task: [...]}]}``.
    """
    runner = ModelRunner(model, tokenizer, batch_size=batch_size, max_length=max_length,
                         reuse_prefix=reuse_prefix, progress=progress)
    report: dict = {"results": {}, "n": {}, "seconds": {},
                    "config": {"batch_size": batch_size, "limit": limit, "num_fewshot": num_fewshot,
                               "max_length": runner.max_length, "reuse_prefix": reuse_prefix}}
    if log_samples:
        report["samples"] = {}
    for task in _as_list(tasks):
        t0 = time.perf_counter()
        log.info("evaluating %s", task.name)
        result = task.run(runner, limit=limit, num_fewshot=num_fewshot)
        report["results"][task.name] = result.metrics
        report["n"][task.name] = result.n
        report["seconds"][task.name] = round(time.perf_counter() - t0, 3)
        if log_samples:
            report["samples"][task.name] = result.samples
    if output_path is not None:
        write_report(report, output_path)
    return report


def write_report(report: dict, path: str | Path) -> Path:
    """Writes the report as JSON (NaN written as null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(report), indent=2, ensure_ascii=False, default=str))
    return path


def format_table(report: dict) -> str:
    """A markdown table: one row per (task, metric), with the standard error when known."""
    lines = ["| task | n | metric | value | stderr |", "|---|---:|---|---:|---:|"]
    for task, metrics in report["results"].items():
        for name, value in metrics.items():
            if name.endswith("_stderr"):
                continue
            err = metrics.get(f"{name}_stderr")
            err_s = f"{err:.4f}" if isinstance(err, float) and math.isfinite(err) else ""
            lines.append(f"| {task} | {report['n'].get(task, '')} | {name} | {value:.4f} | {err_s} |")
    return "\n".join(lines)


def pipeline_evaluation(model, tokenizer, cfg=None, *, limit: int | None = None) -> dict:
    """The evaluation ``mmllm pipeline`` reports for the tiny model it trained.

    Runs the built-in capitals task (0-shot and 3-shot multiple choice, acc/acc_norm) and the
    perplexity of the capitals as sentences; all offline, seconds on CPU.

    Args:
        model: the trained DecoderLM.
        tokenizer: its tokenizer.
        cfg: the pipeline config; ``cfg.eval.limit`` / ``cfg.eval.batch_size`` are used when set.
        limit: examples per task (overrides the config).

    Returns:
        ``{task: {metric: value}}`` (JSON-serialisable, rounded to 4 digits).
    """
    from mmllm.eval.builtin import capitals_task, capitals_text_task

    ecfg = (cfg.get("eval") if cfg is not None and hasattr(cfg, "get") else None) or {}
    limit = limit if limit is not None else ecfg.get("limit", None)
    tasks = [capitals_task(), capitals_task(num_fewshot=3), capitals_text_task()]
    tasks[1].name = "capitals_3shot"
    report = evaluate(model, tokenizer, tasks, batch_size=int(ecfg.get("batch_size", 16)),
                      limit=limit, progress=False)
    return {task: {k: round(v, 4) for k, v in metrics.items() if not k.endswith("_stderr")}
            for task, metrics in report["results"].items()}
