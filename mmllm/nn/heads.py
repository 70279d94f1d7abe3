"""Scalar heads on a decoder's hidden states: reward models (one score per sequence) and value
heads (one value per token, PPO-style).

The score of a sequence is read at its last real token, found from the attention mask (left or
right padding, or none) or from lengths (right padding).
"""

from __future__ import annotations

import torch
from torch import nn

POOLS = ("last", "all")


def last_token_index(*, attention_mask: torch.Tensor | None = None,
                     lengths: torch.Tensor | None = None, seq_len: int | None = None,
                     batch_size: int | None = None) -> torch.Tensor:
    """Index of the last real token of every row.

    Args:
        attention_mask: (B, T) 1 for tokens, 0 for padding (left, right, or both sides).
        lengths: (B,) real tokens per row, right padding (used when there is no mask).
        seq_len, batch_size: without mask and lengths every row is full: index ``seq_len - 1``.

    Returns:
        (B,) int64 indices.

    Raises:
        ValueError: a row has no real token, or a length is outside ``[1, seq_len]``.
    """
    if attention_mask is not None:
        mask = attention_mask.bool()
        if not mask.any(-1).all():
            raise ValueError("a row of attention_mask has no real token: it has no last token")
        T = mask.shape[-1]
        pos = torch.arange(T, device=mask.device).expand_as(mask)
        return torch.where(mask, pos, -1).amax(-1)  # (B,) the last position that is a token
    if lengths is not None:
        lengths = lengths.long()
        top = seq_len if seq_len is not None else int(lengths.max())
        if ((lengths < 1) | (lengths > top)).any():
            raise ValueError(f"lengths must be in [1, {top}], got {lengths.tolist()}")
        return lengths - 1
    if seq_len is None or batch_size is None:
        raise ValueError("give attention_mask, lengths, or seq_len and batch_size")
    return torch.full((batch_size,), seq_len - 1, dtype=torch.long)


class ScalarHead(nn.Module):
    """A linear map from hidden states to one number, at the last real token or every token.

    Args:
        dim: hidden width C.
        pool: "last" (one score per sequence: reward model) or "all" (one per token: values).
        bias: a bias on the projection.
        init_std: std of the normal init of the weight (the bias starts at 0).
    """

    def __init__(self, *, dim: int, pool: str = "last", bias: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}: expected one of {POOLS}")
        self.pool, self.init_std = pool, init_std
        self.proj = nn.Linear(dim, 1, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, mean=0.0, std=self.init_std)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Scores of (B, T, C) hidden states.

        Args:
            hidden: the decoder's final (normed) hidden states.
            attention_mask: (B, T) padding mask ("last": where each sequence ends; "all": padded
                positions get 0).
            lengths: (B,) lengths of right-padded rows (instead of the mask).

        Returns:
            (B,) for pool "last", (B, T) for pool "all" (fp32).
        """
        B, T, _ = hidden.shape
        if self.pool == "last":
            idx = last_token_index(attention_mask=attention_mask, lengths=lengths, seq_len=T,
                                   batch_size=B).to(hidden.device)
            # Gather before projecting: (B, C) instead of (B, T, C) through the head.
            picked = hidden[torch.arange(B, device=hidden.device), idx]  # (B, C)
            return self.proj(picked).squeeze(-1).float()
        values = self.proj(hidden).squeeze(-1).float()  # (B, T)
        if attention_mask is not None:
            values = values * attention_mask.to(values.dtype)
        elif lengths is not None:
            keep = torch.arange(T, device=hidden.device) < lengths.to(hidden.device)[:, None]
            values = values * keep
        return values


class ValueHead(ScalarHead):
    """Per-token values (PPO critic): a :class:`ScalarHead` with ``pool="all"``.

    Args:
        dim: hidden width.
        bias: a bias on the projection.
        init_std: std of the weight init.
    """

    def __init__(self, *, dim: int, bias: bool = True, init_std: float = 0.02) -> None:
        super().__init__(dim=dim, pool="all", bias=bias, init_std=init_std)
