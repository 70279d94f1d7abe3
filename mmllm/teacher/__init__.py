"""Teachers: answer OpenAI-style conversations for distillation, judging and synthetic data.

One interface, :class:`~mmllm.teacher.base.Teacher` (``chat(messages, **sampling) -> str``,
``chat_many(conversations, **sampling) -> list[str]``), with an on-disk SQLite response cache
(a rerun pays nothing twice) and a progress bar, over two backends:

* :class:`~mmllm.teacher.openai_teacher.OpenAITeacher`: any OpenAI-compatible server (a hosted
  API, ``vllm serve``, ``mmllm serve``), with retries, backoff, rate limit and concurrency.
* :class:`~mmllm.teacher.local.LocalTeacher`: a kit checkpoint in-process (the server's engine).

Logprob judges call ``option_logprobs(conversations, options)``: the probability that the reply
begins with each option ("A"/"B"/"tie", "1".."10"), renormalised over them (LocalTeacher: exact,
from the model's next-token distributions; OpenAITeacher: from the first token's ``top_logprobs``).

Hydra: ``mmllm/conf/teacher/{openai,local}.yaml`` (``hydra.utils.instantiate(cfg.teacher)``).
"""

from mmllm.teacher.base import Teacher, TeacherError
from mmllm.teacher.cache import ResponseCache, request_key
from mmllm.teacher.local import LocalTeacher
from mmllm.teacher.openai_teacher import OpenAITeacher, RateLimiter

__all__ = ["LocalTeacher", "OpenAITeacher", "RateLimiter", "ResponseCache", "Teacher", "TeacherError",
           "request_key"]
