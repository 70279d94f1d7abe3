"""Token log-probabilities of the raw model distribution (log_softmax of the logits, before
temperature / top-k / top-p, as OpenAI and vLLM report them), with the most likely alternatives."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the raw model distribution (log_softmax of the logits,
    before temperature / top-k / top-p) and the most likely tokens at its position.

    Attributes:
        token: the token id.
        logprob: its log-probability.
        top: ``(id, logprob)`` of the k most likely tokens, most likely first.
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, ks: Sequence[int]) -> list[TokenLogprob]:
    """The chosen tokens' log-probabilities and their most likely alternatives.

    Args:
        logits: (n, V) raw next-token logits (no temperature applied).
        chosen: (n,) the token taken at each row.
        ks: per row, how many alternatives to keep (0: none).

    Returns:
        One :class:`TokenLogprob` per row (alternatives most likely first).
    """
    logits = logits.float()
    lse = logits.logsumexp(-1, keepdim=True)  # (n, 1): log_softmax = logits - lse, never materialised
    picked = (logits.gather(-1, chosen[:, None].long()) - lse).squeeze(-1).tolist()
    k = min(max(ks), logits.shape[-1])
    values, ids = logits.topk(k, dim=-1) if k > 0 else (logits[:, :0], logits[:, :0].long())  # (n, k)
    values, ids = (values - lse).tolist(), ids.tolist()
    return [TokenLogprob(int(t), p, tuple(zip(ids[i][:ks[i]], values[i][:ks[i]])))
            for i, (t, p) in enumerate(zip(chosen.tolist(), picked))]


def sequence_logprobs(lm_head, hidden, ids, k: int, chunk: int = 512) -> list[TokenLogprob | None]:
    """Each token's log-probability given the ones before it, from one forward's hidden states.

    Args:
        lm_head: the model's output projection.
        hidden: (T, C) final hidden states of a sequence fed from its first token (position i
            predicts token i + 1; T may run past ``ids``).
        ids: the sequence's token ids.
        k: alternatives per position.
        chunk: positions per LM-head call (caps the (chunk, V) logits held at once).

    Returns:
        One entry per token of ``ids``; the first is None (nothing predicts it).
    """
    ids = torch.as_tensor(list(ids), dtype=torch.long, device=hidden.device)
    out: list[TokenLogprob | None] = [None]
    for lo in range(0, len(ids) - 1, chunk):
        hi = min(lo + chunk, len(ids) - 1)
        logits = lm_head(hidden[lo:hi])  # (n, V): predicts ids[lo + 1 : hi + 1]
        out += token_logprobs(logits, ids[lo + 1:hi + 1], [k] * (hi - lo))
    return out
