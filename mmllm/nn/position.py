"""Positional encodings: rotary (RoPE, with linear / llama3 scaling) and ALiBi slopes.

RoPE uses the "rotate half" layout of transformers' Llama (the first and second halves of a head
are the real and imaginary parts), so HF checkpoints load without permuting q/k weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) for RoPE, with optional context-extension scaling.

    Args:
        head_dim: per-head size (even).
        base: RoPE theta (10_000 in LLaMA 1/2, 500_000 in LLaMA 3).
        scaling: None, ``{"type": "linear", "factor": f}`` (position interpolation) or
            ``{"type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}`` (LLaMA 3.1's frequency-dependent scaling).
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("type", scaling.get("rope_type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return (inv_freq / factor).float()
    if kind == "llama3":
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"unknown rope scaling type {kind!r}: expected 'linear' or 'llama3'")


class RotaryEmbedding(nn.Module):
    """Produces (cos, sin) tables for given positions; applied by :func:`apply_rope`."""

    def __init__(self, head_dim: int, *, base: float = 10_000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, base, scaling), persistent=False)

    def reset_parameters(self) -> None:
        # Buffers are not materialised by to_empty() from the meta device: recompute them.
        self.inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling).to(self.inv_freq.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: (B, T) -> cos, sin: (B, T, head_dim), computed in fp32.
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` (B, H, T, hd) by the angles in cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd)
    return x * cos + _rotate_half(x) * sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022), including the non-power-of-two interleave."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)
