"""Feed-forward blocks: SwiGLU (LLaMA) and the GELU MLP (GPT-2 / BLOOM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def llama_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4*dim, times an optional multiplier, rounded up."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020). Names follow transformers' LlamaMLP."""

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """``down(gelu(up(x)))``, the original transformer MLP."""

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def build_mlp(kind: str, dim: int, hidden_dim: int, *, bias: bool = False) -> nn.Module:
    """Returns the MLP called ``kind`` ("swiglu" or "gelu")."""
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, bias=bias)
    if kind == "gelu":
        return GeluMLP(dim, hidden_dim, bias=bias)
    raise ValueError(f"unknown mlp {kind!r}: expected 'swiglu' or 'gelu'")
