"""DecodeSession: a batch of sequences decoded together over one KV cache, row by row.

Every decoding loop of the kit (``generate_ids``, PPO rollouts, tool calls, serving, VLMs) runs on
a session. A row is one sequence in a cache slot; rows join (:meth:`DecodeSession.add_rows`) and
leave (:meth:`DecodeSession.remove_rows`) while others decode, so a finished row frees its slot for
a new prompt (continuous batching). Each row has its own length in the cache: a step feeds one
token per running row, :meth:`DecodeSession.append` adds several tokens to one row without
sampling (a tool result), :meth:`DecodeSession.truncate` cuts a row back.

Tokens are fed lazily: a row's positions past its cached length (a new prompt, an appended tool
result, the token sampled last) go through the model at the next :meth:`DecodeSession.step` or
:meth:`DecodeSession.prefill`. Rows with one pending token (decoding) share one forward; rows with
more (prompts, tool results) share another, right-padded, so long prompts do not pad the decode
batch. The token that ends a row is never fed, unless something is appended after it.

Token log-probabilities (``add_rows(top_logprobs=k)``, ``add_rows(prompt_logprobs=k)``) are those
of the raw model distribution, ``log_softmax(logits)`` before temperature / top-k / top-p (as
OpenAI and vLLM report them), with the k most likely alternatives; only rows that ask pay for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from mmllm.generation.logprobs import TokenLogprob, sequence_logprobs, token_logprobs
from mmllm.generation.sampling import SamplingParams, sample_next_token
from mmllm.generation.stops import StopStrings


@dataclass
class Row:
    """The state of one sequence of a :class:`DecodeSession`.

    Attributes:
        slot: its row of the KV cache.
        prompt: token ids, or a (T, C) tensor of input embeddings (image features, ...).
        tokens: every token after the prompt, sampled or appended.
        sampled: per entry of ``tokens``, True if it was sampled (False: appended).
        logprobs: per entry of ``tokens``, the log-probability it was sampled with under
            softmax(logits / temperature) (temperature 1 when greedy; before top-k/top-p), as
            PPO needs; None for appended tokens. Kept when the session has ``logprobs=True``.
        n_top: alternatives kept per sampled token in :attr:`token_logprobs` (None: none kept).
        token_logprobs: per entry of ``tokens``, its :class:`TokenLogprob` (None for appended
            tokens); kept when ``n_top`` is set.
        n_prompt_top: alternatives per prompt position in :attr:`prompt_logprobs` (None: off).
        prompt_logprobs: per prompt token, its :class:`TokenLogprob` given the tokens before it
            (the first is None), filled by the forward that feeds the prompt.
        cached: positions of the sequence in the KV cache (the rest is fed at the next forward).
        n_sampled: sampled entries of ``tokens``.
        max_new_tokens: cap on sampled tokens (None: until the cache is full).
        stop_ids: token ids that end the row (the session's eos ids included).
        sampling: how the row samples.
        stops: stop-string detector over the text sampled since the last append / truncate.
        finish_reason: None while running, else "eos", "stop", "length" or what ``finish`` set.
    """

    slot: int
    prompt: list[int] | torch.Tensor
    max_new_tokens: int | None
    stop_ids: frozenset[int]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    n_top: int | None = None
    token_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    n_prompt_top: int | None = None
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    cached: int = 0
    n_sampled: int = 0
    stops: StopStrings | None = None
    finish_reason: str | None = None

    @property
    def length(self) -> int:
        """Positions in the sequence (prompt + tokens)."""
        return len(self.prompt) + len(self.tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        """Text sampled since the last append/truncate, cut before a stop string (needs stop strings)."""
        if self.stops is None:
            return None
        return self.stops.text if self.stops.cut is None else self.stops.text[:self.stops.cut]


class DecodeSession:
    """Decodes up to ``max_rows`` sequences at once over one KV cache.

    Args:
        model: a DecoderLM (or a model with its forward, ``embed_tokens``, ``lm_head`` and
            ``new_kv_cache``), in eval mode.
        max_rows: cache slots (rows decoded at once).
        max_len: positions per row (prompt + new tokens).
        eos_token_id: id(s) that end every row (kept in its tokens).
        pad_token_id: id fed where a batch is padded (never attended).
        tokenizer: an HF tokenizer; needed for stop strings.
        generator: random generator for sampling.
        recompute: no KV cache reuse: every forward re-feeds each row from its first token
            (the reference for tests; O(T^2)).
        static_decode: decode steps run as one fixed-shape forward over all ``max_rows`` slots
            reading all ``max_len`` cached positions (idle slots ride along as padding).
        logprobs: record the log-probability of every sampled token (:attr:`Row.logprobs`).
        compile_decode: also ``torch.compile(mode="reduce-overhead")`` that step, so on CUDA it is
            captured once as a CUDA graph and replayed (implies ``static_decode``).
    """

    def __init__(self, model: nn.Module, *, max_rows: int, max_len: int,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int = 0,
                 tokenizer=None, generator: torch.Generator | None = None,
                 recompute: bool = False, logprobs: bool = False, static_decode: bool = False,
                 compile_decode: bool = False) -> None:
        if max_rows < 1 or max_len < 1:
            raise ValueError(f"max_rows ({max_rows}) and max_len ({max_len}) must be positive")
        self.model, self.max_rows, self.max_len = model, max_rows, max_len
        self.eos = frozenset([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or ())
        self.pad_token_id, self.tokenizer, self.generator = pad_token_id, tokenizer, generator
        self.recompute, self.logprobs = recompute, logprobs
        self.device = next(model.parameters()).device
        self.cache = model.new_kv_cache(max_rows, max_len)
        self.rows: dict[int, Row] = {}
        self._free = list(range(max_rows))
        self._next_id = 0
        self._logits: torch.Tensor | None = None  # (max_rows, V) float32 next-token logits per slot
        self.static_decode = (static_decode or compile_decode) and not recompute
        self._step_fn = self._static_forward
        if compile_decode:
            self._step_fn = torch.compile(self._static_forward, mode="reduce-overhead")

    # ------------------------------------------------------------------------ rows in / out
    def add_rows(self, prompts: Sequence[Sequence[int]] | None = None, *,
                 inputs_embeds: Sequence[torch.Tensor] | None = None,
                 max_new_tokens: int | None = None, stop: Sequence[str] | None = None,
                 stop_ids: Sequence[int] = (), sampling: SamplingParams | None = None,
                 top_logprobs: int | None = None, prompt_logprobs: int | None = None) -> list[int]:
        """Adds sequences (a running batch keeps decoding); their prompts are fed at the next forward.

        Args:
            prompts: token ids per new row.
            inputs_embeds: instead of ``prompts``, a (T, C) tensor of input embeddings per row.
            max_new_tokens: cap on sampled tokens per row (0: the prompt is only fed, e.g. to
                score it with ``prompt_logprobs``; the row ends "length" without sampling).
            stop: strings that end a row (needs the session's tokenizer).
            stop_ids: ids that end a row besides the session's eos ids.
            sampling: how these rows sample (default: greedy).
            top_logprobs: record every sampled token's raw log-probability and its ``k`` most
                likely alternatives (:attr:`Row.token_logprobs`); None: off.
            prompt_logprobs: record the prompt tokens' raw log-probabilities and ``k``
                alternatives (:attr:`Row.prompt_logprobs`; needs token-id prompts); None: off.

        Returns:
            The ids of the new rows (keys of :attr:`rows`).
        """
        if (prompts is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of prompts or inputs_embeds")
        items = list(prompts if prompts is not None else inputs_embeds)
        if len(items) > len(self._free):
            raise ValueError(f"{len(items)} new rows but {len(self._free)} free slots of {self.max_rows}")
        sampling = sampling or SamplingParams()
        if stop and self.tokenizer is None:
            raise ValueError("stop strings need the session's tokenizer")
        for name, k in (("top_logprobs", top_logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (isinstance(k, bool) or k < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {k}")
        if prompt_logprobs is not None and inputs_embeds is not None:
            raise ValueError("prompt_logprobs needs token-id prompts, not inputs_embeds")
        if max_new_tokens is not None and max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        dim = self.model.embed_tokens.weight.shape[1]
        for p in items:
            if len(p) == 0 or len(p) >= self.max_len:
                raise ValueError(f"a prompt needs 1 to {self.max_len - 1} positions, got {len(p)}")
            if inputs_embeds is not None and (p.dim() != 2 or p.shape[1] != dim):
                raise ValueError(f"inputs_embeds rows must be (T, {dim}) tensors, got {tuple(p.shape)}")
        ids = []
        for p in items:
            prompt = [int(t) for t in p] if prompts is not None else p.to(self.device)
            row = Row(slot=self._free.pop(0), prompt=prompt, max_new_tokens=max_new_tokens,
                      stop_ids=self.eos | frozenset(stop_ids), sampling=sampling,
                      stop=tuple(stop or ()), n_top=top_logprobs, n_prompt_top=prompt_logprobs)
            self._reset_stops(row)
            self.cache.reset_rows([row.slot])
            self.rows[self._next_id] = row
            ids.append(self._next_id)
            self._next_id += 1
        return ids

    def remove_rows(self, row_ids: Sequence[int]) -> list[Row]:
        """Takes rows out of the session and frees their slots; returns their final state."""
        out = [self.rows.pop(r) for r in row_ids]
        for row in out:
            self._free.append(row.slot)
        self._free.sort()  # low slots first keeps the decode batch a contiguous cache range
        return out

    @property
    def finished(self) -> list[int]:
        """Ids of the rows that have stopped (and are still in the session)."""
        return [r for r, row in self.rows.items() if row.finished]

    @property
    def running(self) -> list[int]:
        return [r for r, row in self.rows.items() if not row.finished]

    def finish(self, row_id: int, reason: str = "stop") -> None:
        """Ends a row from outside (a stop condition of the caller, a cancelled request)."""
        self.rows[row_id].finish_reason = reason

    # -------------------------------------------------------------------------- row edits
    def append(self, row_id: int, ids: Sequence[int]) -> None:
        """Adds tokens to a row without sampling (a tool result); the row runs again.

        They are fed at the next forward; stop strings look only at text sampled after them.
        """
        row = self.rows[row_id]
        if row.length + len(ids) >= self.max_len:
            raise ValueError(f"row {row_id} would need {row.length + len(ids)} positions; "
                             f"the session holds {self.max_len}")
        row.tokens += [int(t) for t in ids]
        row.sampled += [False] * len(ids)
        row.logprobs += [None] * len(ids)
        if row.n_top is not None:
            row.token_logprobs += [None] * len(ids)
        row.finish_reason = None
        self._reset_stops(row)

    def truncate(self, row_id: int, length: int) -> None:
        """Cuts a row back to its first ``length`` positions (prompt included); the row runs again."""
        row = self.rows[row_id]
        if not 1 <= length <= row.length:
            raise ValueError(f"cannot truncate row {row_id} of length {row.length} to {length}")
        n_prompt = len(row.prompt)
        if length < n_prompt:
            row.prompt, row.tokens, row.sampled, row.logprobs = row.prompt[:length], [], [], []
            row.token_logprobs, row.prompt_logprobs = [], row.prompt_logprobs[:length]
        else:
            cut = length - n_prompt
            del row.tokens[cut:], row.sampled[cut:], row.logprobs[cut:], row.token_logprobs[cut:]
        row.n_sampled = sum(row.sampled)
        # The last kept position is re-fed: its logits predict the next token.
        row.cached = min(row.cached, length - 1)
        self.cache.truncate(row.slot, row.cached)
        row.finish_reason = None
        self._reset_stops(row)

    def _reset_stops(self, row: Row) -> None:
        row.stops = StopStrings(self.tokenizer, row.stop) if row.stop else None

    # ---------------------------------------------------------------------------- forward
    @torch.no_grad()
    def prefill(self, row_ids: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
        """Feeds the pending positions of rows (default: all running rows) through the model.

        Returns:
            ``{row id: (V,) float32 logits of its next token}`` for the given rows.
        """
        row_ids = self.running if row_ids is None else list(row_ids)
        pending = [r for r in row_ids if self.rows[r].cached < self.rows[r].length or self.recompute]
        decoding = [r for r in pending if self.rows[r].length - self.rows[r].cached == 1]
        is_decoding = set(decoding)
        prompts = [r for r in pending if r not in is_decoding]
        if prompts:  # first: a new row's prompt allocates the cache a static step needs
            self._forward(prompts)
        if self.static_decode and self.cache.k is not None:
            by_id = [r for r in decoding if not isinstance(self._pending(self.rows[r]), torch.Tensor)]
            if by_id:
                self._static_step(by_id)
            decoding = [r for r in decoding if r not in set(by_id)]  # an embedding to feed
        if decoding:
            self._forward(decoding)
        return {r: self._logits[self.rows[r].slot].clone() for r in row_ids}

    def _forward(self, row_ids: list[int]) -> None:
        rows = [self.rows[r] for r in row_ids]
        if self.recompute:
            for row in rows:
                row.cached = 0
                self.cache.truncate(row.slot, 0)
        slots, n_new = self._batch_slots(rows)
        x = self._inputs(rows, slots, n_new)  # (B, T) ids or (B, T, C) embeddings
        self.cache.plan(slots, n_new)
        kwargs = {"inputs_embeds": x} if x.is_floating_point() else {}
        out = self.model(None if kwargs else x, kv_cache=self.cache, return_hidden=True,
                         return_logits=False, **kwargs)
        by_slot = {s: i for i, s in enumerate(slots)}
        for row in rows:
            if row.n_prompt_top is not None and row.cached == 0 and not row.prompt_logprobs:
                row.prompt_logprobs = sequence_logprobs(self.model.lm_head, out.hidden[by_slot[row.slot]],
                                                        row.prompt, row.n_prompt_top)
        idx = torch.tensor([by_slot[r.slot] for r in rows], device=self.device)
        last = torch.tensor([n_new[by_slot[r.slot]] - 1 for r in rows], device=self.device)
        logits = self.model.lm_head(out.hidden[idx, last]).float()  # (n, V)
        if self._logits is None:
            self._logits = logits.new_zeros(self.max_rows, logits.shape[-1])
        self._logits[torch.tensor([r.slot for r in rows], device=self.device)] = logits
        for row in rows:
            row.cached = row.length

    def _static_step(self, row_ids: list[int]) -> None:
        """One token for each of ``row_ids`` in a fixed-shape forward of every slot."""
        rows = [self.rows[r] for r in row_ids]
        ids = torch.full((self.max_rows, 1), self.pad_token_id, dtype=torch.long)
        for row in rows:
            ids[row.slot, 0] = self._pending(row)[0]
        active = [False] * self.max_rows
        for row in rows:
            active[row.slot] = True
        self.cache.plan_static_step(active)
        logits = self._step_fn(ids.to(self.device))  # (max_rows, V)
        if self._logits is None:
            self._logits = torch.zeros_like(logits)
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        self._logits[slots] = logits[slots]
        for row in rows:
            row.cached = row.length

    def _static_forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model(ids, kv_cache=self.cache, return_hidden=True, return_logits=False).hidden
        return self.model.lm_head(hidden[:, -1]).float()  # (max_rows, V)

    def _batch_slots(self, rows: list[Row]) -> tuple[list[int], list[int]]:
        """The cache rows of one forward and the new tokens of each.

        A contiguous slot range makes the cache reads views rather than copies; idle slots
        inside the range ride along with no new tokens when that at most doubles the batch.
        """
        want = {r.slot: r.length - r.cached for r in rows}
        lo, hi = min(want), max(want) + 1
        slots = list(range(lo, hi)) if hi - lo <= 2 * len(want) else sorted(want)
        return slots, [want.get(s, 0) for s in slots]

    def _inputs(self, rows: list[Row], slots: list[int], n_new: list[int]) -> torch.Tensor:
        """Right-padded inputs of one forward: (B, T) ids, or (B, T, C) embeddings if any row has them."""
        by_slot = {r.slot: r for r in rows}
        T = max(n_new)
        parts = [self._pending(by_slot[s]) if s in by_slot else [] for s in slots]
        if not any(isinstance(p, torch.Tensor) for p in parts):
            ids = torch.full((len(slots), T), self.pad_token_id, dtype=torch.long)
            for i, p in enumerate(parts):
                ids[i, :len(p)] = torch.as_tensor(p, dtype=torch.long)
            return ids.to(self.device)
        embed = self.model.embed_tokens
        x = torch.zeros(len(slots), T, embed.weight.shape[1], device=self.device, dtype=embed.weight.dtype)
        for i, p in enumerate(parts):
            if len(p):
                x[i, :len(p)] = p if isinstance(p, torch.Tensor) else \
                    embed(torch.as_tensor(p, dtype=torch.long, device=self.device))
        return x

    def _pending(self, row: Row) -> list[int] | torch.Tensor:
        """The row's positions after its cached ones: ids, or embeddings if the prompt part has them."""
        start, n_prompt = row.cached, len(row.prompt)
        if not isinstance(row.prompt, torch.Tensor):
            return (row.prompt + row.tokens)[start:] if start < n_prompt else row.tokens[start - n_prompt:]
        if start >= n_prompt:
            return row.tokens[start - n_prompt:]
        tail = row.prompt[start:]
        if row.tokens:
            ids = torch.as_tensor(row.tokens, dtype=torch.long, device=self.device)
            tail = torch.cat([tail, self.model.embed_tokens(ids).to(tail.dtype)])
        return tail

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self) -> dict[int, int]:
        """Samples one token for every running row (feeding their pending positions first).

        Returns:
            ``{row id: new token}`` (empty when no row is running).
        """
        running = self.running
        if not running:
            return {}
        self.prefill(running)
        for r in running:  # a zero budget: the prompt is fed (scored), nothing is sampled
            if self.rows[r].max_new_tokens == 0:
                self.rows[r].finish_reason = "length"
        running = self.running
        new: dict[int, int] = {}
        logprobs: dict[int, float | None] = {}
        tops: dict[int, TokenLogprob] = {}
        for params, group in self._sampling_groups(running).items():
            slots = torch.tensor([self.rows[r].slot for r in group], device=self.device)
            logits = self._logits[slots]  # (n, V)
            toks = sample_next_token(logits, temperature=params.temperature, top_k=params.top_k,
                                     top_p=params.top_p, generator=self.generator)
            new.update(zip(group, toks.tolist()))
            if self.logprobs:
                scaled = logits / params.temperature if params.temperature > 0 else logits
                lp = scaled.log_softmax(-1).gather(-1, toks[:, None]).squeeze(-1)
                logprobs.update(zip(group, lp.tolist()))
            want = [i for i, r in enumerate(group) if self.rows[r].n_top is not None]
            if want:  # only the rows that asked pay for the log_softmax and top-k
                pick = torch.tensor(want, device=self.device)
                found = token_logprobs(logits[pick], toks[pick], [self.rows[group[i]].n_top for i in want])
                tops.update(zip((group[i] for i in want), found))
        for r in running:
            self._record(r, new[r], logprobs.get(r), tops.get(r))
        return {r: new[r] for r in running}

    def _sampling_groups(self, running: list[int]) -> dict[SamplingParams, list[int]]:
        """Rows sampled together: those with the same params, in slot order.

        Stopped rows of a group are sampled too (and their draws dropped), so a row's random
        draws do not depend on when the other rows of its batch stop.
        """
        live = {self.rows[r].sampling for r in running}
        groups: dict[SamplingParams, list[int]] = {}
        for r in sorted(self.rows, key=lambda r: self.rows[r].slot):
            if self.rows[r].sampling in live and self.rows[r].cached > 0:
                groups.setdefault(self.rows[r].sampling, []).append(r)
        return groups

    def _record(self, row_id: int, token: int, logprob: float | None, top: TokenLogprob | None) -> None:
        row = self.rows[row_id]
        row.tokens.append(token)
        row.sampled.append(True)
        row.logprobs.append(logprob)
        if row.n_top is not None:
            row.token_logprobs.append(top)
        row.n_sampled += 1
        if token in row.stop_ids:
            row.finish_reason = "eos"
        elif row.stops is not None and row.stops.push(token):
            row.finish_reason = "stop"
        elif (row.max_new_tokens is not None and row.n_sampled >= row.max_new_tokens) \
                or row.length >= self.max_len:
            row.finish_reason = "length"
