"""The teacher interface: ``chat(messages) -> str`` and ``chat_many(conversations) -> list[str]``.

A :class:`Teacher` answers OpenAI-style conversations (distillation data, judges, synthetic
instructions). Every backend shares the cache, progress and error handling here and implements
one thing, :meth:`Teacher._complete_many`: answer the requests the cache misses.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

from mmllm.teacher.cache import ResponseCache, request_key

log = logging.getLogger(__name__)

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "stop", "seed")
Messages = Sequence[Mapping[str, str]]


class TeacherError(RuntimeError):
    """A request that failed for good (retries spent, a refusal, an empty answer)."""


class Teacher:
    """Base of the teacher backends (cache, concurrency, progress bar).

    Args:
        model: the model name sent to the backend; part of every cache key.
        cache_path: SQLite response cache (None: no cache). A rerun answers cached requests
            without calling the backend; the key hashes model, messages and sampling params.
        sampling: default sampling params (``temperature``, ``top_p``, ``top_k``,
            ``max_tokens`` or ``max_completion_tokens``, ``stop``, ``seed``), overridden per call.
        max_concurrency: requests in flight at once.
        progress: show a tqdm bar in :meth:`chat_many`.
        on_error: "raise" (the first failed request raises :class:`TeacherError`) or "skip"
            (its answer is None, counted in :attr:`stats` ``failed``).
    """

    def __init__(self, *, model: str, cache_path: str | Path | None = None,
                 sampling: Mapping | None = None, max_concurrency: int = 8, progress: bool = True,
                 on_error: str = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.model, self.max_concurrency = model, max_concurrency
        self.progress, self.on_error = progress, on_error
        self.sampling = self._check_sampling(dict(sampling or {}))
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.stats: Counter = Counter()  # requests sent, cache hits, failures

    @staticmethod
    def _check_sampling(sampling: dict) -> dict:
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            raise ValueError(f"unknown sampling params {unknown}; expected some of {SAMPLING_KEYS}")
        if isinstance(sampling.get("stop"), Sequence) and not isinstance(sampling["stop"], str):
            sampling["stop"] = list(sampling["stop"])
        return {k: v for k, v in sampling.items() if v is not None}

    @property
    def cache_model(self) -> str:
        """The model identity in cache keys (backends may add what else defines the model)."""
        return self.model

    def chat(self, messages: Messages, **sampling) -> str | None:
        """The teacher's answer to one conversation (see :meth:`chat_many`)."""
        return self.chat_many([messages], progress=False, **sampling)[0]

    def chat_many(self, conversations: Sequence[Messages], *, desc: str = "teacher",
                  progress: bool | None = None, **sampling) -> list[str | None]:
        """Answers conversations, in order: cached ones at once, the rest concurrently.

        Identical requests in one call are sent once. Each answer is cached as it arrives.

        Returns:
            The assistant text per conversation (None for a failure under ``on_error="skip"``).
        """
        params = self._check_sampling({**self.sampling, **sampling})
        convs = [[dict(m) for m in c] for c in conversations]
        keys = [request_key(self.cache_model, c, params) for c in convs]
        answers: dict[str, str | None] = self.cache.get_many(keys) if self.cache else {}
        self.stats["cache_hits"] += sum(k in answers for k in keys)
        todo = {k: c for k, c in zip(keys, convs) if k not in answers}  # unique misses
        show = self.progress if progress is None else progress
        with tqdm(total=len(keys), initial=len(keys) - len(todo), desc=desc, disable=not show,
                  unit="req") as bar:
            order = list(todo)
            counts = Counter(keys)

            def done(i: int, answer: str | None, error: BaseException | None) -> None:
                key = order[i]
                if error is not None:
                    self.stats["failed"] += 1
                    if self.on_error == "raise":
                        raise TeacherError(f"teacher request failed: {error}") from error
                    log.warning("teacher request failed (skipped): %s", error)
                elif self.cache is not None:
                    self.cache.put(key, answer, model=self.cache_model,
                                   request={"messages": todo[key], "sampling": params})
                answers[key] = answer
                bar.update(counts[key])

            if order:
                self.stats["requests"] += len(order)
                self._complete_many([todo[k] for k in order], params, done)
        return [answers.get(k) for k in keys]

    def _complete_many(self, conversations: list[list[dict]], sampling: dict,
                       done: Callable[[int, str | None, BaseException | None], None]) -> None:
        """Answers every conversation, calling ``done(index, answer, error)`` as each finishes
        (on the calling thread; it may raise to abort). Default: :meth:`_complete` on a thread pool."""
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="teacher") as pool:
            futures = {pool.submit(self._complete, c, sampling): i for i, c in enumerate(conversations)}
            try:
                for fut in as_completed(futures):
                    error = fut.exception()
                    done(futures[fut], None if error else fut.result(), error)
            except BaseException:
                for fut in futures:
                    fut.cancel()  # a raising done() stops what has not started
                raise

    def _complete(self, messages: list[dict], sampling: dict) -> str:
        """One answer (the backend's request); raises on failure."""
        raise NotImplementedError

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
