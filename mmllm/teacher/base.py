"""The teacher interface: ``chat(messages) -> str`` and ``chat_many(conversations) -> list[str]``.

A :class:`Teacher` answers OpenAI-style conversations (distillation data, judges, synthetic
instructions). Every backend shares the cache, progress and error handling here and implements
one thing, :meth:`Teacher._complete_many`: answer the requests the cache misses.

Logprob judges use :meth:`Teacher.option_logprobs` instead: the probability that the reply begins
with each of a few option strings ("A"/"B"/"tie", "1".."10"), which every teacher with token
probabilities gives, however weak (its text need not parse). Backends implement
:meth:`Teacher._option_logprobs_many` (or the per-request :meth:`Teacher._option_logprobs`).
"""

from __future__ import annotations

import json
import logging
import math
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


def check_options(options: Sequence[str]) -> list[str]:
    """The options of :meth:`Teacher.option_logprobs`, checked: two or more distinct non-empty strings."""
    if isinstance(options, str) or len(options) < 2:
        raise ValueError(f"options must be a list of two or more strings, got {options!r}")
    options = [str(o) for o in options]
    if any(not o for o in options) or len(set(options)) != len(options):
        raise ValueError(f"options must be distinct non-empty strings, got {options!r}")
    return options


def renormalise(logprobs: Mapping[str, float]) -> dict[str, float]:
    """Log-probabilities shifted so that they sum to 1 as probabilities (``x - logsumexp(x)``)."""
    finite = [v for v in logprobs.values() if v != -math.inf]
    if not finite:
        raise TeacherError("every option has probability 0")
    top = max(finite)
    log_z = top + math.log(sum(math.exp(v - top) for v in finite))
    return {k: v - log_z for k, v in logprobs.items()}


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
        return self._run(keys, convs, lambda todo, done: self._complete_many(todo, params, done),
                         desc=desc, progress=progress, sampling=params)

    def option_logprobs(self, conversations: Sequence[Messages], options: Sequence[str], *,
                        desc: str = "teacher", progress: bool | None = None) -> list[dict[str, float] | None]:
        """How likely the assistant's reply is to begin with each option (a logprob judge).

        Judges such as AlpacaEval and G-Eval read the judge's token probabilities instead of
        parsing its text: the answer to "reply with A or B" is ``{"A": log p, "B": log p}``.
        Each conversation gets ``log P(reply starts with option)`` per option, renormalised over
        the options (``logsumexp == 0``); the backends document how they compute it. Cached
        like :meth:`chat_many` (the key holds the options); identical requests are sent once.

        Args:
            conversations: OpenAI-style conversations ending where the assistant would answer.
            options: two or more distinct non-empty strings (``["A", "B", "tie"]``, ``["1", ..., "10"]``).

        Returns:
            ``{option: logprob}`` per conversation (None for a failure under ``on_error="skip"``).

        Raises:
            NotImplementedError: the backend cannot score options.
        """
        options = check_options(options)
        if type(self)._option_logprobs_many is Teacher._option_logprobs_many and \
                type(self)._option_logprobs is Teacher._option_logprobs:
            raise NotImplementedError(
                f"{type(self).__name__} cannot score options (no token probabilities): use "
                "LocalTeacher or OpenAITeacher (a server with logprobs), or a text-parsing judge")
        params = {"option_logprobs": list(options), **self._option_key_params()}
        convs = [[dict(m) for m in c] for c in conversations]
        keys = [request_key(self.cache_model, c, params) for c in convs]
        out = self._run(keys, convs, lambda todo, done: self._option_logprobs_many(todo, options, done),
                        desc=desc, progress=progress, sampling=params, encode=json.dumps)
        return [json.loads(v) if isinstance(v, str) else v for v in out]  # cached ones are JSON

    def _run(self, keys: list[str], convs: list[list[dict]], send: Callable, *, desc: str,
             progress: bool | None, sampling: dict, encode: Callable = lambda v: v) -> list:
        """The shared request loop: cache lookup, unique misses sent through
        ``send(conversations, done)``, each result cached (``encode``: its stored text) as it arrives."""
        answers: dict = self.cache.get_many(keys) if self.cache else {}
        self.stats["cache_hits"] += sum(k in answers for k in keys)
        todo = {k: c for k, c in zip(keys, convs) if k not in answers}  # unique misses
        show = self.progress if progress is None else progress
        with tqdm(total=len(keys), initial=len(keys) - len(todo), desc=desc, disable=not show,
                  unit="req") as bar:
            order = list(todo)
            counts = Counter(keys)

            def done(i: int, answer, error: BaseException | None) -> None:
                key = order[i]
                if error is not None:
                    self.stats["failed"] += 1
                    if self.on_error == "raise":
                        raise TeacherError(f"teacher request failed: {error}") from error
                    log.warning("teacher request failed (skipped): %s", error)
                elif self.cache is not None:
                    self.cache.put(key, encode(answer), model=self.cache_model,
                                   request={"messages": todo[key], "sampling": sampling})
                answers[key] = answer
                bar.update(counts[key])

            if order:
                self.stats["requests"] += len(order)
                send([todo[k] for k in order], done)
        return [answers.get(k) for k in keys]

    def _complete_many(self, conversations: list[list[dict]], sampling: dict,
                       done: Callable[[int, str | None, BaseException | None], None]) -> None:
        """Answers every conversation, calling ``done(index, answer, error)`` as each finishes
        (on the calling thread; it may raise to abort). Default: :meth:`_complete` on a thread pool."""
        self._on_pool(lambda c: self._complete(c, sampling), conversations, done)

    def _on_pool(self, fn: Callable, conversations: list[list[dict]], done: Callable) -> None:
        """``fn(conversation)`` for each on ``max_concurrency`` threads, ``done`` called as each finishes."""
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="teacher") as pool:
            futures = {pool.submit(fn, c): i for i, c in enumerate(conversations)}
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

    def _option_key_params(self) -> dict:
        """What else defines an option-logprob result (in its cache key), besides model and options."""
        return {}

    def _option_logprobs_many(self, conversations: list[list[dict]], options: list[str],
                              done: Callable[[int, dict | None, BaseException | None], None]) -> None:
        """Scores every conversation, calling ``done(index, {option: logprob}, error)`` as each
        finishes (see :meth:`_complete_many`). Default: :meth:`_option_logprobs` on a thread pool."""
        self._on_pool(lambda c: self._option_logprobs(c, options), conversations, done)

    def _option_logprobs(self, messages: list[dict], options: list[str]) -> dict[str, float]:
        """One conversation's renormalised option logprobs (the backend's request); raises on failure."""
        raise NotImplementedError

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
