"""Mixture-of-experts feed-forward: top-k token-choice router with a load-balancing loss.

Follows Switch Transformer / Mixtral: softmax router, top-k experts per token with renormalised
weights, auxiliary loss ``E * sum_e f_e * P_e`` (fraction of routed tokens times mean router
probability), which is 1.0 for a perfectly uniform router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmllm.nn.mlp import build_mlp


class MoE(nn.Module):
    """Top-k routed mixture of ``n_experts`` MLPs.

    Args:
        dim: model width.
        hidden_dim: width of each expert.
        n_experts: number of experts.
        top_k: experts per token.
        mlp: expert kind ("swiglu" or "gelu").
        bias: biases in the expert projections.
    """

    def __init__(self, *, dim: int, hidden_dim: int, n_experts: int, top_k: int = 2,
                 mlp: str = "swiglu", bias: bool = False) -> None:
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        self.n_experts, self.top_k = n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = nn.ModuleList(build_mlp(mlp, dim, hidden_dim, bias=bias) for _ in range(n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixed output (B, T, C) and the load-balancing loss (scalar)."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        routed = F.one_hot(chosen, self.n_experts).sum(1).float()  # (N, E), 0/1 per expert
        frac_tokens = routed.mean(0) / self.top_k
        aux = self.n_experts * (frac_tokens * probs.mean(0)).sum()
        return out.view(B, T, C), aux
