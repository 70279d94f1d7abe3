"""Toolformer (Schick et al., 2023): a model that teaches itself to call tools, and runs them inline.

A call is written into the text with three special tokens::

    The sum is <API>calculator(400+25) → 425</API> 425.

Self-supervised annotation of plain text (:class:`ToolformerAnnotator`):

1. **Sampling.** A few-shot prompt per tool shows text with calls inserted; given it and the prefix
   ``x[:i]``, positions where ``P(<API> | prompt, x[:i]) > tau_s`` are candidates (the ``top_k``
   most likely kept); at each, ``num_samples`` calls are sampled (one decode session, stopping
   at ``→`` or ``</API>``).
2. **Execution.** Each call is parsed (``name(args)``) and run through the
   :class:`~mmllm.tools.registry.ToolRegistry`; failed calls are dropped (counted).
3. **Filtering.** With the weighted loss ``L_i(z) = sum_j w_{j-i} * -log p(x_j | z, x[:j])``
   (``w_t ∝ max(0, 1 - 0.2 t)``, normalised), ``L+ = L_i(call → result)`` and
   ``L- = min(L_i(nothing), L_i(call → ))``; a call is kept when ``L- - L+ >= tau_f``.
4. **Fine-tuning data.** The text with the kept calls *and* results inserted; result tokens (and
   the ``</API>`` the runtime writes after them) get label -100, so the model learns to make
   calls, not to imitate tool output. Rows are ``{"input_ids", "labels"}`` with the kit's
   shifted-label convention (``labels[t]`` is the target of position t), ready for
   :class:`~mmllm.modules.causal_lm.CausalLMModule`.

Inference (:class:`ToolformerDecoder`): decode on a :class:`~mmllm.generation.DecodeSession`; when
the model emits ``→`` inside an open ``<API>``, the call is parsed and executed, the result and
``</API>`` are appended to the row's KV cache (no re-prefill) and decoding resumes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mmllm.generation import DecodeSession, generate_ids
from mmllm.generation.sampling import SamplingParams, sample_next_token
from mmllm.tools.registry import ToolRegistry, ToolResult


@dataclass(frozen=True)
class ToolformerTokens:
    """The three token strings of the call syntax."""

    start: str = "<API>"
    end: str = "</API>"
    arrow: str = "→"


TOKENS = ToolformerTokens()
PROMPTS_PATH = Path(__file__).parent / "data" / "toolformer_prompts.json"
_CALL = re.compile(r"^\s*([A-Za-z0-9_.-]{1,64})\s*\((.*)\)\s*$", re.DOTALL)
_SENTENCE_END = re.compile(r"[.!?\n]")


def add_toolformer_tokens(tokenizer, model: nn.Module | None = None, *,
                          tokens: ToolformerTokens = TOKENS) -> int:
    """Adds ``<API>``, ``</API>`` and ``→`` as special tokens (never split) to a kit or HF tokenizer.

    Args:
        tokenizer: a transformers tokenizer (modified in place).
        model: if given, its embeddings grow to ``len(tokenizer)`` when needed
            (``resize_token_embeddings``: new rows start at the mean of the old ones).

    Returns:
        How many tokens were added to the vocabulary.
    """
    before = len(tokenizer)
    missing = [t for t in (tokens.start, tokens.end, tokens.arrow) if t not in tokenizer.get_vocab()
               or t not in tokenizer.all_special_tokens]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    if model is not None and getattr(model, "vocab_size", len(tokenizer)) < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    return len(tokenizer) - before


def token_ids(tokenizer, tokens: ToolformerTokens = TOKENS) -> tuple[int, int, int]:
    """Ids of (start, end, arrow); a clear error when the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (tokens.start, tokens.end, tokens.arrow) if t not in vocab]
    if missing:
        raise ValueError(f"the tokenizer lacks the Toolformer tokens {missing}: call add_toolformer_tokens")
    return vocab[tokens.start], vocab[tokens.end], vocab[tokens.arrow]


def default_prompts(registry: ToolRegistry, path: str | Path = PROMPTS_PATH) -> dict[str, str]:
    """The shipped few-shot prompts (calculator, search, today, translate) of the registry's tools."""
    prompts = json.loads(Path(path).read_text())
    return {name: p for name, p in prompts.items() if name in registry}


