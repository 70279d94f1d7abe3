"""Language-modelling losses (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy with masked positions.

    ``labels`` are already aligned with ``logits`` (label t is the token after input t), as the
    kit's data modules produce them; positions equal to ``ignore_index`` (padding, prompts in SFT)
    contribute nothing.

    Args:
        logits: (B, T, V).
        labels: (B, T) target ids or ``ignore_index``.
        reduction: "mean" over counted tokens, or "sum".

    Returns:
        ``(loss, n_tokens)``: the loss (fp32 scalar; 0 when nothing is counted) and the number of
        counted tokens.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    n = (target != ignore_index).sum()
    if reduction == "sum":
        return total, n
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    return total / n.clamp(min=1), n
