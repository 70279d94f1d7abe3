"""Evaluation tasks (instantiated from conf/eval/tasks/*.yaml)."""

from mmllm.eval.tasks.base import Task, TaskResult
from mmllm.eval.tasks.code import CodeTask
from mmllm.eval.tasks.generative import GenerativeTask
from mmllm.eval.tasks.multiple_choice import MultipleChoiceTask
from mmllm.eval.tasks.perplexity import PerplexityTask

__all__ = [
    "CodeTask", "GenerativeTask", "MultipleChoiceTask", "PerplexityTask", "Task", "TaskResult",
]