# --------------------------------------------------------------------------- calls as text
def parse_call(text: str) -> tuple[str, str]:
    """``"calculator(2+3)"`` -> ``("calculator", "2+3")``; ValueError when it is not a call."""
    m = _CALL.match(text)
    if m is None:
        raise ValueError(f"not a call of the form name(args): {text!r}")
    return m.group(1), m.group(2).strip()


def call_arguments(registry: ToolRegistry, name: str, args: str) -> dict | str:
    """The arguments of ``name(args)``: a JSON object as given, else the text bound to the tool's
    one required parameter (Toolformer's ``Calculator(2+3)``, ``WikiSearch(query)`` style)."""
    if args.startswith("{"):
        return args
    if name not in registry:
        return {}
    schema = registry[name].parameters
    required = schema.get("required") or list(schema.get("properties", {}))[:1]
    if len(required) != 1:
        return {}  # the registry's validation names what is missing
    return {required[0]: args.strip().strip("\"'")}


def execute_call(registry: ToolRegistry, call_text: str) -> ToolResult:
    """Parses and runs one call text through the registry (never raises)."""
    try:
        name, args = parse_call(call_text)
    except ValueError as exc:
        return ToolResult("?", False, f"error: {exc}")
    return registry.call(name, call_arguments(registry, name, args))


# ------------------------------------------------------------------------------ filtering
def loss_weights(n: int, decay: float = 0.2) -> list[float]:
    """The paper's weights ``w_t ∝ max(0, 1 - decay * t)`` for t = 0..n-1, normalised to sum 1."""
    raw = [max(0.0, 1.0 - decay * t) for t in range(n)]
    total = sum(raw)
    return [w / total for w in raw] if total > 0 else raw


def weighted_loss(token_losses: Sequence[float], start: int, decay: float = 0.2) -> float:
    """``sum_t w_t * token_losses[start + t]`` over the positions that exist."""
    tail = list(token_losses[start:])
    return float(sum(w * l for w, l in zip(loss_weights(len(tail), decay), tail)))


Scorer = Callable[[list[list[int]]], list[list[float]]]


