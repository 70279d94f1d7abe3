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
