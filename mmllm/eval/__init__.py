"""Evaluation: perplexity, prompt templates, multiple-choice / generative / code scoring,
sandboxed execution, task loaders, the lm-eval adapter and reports.

Entry points: :func:`evaluate` (Python API), ``mmllm eval`` (:mod:`mmllm.eval.cli`),
:class:`mmllm.callbacks.eval_callback.EvalCallback` (during training) and
:class:`mmllm.eval.lm_eval_adapter.MMLLMEvalLM` (any lm-eval task on an mmllm model).
"""

from mmllm.eval.data import TaskData
from mmllm.eval.evaluator import evaluate, format_table, pipeline_evaluation, write_report
from mmllm.eval.metrics import (
    exact_match,
    extract_boxed,
    extract_last_number,
    multiple_choice_scores,
    normalize_answer,
    normalized_match,
    pass_at_k,
    token_f1,
)
from mmllm.eval.perplexity import PerplexityResult, perplexity, rolling_windows
from mmllm.eval.runner import ModelRunner
from mmllm.eval.sandbox import ExecutionResult, run_program, run_programs
from mmllm.eval.tasks import (
    CodeTask,
    GenerativeTask,
    MultipleChoiceTask,
    PerplexityTask,
    Task,
    TaskResult,
)
from mmllm.eval.templates import Example, Template, Verbalizer

__all__ = [
    "CodeTask", "Example", "ExecutionResult", "GenerativeTask", "ModelRunner",
    "MultipleChoiceTask", "PerplexityResult", "PerplexityTask", "Task", "TaskData", "TaskResult",
    "Template", "Verbalizer", "evaluate", "exact_match", "extract_boxed", "extract_last_number",
    "format_table", "multiple_choice_scores", "normalize_answer", "normalized_match", "pass_at_k",
    "perplexity", "pipeline_evaluation", "rolling_windows", "run_program", "run_programs",
    "token_f1", "write_report",
]
