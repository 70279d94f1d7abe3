"""A teacher that runs a kit checkpoint in-process: the same :class:`~mmllm.serve.engine.Engine`
(one continuous-batching :class:`~mmllm.generation.DecodeSession`) and chat rendering as
``mmllm serve``, so its answers equal the server's for the same checkpoint and params.

:meth:`~mmllm.teacher.base.Teacher.option_logprobs` reads the same model's next-token
distributions directly (:mod:`mmllm.teacher.options`): exact, and defined for every option
however unlikely, so even a tiny model that never writes a parseable verdict gives one."""

from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

import torch

from mmllm.config import to_dtype
from mmllm.serve.engine import Done, Engine, Failed
from mmllm.serve.protocol import APIError, Limits, parse_generation
from mmllm.teacher.base import Teacher, TeacherError, renormalise
from mmllm.teacher.options import OptionPlan, plan_rows, rows_logprobs, score_options


class LocalTeacher(Teacher):
    """Chat answers from a model loaded with :func:`mmllm.checkpoint.load_model`.

    Args:
        checkpoint: any source ``load_model`` takes ("smollm2", an HF dir, a .gguf, a kit
            .ckpt or run directory). Its string (and the file's mtime) names the model in cache keys.
        model: the name in cache keys and logs (default: the checkpoint string).
        dtype, device: where the model runs (device default: cuda if available).
        max_batch: conversations decoded together (the engine's rows).
        max_seq_len: prompt + answer positions per row (capped by the model's context).
        max_tokens: default and largest ``max_tokens``.
        chat_template: overrides the tokenizer's chat template.
        seed: generator of unseeded sampled requests.
        **kwargs: :class:`~mmllm.teacher.base.Teacher` args (cache_path, sampling, progress,
            on_error; max_concurrency is unused: max_batch bounds the work in flight).
    """

    def __init__(self, *, checkpoint: str, model: str | None = None, dtype: str = "float32",
                 device: str | None = None, max_batch: int = 16, max_seq_len: int = 2048,
                 max_tokens: int = 1024, chat_template: str | None = None, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(model=model or str(checkpoint), **kwargs)
        self.checkpoint, self.dtype = str(checkpoint), to_dtype(dtype)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_batch, self.max_seq_len, self.max_tokens = max_batch, max_seq_len, max_tokens
        self.chat_template, self.seed = chat_template, seed
        self._engine: Engine | None = None
        self._renderer = None

    @property
    def cache_model(self) -> str:
        path = Path(self.checkpoint)
        stamp = f"@{path.stat().st_mtime_ns}" if path.exists() else ""  # retrained: new keys
        return f"local:{self.model}{stamp}"

    @property
    def engine(self) -> Engine:
        """The engine, built (model loaded) at the first request the cache misses."""
        if self._engine is None:
            from mmllm.checkpoint import load_model
            from mmllm.data.chat import ChatRenderer

            model, tokenizer = load_model(self.checkpoint, dtype=self.dtype)
            if tokenizer is None:
                raise ValueError(f"{self.checkpoint} has no tokenizer recorded")
            model = model.to(self.device).eval()
            self._renderer = ChatRenderer(tokenizer, chat_template=self.chat_template)
            self._engine = Engine(model, tokenizer, max_batch=self.max_batch,
                                  max_seq_len=min(self.max_seq_len, model.max_seq_len),
                                  seed=self.seed).start()
        return self._engine

    def _complete_many(self, conversations: list[list[dict]], sampling: dict,
                       done: Callable[[int, str | None, BaseException | None], None]) -> None:
        engine = self.engine
        limits = Limits(max_prompt_tokens=engine.max_seq_len - 1, max_tokens=self.max_tokens,
                        max_seq_len=engine.max_seq_len)
        body = {"temperature": 1.0, **sampling}  # OpenAI's default temperature, as the server's
        requests, errors = {}, {}
        for i, messages in enumerate(conversations):
            try:
                requests[i] = parse_generation(body, self._renderer.prompt(messages), limits)
            except (APIError, ValueError) as e:  # too long, bad params, unrenderable
                errors[i] = TeacherError(str(e))
        for i, error in errors.items():
            done(i, None, error)
        finished: queue.Queue = queue.Queue()  # (index, final event) from the engine thread

        def on_event(i: int) -> Callable:
            return lambda event: finished.put((i, event)) if isinstance(event, (Done, Failed)) else None

        for i, req in requests.items():
            req.on_event = on_event(i)
            engine.submit(req)
        try:
            for _ in requests:  # answers are reported (and cached) as each finishes
                i, event = finished.get()
                if isinstance(event, Failed):
                    done(i, None, TeacherError(event.message))
                elif event.finish_reason == "cancelled":  # the engine stopped: not an answer
                    done(i, None, TeacherError("the engine stopped before the answer was complete"))
                else:
                    done(i, event.text, None)
        finally:
            for req in requests.values():
                req.cancelled.set()  # an aborted batch frees the engine's rows

    def _option_logprobs_many(self, conversations: list[list[dict]], options: list[str],
                              done: Callable[[int, dict | None, BaseException | None], None]) -> None:
        """Option logprobs from the engine's model (see :mod:`mmllm.teacher.options`): each prompt
        is the chat rendering up to the assistant header, as :meth:`chat_many` prompts are; each
        option is tokenised as assistant content is. Conversations are batched ``max_batch``
        rows per forward, shortest prompts together."""
        engine = self.engine
        if not hasattr(engine.model, "lm_head"):
            raise TypeError(f"{self.checkpoint}: option logprobs need a decoder LM with an lm_head, "
                            f"got {type(engine.model).__name__}")
        option_ids = [engine.tokenizer(o, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                      for o in options]
        plans: dict[int, OptionPlan] = {}
        for i, messages in enumerate(conversations):
            try:
                plan = plan_rows(self._renderer.prompt(messages), option_ids)
                longest = max(map(len, plan.rows))
                if longest > engine.max_seq_len:
                    raise ValueError(f"the prompt and options need {longest} tokens; this teacher "
                                     f"holds {engine.max_seq_len} (max_seq_len)")
                plans[i] = plan
            except ValueError as e:  # too long, unrenderable, options that tokenise alike
                done(i, None, TeacherError(str(e)))
        order = sorted(plans, key=lambda i: plans[i].prompt_len)
        while order:
            chunk, rows = [], 0
            while order and (not chunk or rows + len(plans[order[0]].rows) <= self.max_batch):
                rows += len(plans[order[0]].rows)
                chunk.append(order.pop(0))
            try:
                scored = rows_logprobs(engine.model, [plans[i] for i in chunk], device=self.device)
            except RuntimeError as e:  # e.g. out of memory: these conversations failed
                for i in chunk:
                    done(i, None, TeacherError(f"the option forward failed: {e}"))
                continue
            for i, lps in zip(chunk, scored):
                try:
                    result = renormalise(dict(zip(options, score_options(plans[i], option_ids, lps))))
                except TeacherError as e:  # every option impossible (-inf)
                    done(i, None, e)
                    continue
                done(i, result, None)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.stop()
            self._engine = None
        super().close()
