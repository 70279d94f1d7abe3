"""Mixture-of-experts feed-forward: top-k token-choice router with a load-balancing loss.

Follows Switch Transformer / Mixtral: softmax router, top-k experts per token with renormalised
weights, auxiliary loss ``E * sum_e f_e * P_e`` (fraction of routed tokens times mean router
probability), which is 1.0 for a perfectly uniform router.

The experts' weights are stacked into (E, out, in) parameters (:class:`GroupedExperts`) and run
as one batched matmul over tokens sorted by expert. An expert that receives no token in a step
still takes part in the graph (its slice gets a zero gradient), so every rank produces gradients
for the same parameters every step: DDP with ``find_unused_parameters=False`` and FSDP2's
reduce-scatters stay in step, whatever the router does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MLP_KINDS = ("swiglu", "gelu")


class GroupedExperts(nn.Module):
    """``n_experts`` MLPs with stacked weights, run together on tokens grouped by expert.

    Parameters (nn.Linear layout, one row per output feature): ``gate_proj`` and ``up_proj``
    (E, H, C), ``down_proj`` (E, C, H), and with ``bias`` ``gate_bias``/``up_bias`` (E, H) and
    ``down_bias`` (E, C). "gelu" experts have no gate.

    Args:
        dim: model width C.
        hidden_dim: width H of each expert.
        n_experts: number of experts E.
        mlp: "swiglu" (``down(silu(gate(x)) * up(x))``) or "gelu" (``down(gelu(up(x)))``).
        bias: biases in the expert projections.
    """

    def __init__(self, *, dim: int, hidden_dim: int, n_experts: int, mlp: str = "swiglu",
                 bias: bool = False) -> None:
        super().__init__()
        if mlp not in MLP_KINDS:
            raise ValueError(f"unknown mlp {mlp!r}: expected one of {MLP_KINDS}")
        self.dim, self.hidden_dim, self.n_experts, self.mlp = dim, hidden_dim, n_experts, mlp
        names = (("gate", hidden_dim, dim),) if mlp == "swiglu" else ()
        names += (("up", hidden_dim, dim), ("down", dim, hidden_dim))
        for name, out, inp in names:
            self.register_parameter(f"{name}_proj", nn.Parameter(torch.empty(n_experts, out, inp)))
            self.register_parameter(f"{name}_bias",
                                    nn.Parameter(torch.empty(n_experts, out)) if bias else None)
        self.register_load_state_dict_pre_hook(_stack_per_expert_keys)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default init, per expert (DecoderLM calls :meth:`init_weights`)."""
        for name, p in self.named_parameters():
            bound = 1 / math.sqrt(p.shape[-1] if name.endswith("proj") else self._fan_in(name))
            nn.init.uniform_(p, -bound, bound)

    def _fan_in(self, bias_name: str) -> int:
        return self.hidden_dim if bias_name.startswith("down") else self.dim

    @torch.no_grad()
    def init_weights(self, *, std: float, out_std: float) -> None:
        """Normal(0, std) input projections, Normal(0, out_std) ``down_proj``, zero biases."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=out_std if name == "down_proj" else std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Runs expert ``e`` on its rows of ``x``.

        Args:
            x: (M, C) inputs sorted by expert: the first ``counts[0]`` rows go to expert 0, ...
            counts: (E,) rows per expert (zeros allowed).

        Returns:
            (M, C) outputs in the same order.
        """
        # Padded batched matmul: rows are scattered into an (E, cap, C) buffer with cap the
        # largest count, which works on every device and dtype. The padding rows never reach the
        # output, so they get no gradient; an idle expert multiplies zero rows only.
        E, M = self.n_experts, x.shape[0]
        cap = int(counts.max()) if M else 0
        starts = torch.cumsum(counts, 0) - counts  # (E,) first row of each expert
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
        slot = torch.arange(M, device=x.device) - starts[expert]  # (M,) row within its expert
        buf = x.new_zeros(E, cap, x.shape[1])
        buf[expert, slot] = x
        y = self._mlp(buf)  # (E, cap, C)
        return y[expert, slot]

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        """The E MLPs on (E, cap, C) inputs: (E, cap, C) outputs."""
        up = self._linear(h, "up")
        act = F.silu(self._linear(h, "gate")) * up if self.mlp == "swiglu" \
            else F.gelu(up, approximate="tanh")
        return self._linear(act, "down")

    def _linear(self, h: torch.Tensor, name: str) -> torch.Tensor:
        out = torch.bmm(h, getattr(self, f"{name}_proj").transpose(1, 2))  # (E, cap, out)
        bias = getattr(self, f"{name}_bias")
        return out if bias is None else out + bias[:, None, :]

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on (..., C) inputs with plain ``F.linear`` (a reference path)."""
        def lin(t, name):
            bias = getattr(self, f"{name}_bias")
            return F.linear(t, getattr(self, f"{name}_proj")[e], None if bias is None else bias[e])

        up = lin(x, "up")
        act = F.silu(lin(x, "gate")) * up if self.mlp == "swiglu" else F.gelu(up, approximate="tanh")
        return lin(act, "down")


def _stack_per_expert_keys(module: GroupedExperts, state_dict: dict, prefix: str, *args) -> None:
    """Loads checkpoints of the per-expert layout (``experts.{e}.up_proj.weight``, one
    nn.Linear per expert, before the weights were stacked) by stacking their tensors."""
    for p in [n for n, _ in module.named_parameters()]:
        proj, kind = p.rsplit("_", 1)
        old = [f"{prefix}{e}.{proj}_proj.{'weight' if kind == 'proj' else 'bias'}"
               for e in range(module.n_experts)]
        if prefix + p not in state_dict and all(k in state_dict for k in old):
            state_dict[prefix + p] = torch.stack([state_dict.pop(k) for k in old])


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
        self.experts = GroupedExperts(dim=dim, hidden_dim=hidden_dim, n_experts=n_experts,
                                      mlp=mlp, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the mixed output (B, T, C) and the load-balancing loss (scalar)."""
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        probs = self.router(flat).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        # Sort the N*k (token, expert) assignments by expert; stable keeps token order inside.
        order = chosen.reshape(-1).argsort(stable=True)  # (N*k,)
        token = order // self.top_k  # token of each sorted assignment
        counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts)  # (E,)
        y = self.experts(flat[token], counts)  # (N*k, C)
        y = y * weights.reshape(-1)[order, None]
        out = torch.zeros_like(flat).index_add_(0, token, y)
        routed = F.one_hot(chosen, self.n_experts).sum(1).float()  # (N, E), 0/1 per expert
        frac_tokens = routed.mean(0) / self.top_k
        aux = self.n_experts * (frac_tokens * probs.mean(0)).sum()
        return out.view(B, T, C), aux
