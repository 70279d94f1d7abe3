"""The serving engine: one background thread owns one :class:`DecodeSession` (continuous batching).

Requests arrive from any thread (:meth:`Engine.submit`); the engine thread admits them into free
rows of the running session between decode steps, so a new request's prompt is prefilled while
other rows keep decoding, and a finished row frees its slot at once. Every step, each request is
told the text it gained (:class:`Delta`) and finally :class:`Done`, through its ``on_event``
callback (called on the engine thread; the HTTP layer forwards events into its event loop).

The streamed text is always a prefix of the final text: trailing bytes that do not yet form a
whole character, and any tail that could be the start of a stop string, are held back until the
next tokens decide them.

Log-probabilities (``GenRequest.logprobs`` / ``prompt_logprobs``) are the raw model
distribution's (log_softmax of the logits, before temperature / top-k / top-p). A Delta carries
those of the completion tokens its text completes; the final Done, those of every token behind
the returned text: the tokens whose text lies wholly after a stop string are left out, and the
eos unless ``GenRequest.eos_logprob`` (legacy completions report it, as OpenAI's do: lm-eval's
echo scoring reads one logprob per token of prompt + completion).

Seeds: the session has one random generator for all rows, so a sampled request with a ``seed``
runs alone (admitted once the batch drains, nothing joins it) with the generator reseeded, which
makes it reproducible whatever else the server is doing. Greedy requests and unseeded ones batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mmllm.generation import DecodeSession, SamplingParams
from mmllm.generation.logprobs import TokenLogprob
from mmllm.generation.session import Row

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """New text of a request (a streamed chunk).

    Attributes:
        text: the new text.
        logprobs: the completion tokens this text completes (requests with ``logprobs``).
        offsets: per entry of ``logprobs``, where its text starts in the completion (characters).
        prompt_logprobs: on a request's first Delta (requests with ``prompt_logprobs``), the
            prompt's (see :class:`Done`), so a stream can echo the prompt before the completion.
    """

    text: str
    logprobs: list[TokenLogprob] | None = None
    offsets: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Done:
    """A request's result.

    Attributes:
        text: the whole completion (stop string and eos excluded).
        finish_reason: "stop" (eos or a stop string), "length" or "cancelled".
        prompt_tokens, completion_tokens: token counts for ``usage``.
        logprobs: the tokens behind ``text`` (requests with ``logprobs``; see the module doc).
        offsets: per entry of ``logprobs``, where its text starts in ``text`` (characters).
        prompt_logprobs: per prompt token, its log-probability given the ones before (the first
            is None; requests with ``prompt_logprobs``).
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None
    offsets: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Failed:
    """The engine could not run the request (an error in the model forward)."""

    message: str


Event = Delta | Done | Failed


