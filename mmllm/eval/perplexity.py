"""Perplexity of held-out text: token-level, per byte (tokenizer-independent) and per word.

Each document is scored on its own, conditioned on a prefix token (BOS, else EOS), as lm-eval's
``loglikelihood_rolling``. Documents longer than the context are scored with a sliding window:
the first window predicts ``max_length`` tokens; every later window predicts the next ``stride``
tokens with the ``max_length - stride`` tokens before them as context, so each token is predicted
exactly once. ``stride == max_length`` reproduces lm-eval's disjoint rolling windows exactly;
a smaller stride gives every prediction more context (Hugging Face's "perplexity of fixed-length
models" recipe).

bits-per-byte = total NLL / (ln 2 * UTF-8 bytes): comparable across tokenizers, unlike token
perplexity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass


def rolling_windows(tokens: Sequence[int], *, prefix_token: int, max_length: int,
                    stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Splits a document into scoring windows.

    Args:
        tokens: the document's token ids (all of them are predicted).
        prefix_token: conditions the first token (BOS/EOS).
        max_length: the model's context length (tokens per input window).
        stride: tokens predicted per window after the first (``1 <= stride <= max_length``);
            None means ``max_length`` (disjoint windows, lm-eval's rolling loglikelihood).

    Returns:
        ``(context_ids, target_ids)`` pairs; ``context + target[:-1]`` is the window's input, of
        at most ``max_length`` tokens, and its last ``len(target)`` predictions are scored.
    """
    stride = max_length if stride is None else stride
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    seq = [prefix_token, *tokens]  # targets are seq[1:]
    n, out, t0 = len(tokens), [], 1
    while t0 <= n:
        t1 = min(n + 1, t0 + (max_length if t0 == 1 else stride))  # targets [t0, t1)
        start = max(0, t1 - 1 - max_length)
        window = seq[start:t1 - 1]  # input: predicts seq[start + 1 : t1]
        n_pred = t1 - t0
        out.append((window[:len(window) - n_pred + 1], seq[t0:t1]))
        t0 = t1
    return out


@dataclass
class PerplexityResult:
    """Corpus-level perplexity (documents pooled: total NLL over total units).

    Attributes:
        nll: summed negative log-likelihood (nats).
        tokens / bytes / words: units predicted (words counted as lm-eval, ``re.split(r"\\s+")``).
        token_perplexity: ``exp(nll / tokens)``.
        bits_per_byte: ``nll / (bytes * ln 2)``.
        byte_perplexity: ``exp(nll / bytes)``.
        word_perplexity: ``exp(nll / words)``.
        doc_nll: per-document NLL.
    """

    nll: float
    tokens: int
    bytes: int
    words: int
    token_perplexity: float
    bits_per_byte: float
    byte_perplexity: float
    word_perplexity: float
    doc_nll: list[float]

    def metrics(self) -> dict[str, float]:
        """The headline numbers (no per-document list)."""
        d = asdict(self)
        d.pop("doc_nll")
        return d


def summarize(texts: Sequence[str], doc_nll: Sequence[float], doc_tokens: Sequence[int]) -> PerplexityResult:
    """Pools per-document NLLs into a :class:`PerplexityResult`."""
    nll, tokens = float(sum(doc_nll)), int(sum(doc_tokens))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    return PerplexityResult(
        nll=nll, tokens=tokens, bytes=n_bytes, words=words,
        token_perplexity=math.exp(nll / max(tokens, 1)),
        bits_per_byte=nll / (max(n_bytes, 1) * math.log(2)),
        byte_perplexity=math.exp(nll / max(n_bytes, 1)),
        word_perplexity=math.exp(nll / max(words, 1)), doc_nll=list(doc_nll))


def perplexity(model, tokenizer, texts: Sequence[str], *, max_length: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``texts`` (see the module docstring).

    Args:
        model: a DecoderLM.
        tokenizer: its HF tokenizer.
        texts: held-out documents.
        max_length: window length (default: the model's ``max_seq_len``).
        stride: tokens predicted per window after the first (default: ``max_length``).
        batch_size: windows per forward.
        progress: show a tqdm bar.

    Returns:
        A :class:`PerplexityResult`.
    """
    from mmllm.eval.runner import ModelRunner

    runner = ModelRunner(model, tokenizer, batch_size=batch_size, max_length=max_length,
                         progress=progress)
    doc_ll, doc_tokens = runner.loglikelihood_rolling(texts, stride=stride, return_counts=True)
    return summarize(texts, [-x for x in doc_ll], doc_tokens)