def model_scorer(model: nn.Module, *, batch_size: int = 16) -> Scorer:
    """Per-token NLL of sequences under ``model``: ``out[s][j] = -log p(seq[j] | seq[:j])`` (0 at j=0)."""

    @torch.no_grad()
    def score(seqs: list[list[int]]) -> list[list[float]]:
        device = next(model.parameters()).device
        out: list[list[float]] = []
        for b in range(0, len(seqs), batch_size):
            chunk = seqs[b:b + batch_size]
            T = max(len(s) for s in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            for k, s in enumerate(chunk):
                ids[k, :len(s)] = torch.as_tensor(s)
            ids = ids.to(device)
            logp = model(ids).logits.float().log_softmax(-1)  # (B, T, V); right padding never attended
            nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            out += [[0.0] + nll[k, :len(s) - 1].tolist() for k, s in enumerate(chunk)]
        return out

    return score


@dataclass
class Candidate:
    """One sampled call at one position of one text."""

    position: int            # insert before token ``position`` of the text
    call: str                # "calculator(2+3)"
    result: ToolResult | None = None
    loss_plus: float | None = None
    loss_minus: float | None = None

    @property
    def gain(self) -> float | None:
        return None if self.loss_plus is None else self.loss_minus - self.loss_plus


@dataclass
class ToolformerStats:
    texts: int = 0
    candidates: int = 0      # positions above tau_s (after top-k)
    sampled: int = 0         # calls sampled
    executed: int = 0        # calls that parsed and ran without error
    kept: int = 0            # calls that passed the filter
    failed: dict = field(default_factory=dict)

    @property
    def share_kept(self) -> float:
        return self.kept / self.sampled if self.sampled else 0.0

    def as_dict(self) -> dict:
        return {"texts": self.texts, "candidates": self.candidates, "sampled": self.sampled,
                "executed": self.executed, "kept": self.kept, "share_kept": self.share_kept,
                "failed": dict(self.failed)}


class ToolformerAnnotator:
    """Samples, executes and filters calls for plain texts; returns fine-tuning rows.

    Args:
        model: a DecoderLM (eval mode) whose tokenizer has the Toolformer tokens.
        tokenizer: its tokenizer.
        registry: the tools.
        prompts: tool name -> few-shot prompt containing ``{text}`` where the input goes; the
            prompt shows examples in the call syntax and ends where the annotated text starts
            (default: :func:`default_prompts` for the registry's tools).
        tau_s: sampling threshold on ``P(<API>)``.
        top_k: positions kept per text and tool.
        num_samples: calls sampled per position.
        tau_f: filtering threshold on ``L- - L+``.
        max_call_tokens: cap on a sampled call's length.
        temperature: sampling temperature of calls.
        decay: the weight decay of the filter loss (0.2 in the paper).
        prefix_calls: score the call as a prefix of the text (the paper's choice, since the model
            has not seen calls yet) instead of inserted at its position.
        scorer: per-token NLLs of sequences (default: the model's).
        seed: seeds call sampling.
    """

    def __init__(self, *, model: nn.Module, tokenizer, registry: ToolRegistry, prompts: Mapping[str, str] | None = None,
                 tau_s: float = 0.05, top_k: int = 5, num_samples: int = 5, tau_f: float = 1.0,
                 max_call_tokens: int = 32, temperature: float = 1.0, decay: float = 0.2,
                 prefix_calls: bool = True, scorer: Scorer | None = None, seed: int = 0) -> None:
        prompts = default_prompts(registry) if prompts is None else prompts
        if not prompts:
            raise ValueError(f"no few-shot prompt for any of the tools {registry.names}")
        unknown = [n for n in prompts if n not in registry]
        if unknown:
            raise ValueError(f"prompts for tools the registry lacks: {unknown}")
        if any("{text}" not in p for p in prompts.values()):
            raise ValueError("every few-shot prompt needs a {text} placeholder")
        self.model, self.tokenizer, self.registry, self.prompts = model, tokenizer, registry, dict(prompts)
        self.tau_s, self.top_k, self.num_samples, self.tau_f = tau_s, top_k, num_samples, tau_f
        self.max_call_tokens, self.temperature, self.decay = max_call_tokens, temperature, decay
        self.prefix_calls = prefix_calls
        self.scorer = scorer or model_scorer(model)
        self.start_id, self.end_id, self.arrow_id = token_ids(tokenizer)
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        self.stats = ToolformerStats()

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def call_ids(self, call: str, result: str | None) -> list[int]:
        """Tokens of ``<API>call</API>`` (result None), ``<API>call → </API>`` ("") or with a result."""
        ids = [self.start_id] + self._encode(call)
        if result is None:
            return ids + [self.end_id]
        return ids + [self.arrow_id] + (self._encode(" " + result) if result else []) + [self.end_id]

    # ---------------------------------------------------------------------------- steps
    @torch.no_grad()
    def candidate_positions(self, prompt_ids: list[int], x: list[int]) -> list[int]:
        """Positions i (1..len(x)-1) with ``P(<API> | prompt, x[:i]) > tau_s``, the top_k most likely."""
        device = next(self.model.parameters()).device
        seq = torch.tensor([prompt_ids + x], device=device)
        probs = self.model(seq).logits[0].float().softmax(-1)[:, self.start_id]  # (T,)
        # probs[t] predicts position t+1: text position i is predicted at len(prompt) + i - 1.
        p = probs[len(prompt_ids):len(prompt_ids) + len(x) - 1]  # i = 1 .. len(x)-1
        order = sorted(((float(v), i + 1) for i, v in enumerate(p.tolist()) if v > self.tau_s), reverse=True)
        return sorted(i for _, i in order[:self.top_k])

    def sample_calls(self, prompt_ids: list[int], x: list[int], positions: list[int]) -> list[Candidate]:
        """``num_samples`` calls per position, sampled in one batch through the decode session."""
        if not positions:
            return []
        prompts = [prompt_ids + x[:i] + [self.start_id] for i in positions for _ in range(self.num_samples)]
        new = generate_ids(self.model, prompts, max_new_tokens=self.max_call_tokens,
                           temperature=self.temperature, eos_token_id=[self.arrow_id, self.end_id],
                           generator=self.generator)
        out = []
        for k, ids in enumerate(new):
            body = [t for t in ids if t not in (self.arrow_id, self.end_id)]
            if len(body) == len(ids):  # never closed within max_call_tokens
                self.stats.failed["unterminated"] = self.stats.failed.get("unterminated", 0) + 1
                continue
            out.append(Candidate(positions[k // self.num_samples], self.tokenizer.decode(body).strip()))
        return out

    def _scored_sequence(self, x: list[int], i: int, z: list[int]) -> tuple[list[int], int]:
        """The sequence scored for call tokens ``z`` at position i, and where x[i] sits in it."""
        if self.prefix_calls:
            return z + x, len(z) + i
        return x[:i] + z + x[i:], i + len(z)

    def filter(self, x: list[int], candidates: list[Candidate]) -> list[Candidate]:
        """Scores executed candidates (L+, L-) and returns those with ``L- - L+ >= tau_f``."""
        seqs, where = [], []
        for c in candidates:
            for z in (self.call_ids(c.call, c.result.content), [], self.call_ids(c.call, "")):
                seq, at = self._scored_sequence(x, c.position, z)
                seqs.append(seq)
                where.append(at)
        losses = self.scorer(seqs) if seqs else []
        for k, c in enumerate(candidates):
            plus, none, empty = (weighted_loss(losses[3 * k + j], where[3 * k + j], self.decay) for j in range(3))
            c.loss_plus, c.loss_minus = plus, min(none, empty)
        return [c for c in candidates if c.gain >= self.tau_f]

    # ------------------------------------------------------------------------------ all
    def annotate(self, text: str) -> tuple[dict[str, list[int]], list[Candidate]]:
        """Runs sampling, execution and filtering for one text.

        Returns:
            ``(row, kept)``: the fine-tuning row (``input_ids``, ``labels``; the plain text when
            nothing is kept) and the kept candidates (best one per position).
        """
        x = self._encode(text)
        self.stats.texts += 1
        executed: list[Candidate] = []
        for prompt in self.prompts.values():
            prefix, _, _ = prompt.partition("{text}")
            prompt_ids = self._encode(prefix)
            positions = self.candidate_positions(prompt_ids, x)
            self.stats.candidates += len(positions)
            sampled = self.sample_calls(prompt_ids, x, positions)
            self.stats.sampled += len(sampled)
            for c in sampled:
                c.result = execute_call(self.registry, c.call)
                if c.result.ok:
                    executed.append(c)
                else:
                    self.stats.failed["error"] = self.stats.failed.get("error", 0) + 1
        self.stats.executed += len(executed)
        best: dict[int, Candidate] = {}
        for c in self.filter(x, executed):
            if c.position not in best or c.gain > best[c.position].gain:
                best[c.position] = c
        kept = [best[i] for i in sorted(best)]
        self.stats.kept += len(kept)
        return self.training_row(x, kept), kept

    def annotate_many(self, texts: Iterable[str], *, progress: bool = True) -> Iterator[dict]:
        """Rows for a stream of texts, each with its kept calls (``calls``: position, call, result,
        gain) for inspection; :attr:`stats` counts as it goes (``progress``: a tqdm bar over the
        texts, with the calls kept so far)."""
        total = len(texts) if isinstance(texts, Sized) else None
        bar = tqdm(texts, desc="toolformer annotate", unit="text", total=total, leave=False, disable=not progress)
        for text in bar:
            row, kept = self.annotate(text)
            bar.set_postfix_str(f"kept {self.stats.kept}", refresh=False)
            yield row | {"calls": [{"position": c.position, "call": c.call, "result": c.result.content,
                                    "gain": c.gain} for c in kept]}

    def training_row(self, x: list[int], kept: Sequence[Candidate]) -> dict[str, list[int]]:
        """``x`` with every kept call and result inserted; results and ``</API>`` unsupervised."""
        ids: list[int] = []
        supervised: list[bool] = []
        prev = 0
        for c in sorted(kept, key=lambda c: c.position):
            ids += x[prev:c.position]
            supervised += [True] * (c.position - prev)
            call = self.call_ids(c.call, c.result.content)
            n_call = call.index(self.arrow_id) + 1  # <API> name(args) → : the model writes these
            ids += call
            supervised += [True] * n_call + [False] * (len(call) - n_call)
            prev = c.position
        ids += x[prev:]
        supervised += [True] * (len(x) - prev)
        labels = [ids[t + 1] if supervised[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]
        return {"input_ids": ids, "labels": labels}


class ToolformerDecoder:
    """Decoding that executes ``<API>name(args) →`` calls as the model writes them.

    Args:
        model: a DecoderLM in eval mode.
        tokenizer: its tokenizer (with the Toolformer tokens).
        registry: the tools.
        one_call_per_sentence: forbid a second ``<API>`` before a sentence ends.
        max_calls: calls per row at most (later arrows are plain tokens).
        max_result_tokens: a result is cut to this many tokens before it is appended.
    """

    def __init__(self, *, model: nn.Module, tokenizer, registry: ToolRegistry,
                 one_call_per_sentence: bool = True, max_calls: int = 8, max_result_tokens: int = 128) -> None:
        self.model, self.tokenizer, self.registry = model, tokenizer, registry
        self.one_call_per_sentence, self.max_calls = one_call_per_sentence, max_calls
        self.max_result_tokens = max_result_tokens
        self.start_id, self.end_id, self.arrow_id = token_ids(tokenizer)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _open_call(self, seq: list[int]) -> list[int] | None:
        """Tokens of the call after the last ``<API>`` when it is still open, else None."""
        if self.start_id not in seq:
            return None
        k = len(seq) - 1 - seq[::-1].index(self.start_id)
        return None if self.end_id in seq[k:] else seq[k + 1:]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], *, max_new_tokens: int = 64,
                 sampling: SamplingParams | None = None, generator: torch.Generator | None = None,
                 record_logits: bool = False) -> dict:
        """Decodes one prompt, running calls inline.

        Returns:
            ``{"tokens": new ids (results included), "calls": [(call, ToolResult)],
            "finish_reason": ..., "logits": [(V,) logits before each sampled token] if record_logits}``.
        """
        eos = self.tokenizer.eos_token_id
        room = self.max_calls * (self.max_result_tokens + 1)  # appended results and their </API>
        session = DecodeSession(self.model, max_rows=1, max_len=len(prompt_ids) + max_new_tokens + room + 1,
                                eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id or 0,
                                generator=generator)
        sampling = sampling or SamplingParams()
        (r,) = session.add_rows([list(prompt_ids)], max_new_tokens=max_new_tokens,
                                stop_ids=[self.arrow_id, self.start_id], sampling=sampling)
        row = session.rows[r]
        calls: list[tuple[str, ToolResult]] = []
        logits_seen: list[torch.Tensor] = []
        since_call: list[int] | None = None  # tokens since the last call's </API> (None: no call yet)
        while True:
            if row.finish_reason == "eos" and row.tokens and row.tokens[-1] == self.arrow_id:
                call = self._open_call(row.prompt + row.tokens[:-1])
                if call is not None and len(calls) < self.max_calls:
                    result = execute_call(self.registry, self.tokenizer.decode(call))
                    calls.append((self.tokenizer.decode(call).strip(), result))
                    session.append(r, self._encode(" " + result.content)[:self.max_result_tokens] + [self.end_id])
                    since_call = []
                    continue
                session.append(r, [])  # a stray arrow: keep decoding
            elif row.finish_reason == "eos" and row.tokens and row.tokens[-1] == self.start_id:
                if self._call_allowed(since_call):
                    session.append(r, [])
                else:
                    self._replace_start(session, r, sampling, generator)
            elif row.finished:
                break
            if row.n_sampled >= max_new_tokens:
                row.finish_reason = "length"
                break
            logits = session.prefill([r])[r]
            if record_logits:
                logits_seen.append(logits)
            session.step()
            if since_call is not None:
                since_call.append(row.tokens[-1])
        out = {"tokens": list(row.tokens), "calls": calls, "finish_reason": row.finish_reason}
        return out | ({"logits": logits_seen} if record_logits else {})

    def _replace_start(self, session: DecodeSession, r: int, sampling: SamplingParams, generator) -> None:
        """Swaps a refused ``<API>`` for the row's best other token (sampled as the row samples)."""
        row = session.rows[r]
        session.truncate(r, row.length - 1)
        logits = session.prefill([r])[r]
        logits[self.start_id] = float("-inf")
        tok = sample_next_token(logits[None], temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p, generator=generator)
        session.append(r, tok.tolist())
        row.n_sampled += 1

    def _call_allowed(self, since_call: list[int] | None) -> bool:
        if not self.one_call_per_sentence or since_call is None:
            return True
        return bool(_SENTENCE_END.search(self.tokenizer.decode(since_call[:-1])))

    def generate_text(self, prompt: str, **kwargs) -> dict:
        """:meth:`generate` on text; adds ``"text"`` (special tokens kept, so calls are visible)."""
        out = self.generate(self._encode(prompt), **kwargs)
        return out | {"text": self.tokenizer.decode(out["tokens"])}


def format_call(name: str, args: str | Mapping, result: str | None = None, tokens: ToolformerTokens = TOKENS) -> str:
    """``<API>name(args) → result</API>`` as text (args: text, or a dict written as JSON)."""
    args = args if isinstance(args, str) else json.dumps(dict(args), ensure_ascii=False)
    tail = "" if result is None else f" {tokens.arrow} {result}"
    return f"{tokens.start}{name}({args}){tail}{tokens.end}"