@dataclass
class GenRequest:
    """One generation request.

    Attributes:
        prompt: token ids (non-empty).
        max_tokens: cap on sampled tokens (0: score the prompt only).
        sampling: temperature / top-k / top-p.
        stop: strings that end the completion (excluded from the text).
        seed: makes a sampled request reproducible (it then runs alone, see the module doc).
        on_event: called with each :data:`Event`, on the engine thread; must not block.
        images: (n, 3, H, W) preprocessed images of a VLM prompt (its image spans, in order).
        logprobs: report each completion token's raw log-probability and this many most likely
            alternatives (None: off).
        prompt_logprobs: the same for the prompt tokens (one forward, the prefill; None: off).
        eos_logprob: also report the eos that ended the completion (its text is empty).
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    on_event: Callable[[Event], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent: str = ""  # text already reported by Delta events
    images: torch.Tensor | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    eos_logprob: bool = False
    sent_logprobs: list[TokenLogprob] = field(default_factory=list)  # reported so far
    sent_offsets: list[int] = field(default_factory=list)
    covered: str = ""  # the text of the tokens in sent_logprobs
    prompt_reported: bool = False

    @property
    def exclusive(self) -> bool:
        return self.seed is not None and self.sampling.temperature > 0


class Engine:
    """Continuous-batching generation over one model.

    Args:
        model: a DecoderLM in eval mode, or a VLM (:func:`mmllm.serve.images.is_vlm`): its
            decoder runs the session, prompts with images are prefilled from embeddings.
        tokenizer: its HF tokenizer (eos ends a completion; decodes the text).
        max_batch: rows decoded at once (KV cache slots).
        max_seq_len: positions per row (prompt + completion).
        seed: seeds the generator of unseeded sampled requests.
        static_decode: fixed-shape decode steps (see :class:`DecodeSession`).
    """

    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int = 8, max_seq_len: int = 2048,
                 seed: int = 0, static_decode: bool = False) -> None:
        from mmllm.serve.images import is_vlm

        self.model, self.tokenizer = model.eval(), tokenizer
        self.takes_images = is_vlm(model)
        self.lm = model.decoder if self.takes_images else model  # what the decode session runs
        self.max_batch, self.max_seq_len, self.seed = max_batch, max_seq_len, seed
        self.static_decode = static_decode
        eos = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.session = self._new_session()
        self._inbox: queue.Queue[GenRequest | None] = queue.Queue()
        self._waiting: deque[GenRequest] = deque()
        self._live: dict[int, GenRequest] = {}  # session row id -> request
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_rows_seen = 0  # most rows decoded together

    def _new_session(self) -> DecodeSession:
        return DecodeSession(self.lm, max_rows=self.max_batch, max_len=self.max_seq_len,
                             eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id,
                             tokenizer=self.tokenizer, generator=self.generator,
                             static_decode=self.static_decode)

    # ------------------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        if self._thread is None:
            self._stopping.clear()
            self._thread = threading.Thread(target=self._run, name="mmllm-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops the engine thread; requests still running end with finish_reason "cancelled"."""
        if self._thread is None:
            return
        self._stopping.set()
        self._inbox.put(None)  # wakes a thread blocked on an empty inbox
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished."""
        return self._inbox.qsize() + len(self._waiting) + len(self._live)

    # --------------------------------------------------------------------------- requests
    def submit(self, request: GenRequest) -> GenRequest:
        """Queues a request (thread-safe); its events arrive through ``request.on_event``."""
        if not request.prompt or len(request.prompt) + request.max_tokens >= self.max_seq_len + 1:
            raise ValueError(f"a prompt of {len(request.prompt)} tokens plus max_tokens="
                             f"{request.max_tokens} does not fit in max_seq_len={self.max_seq_len}")
        if self._thread is None:
            raise RuntimeError("the engine is not running (call start())")
        self._inbox.put(request)
        return request

    def generate(self, requests: Sequence[GenRequest], timeout: float | None = None) -> list[Done]:
        """Runs requests to completion from a synchronous caller (they batch together).

        Raises:
            RuntimeError: a request failed in the engine.
        """
        results: list[Event | None] = [None] * len(requests)
        left = threading.Semaphore(0)

        def watcher(i: int) -> Callable[[Event], None]:
            def on_event(event: Event) -> None:
                if isinstance(event, (Done, Failed)):
                    results[i] = event
                    left.release()
            return on_event

        for i, req in enumerate(requests):
            req.on_event = watcher(i)
            self.submit(req)
        for _ in requests:
            if not left.acquire(timeout=timeout):
                raise TimeoutError("generation did not finish in time")
        for r in results:
            if isinstance(r, Failed) or r.finish_reason == "cancelled":
                raise RuntimeError(r.message if isinstance(r, Failed) else "the engine stopped")
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit(block=not self._live)
                if not self._live:
                    continue
                self.session.step()
                self.steps += 1
                self._report()
            except Exception as e:  # a bad forward fails the batch, never the engine
                log.exception("decode step failed")
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        while True:  # what was submitted and never finished is told so
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._waiting.append(item)
        for req in [*self._live.values(), *self._waiting]:
            _emit(req, Done(req.sent, "cancelled", len(req.prompt), 0))
        self._live.clear()
        self._waiting.clear()

    def _admit(self, *, block: bool) -> None:
        """Moves submitted requests into free rows (an exclusive one waits for an empty batch)."""
        try:
            while True:
                item = self._inbox.get(block=block and not self._waiting, timeout=0.5)
                block = False
                if item is not None:
                    self._waiting.append(item)
        except queue.Empty:
            pass
        while self._waiting and len(self._live) < self.max_batch:
            req = self._waiting[0]
            if req.cancelled.is_set():
                self._waiting.popleft()
                _emit(req, Done("", "cancelled", len(req.prompt), 0))
                continue
            alone = any(r.exclusive for r in self._live.values())
            if alone or (req.exclusive and self._live):
                return
            self._waiting.popleft()
            if req.exclusive:
                self.generator.manual_seed(req.seed)
            req.sent_logprobs, req.sent_offsets, req.covered, req.prompt_reported = [], [], "", False
            try:
                (row_id,) = self.session.add_rows(**self._prompt(req), max_new_tokens=req.max_tokens,
                                                  stop=list(req.stop) or None, sampling=req.sampling,
                                                  top_logprobs=req.logprobs,
                                                  prompt_logprobs=req.prompt_logprobs)
            except Exception as e:  # noqa: BLE001 - a bad prompt or image fails its request only
                _emit(req, Failed(str(e)))
                continue
            self._live[row_id] = req
        self.max_rows_seen = max(self.max_rows_seen, len(self._live))

    def _prompt(self, req: GenRequest) -> dict:
        """add_rows' prompt argument: ids, or embeddings with the image features in place."""
        if req.images is None:
            return {"prompts": [req.prompt]}
        from mmllm.serve.images import prompt_embeddings

        return {"inputs_embeds": [prompt_embeddings(self.model, req.prompt, req.images)]}

    def _report(self) -> None:
        """Sends each live request its new text; finished or cancelled rows leave the session."""
        done = []
        for row_id, req in self._live.items():
            row = self.session.rows[row_id]
            if req.cancelled.is_set() and not row.finished:
                self.session.finish(row_id, "cancelled")
            text = self.completion_text(row.tokens, req.stop, finished=row.finished)
            new, (lps, offsets) = text[len(req.sent):], self._new_logprobs(req, row, text)
            first = req.prompt_logprobs is not None and not req.prompt_reported
            if new or lps or first:
                _emit(req, Delta(new, lps, offsets, row.prompt_logprobs if first else None))
                req.sent, req.prompt_reported = text if new else req.sent, True
            if row.finished:
                done.append(row_id)
        for row_id, row in zip(done, self.session.remove_rows(done)):
            req = self._live.pop(row_id)
            reason = "stop" if row.finish_reason == "eos" else row.finish_reason
            want = req.logprobs is not None
            _emit(req, Done(req.sent, reason, len(req.prompt), row.n_sampled,
                            logprobs=req.sent_logprobs if want else None,
                            offsets=req.sent_offsets if want else None,
                            prompt_logprobs=row.prompt_logprobs if req.prompt_logprobs is not None else None))

    def _new_logprobs(self, req: GenRequest, row: Row, text: str) -> tuple[list | None, list | None]:
        """The completion tokens the text now covers that were not reported yet, and their offsets.

        While the row runs, a token is reported once its text is wholly in ``text``; when it has
        finished, also the tokens needed to cover ``text`` (one cut by a stop string), never the
        eos nor tokens wholly past a stop string. Updates the request's reported state.
        """
        if req.logprobs is None:
            return None, None
        toks = row.tokens[:-1] if row.finish_reason == "eos" and not req.eos_logprob else row.tokens
        n, prev, lps, offsets = len(req.sent_logprobs), req.covered, [], []
        while n < len(toks):
            nxt = self.tokenizer.decode(toks[:n + 1], skip_special_tokens=True,
                                        clean_up_tokenization_spaces=False)
            if not (text.startswith(nxt) or (row.finished and not prev.startswith(text))):
                break
            lps.append(row.token_logprobs[n])
            offsets.append(len(prev))
            n, prev = n + 1, nxt
        req.sent_logprobs += lps
        req.sent_offsets += offsets
        req.covered = prev
        return lps, offsets

    def completion_text(self, tokens: Sequence[int], stop: Sequence[str], *, finished: bool) -> str:
        """The text of sampled tokens: cut before the first stop string; while the row runs,
        without an incomplete character or a tail that may grow into a stop string."""
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        cuts = [text.find(s) for s in stop if s and s in text]
        if cuts:
            return text[:min(cuts)]
        if finished:
            return text
        text = text.rstrip("\ufffd")
        for k in range(min(len(text), max((len(s) for s in stop), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in stop):
                return text[:-k]
        return text

    def _fail_all(self, message: str) -> None:
        for req in self._live.values():
            _emit(req, Failed(message))
        self._live.clear()
        self.session = self._new_session()  # the failed forward may have left the cache half-written


def _emit(req: GenRequest, event: Event) -> None:
    """Calls a request's callback; a failing one (its event loop closed) cancels only that request."""
    try:
        req.on_event(event)
    except Exception:
        log.exception("a request's event callback failed; cancelling the request")
        req.cancelled.set()
