"""Normalisation layers: RMSNorm (LLaMA) and LayerNorm, chosen by name."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019) as used by LLaMA.

    Computed in float32 and cast back, like transformers' LlamaRMSNorm, so bf16 runs match.

    Args:
        dim: size of the last dimension.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """Returns the norm called ``kind`` ("rmsnorm" or "layernorm") over ``dim`` features."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}: expected 'rmsnorm' or 'layernorm'")
