"""Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import torch
from torch import nn

from mmllm.nn.attention import Attention, AttentionInputs, KVCache
from mmllm.nn.mlp import build_mlp
from mmllm.nn.moe import MoE
from mmllm.nn.norms import build_norm


class DecoderBlock(nn.Module):
    """One transformer layer. ``n_experts > 0`` swaps the MLP for a :class:`MoE`."""

    def __init__(self, *, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, hidden_dim: int,
                 norm: str = "rmsnorm", norm_eps: float = 1e-5, mlp: str = "swiglu",
                 bias: bool = False, attn_backend: str = "sdpa", n_experts: int = 0,
                 moe_top_k: int = 2, layer_idx: int = 0) -> None:
        super().__init__()
        self.attn_norm = build_norm(norm, dim, norm_eps)
        self.attn = Attention(dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                              bias=bias, backend=attn_backend, layer_idx=layer_idx)
        self.mlp_norm = build_norm(norm, dim, norm_eps)
        self.is_moe = n_experts > 0
        if self.is_moe:
            self.mlp = MoE(dim=dim, hidden_dim=hidden_dim, n_experts=n_experts, top_k=moe_top_k,
                           mlp=mlp, bias=bias)
        else:
            self.mlp = build_mlp(mlp, dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor, *, inputs: AttentionInputs,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                kv_cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the new hidden states (B, T, C) and this block's MoE aux loss (0 if dense)."""
        x = x + self.attn(self.attn_norm(x), inputs=inputs, rope=rope, kv_cache=kv_cache)
        h = self.mlp_norm(x)
        if self.is_moe:
            out, aux = self.mlp(h)
        else:
            out, aux = self.mlp(h), x.new_zeros((), dtype=torch.float32)
        return x + out, aux
