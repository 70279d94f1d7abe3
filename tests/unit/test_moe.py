"""MoE with stacked experts: parity with a per-expert reference loop (outputs and gradients),
idle experts still in the graph, loading the per-expert checkpoint layout, and init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmllm.models import DecoderLM
from mmllm.nn.mlp import build_mlp
from mmllm.nn.moe import MoE


def reference_experts(moe: MoE, mlp: str, bias: bool) -> nn.ModuleList:
    """One nn.Linear-based MLP per expert holding the stacked weights (the old layout)."""
    g = moe.experts
    experts = nn.ModuleList(build_mlp(mlp, g.dim, g.hidden_dim, bias=bias) for _ in range(g.n_experts))
    with torch.no_grad():
        for e, expert in enumerate(experts):
            for name in ("gate", "up", "down"):
                if hasattr(expert, f"{name}_proj"):
                    lin = getattr(expert, f"{name}_proj")
                    lin.weight.copy_(getattr(g, f"{name}_proj")[e])
                    if bias:
                        lin.bias.copy_(getattr(g, f"{name}_bias")[e])
    return experts


def reference_forward(moe: MoE, experts: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """The loop over experts that skips idle ones (the implementation before stacking)."""
    flat = x.reshape(-1, x.shape[-1])
    probs = moe.router(flat).float().softmax(-1)
    weights, chosen = probs.topk(moe.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e, expert in enumerate(experts):
        token, slot = torch.where(chosen == e)
        if token.numel():
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
    return out.view_as(x)


@pytest.mark.parametrize("mlp,bias,top_k", [("swiglu", False, 2), ("gelu", True, 1),
                                             ("swiglu", True, 3)])
def test_matches_reference_loop_outputs_and_grads(mlp, bias, top_k):
    moe = MoE(dim=16, hidden_dim=24, n_experts=5, top_k=top_k, mlp=mlp, bias=bias)
    experts = reference_experts(moe, mlp, bias)
    x = torch.randn(3, 7, 16, requires_grad=True)
    out, _ = moe(x)
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_forward(moe, experts, x_ref)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-5)
    for e, expert in enumerate(experts):
        torch.testing.assert_close(moe.experts.down_proj.grad[e], expert.down_proj.weight.grad,
                                   atol=1e-6, rtol=1e-5)
        if bias:
            torch.testing.assert_close(moe.experts.up_bias.grad[e], expert.up_proj.bias.grad,
                                       atol=1e-6, rtol=1e-5)


def test_idle_expert_is_in_the_graph_with_a_zero_gradient():
    moe = MoE(dim=8, hidden_dim=16, n_experts=4, top_k=2)
    with torch.no_grad():  # expert 3 can never win: its router logit is always -inf-ish
        moe.router.weight[3] = 0.0
    moe.router.register_forward_hook(lambda m, i, o: o - torch.tensor([0, 0, 0, 1e4]))
    out, _ = moe(torch.randn(2, 6, 8))
    out.square().sum().backward()
    for name, p in moe.experts.named_parameters():
        assert p.grad is not None, name
        assert p.grad[3].abs().max() == 0  # idle: present, zero
        assert p.grad[:3].abs().sum() > 0


def test_no_tokens_at_all():
    moe = MoE(dim=8, hidden_dim=16, n_experts=4, top_k=2)
    out, _ = moe(torch.randn(0, 3, 8))
    assert out.shape == (0, 3, 8)


def test_loads_the_per_expert_checkpoint_layout():
    moe = MoE(dim=8, hidden_dim=16, n_experts=3, top_k=2, bias=True)
    experts = reference_experts(moe, "swiglu", True)
    old = {"router.weight": moe.router.weight.detach().clone(),
           **{f"experts.{k}": v for k, v in experts.state_dict().items()}}
    fresh = MoE(dim=8, hidden_dim=16, n_experts=3, top_k=2, bias=True)
    fresh.load_state_dict(old)
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(fresh(x)[0], moe(x)[0])


def test_decoder_init_scales_expert_output_projections():
    model = DecoderLM(vocab_size=64, dim=64, n_layers=8, n_heads=4, hidden_dim=256, n_experts=4)
    experts = model.layers[0].mlp.experts
    assert experts.up_proj.std().item() == pytest.approx(0.02, rel=0.05)
    assert experts.down_proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_expert_weights_get_weight_decay():
    from mmllm.modules import CausalLMModule

    model = DecoderLM(vocab_size=64, dim=16, n_layers=1, n_heads=2, hidden_dim=32, n_experts=4)
    decay, _ = CausalLMModule(model=model).param_groups()
    ids = {id(p) for p in decay["params"]}
    assert id(model.layers[0].mlp.experts.gate_proj) in ids
    assert id(model.layers[0].mlp.router.weight) in ids
