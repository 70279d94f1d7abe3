"""Pure functions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mmllm.losses import causal_lm_loss
from mmllm.modules.schedules import warmup_cosine, warmup_cosine_factor


def test_causal_lm_loss_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 1.0]]])
    labels = torch.tensor([[1, 0, -100]])
    loss, n = causal_lm_loss(logits, labels)
    # -log(3/4) and -log(1/2), averaged over the 2 counted tokens.
    assert n.item() == 2
    assert loss.item() == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, abs=1e-6)
    total, _ = causal_lm_loss(logits, labels, reduction="sum")
    assert total.item() == pytest.approx(-math.log(0.75) - math.log(0.5), abs=1e-6)
    empty, n0 = causal_lm_loss(logits, torch.full((1, 3), -100))
    assert empty.item() == 0.0 and n0.item() == 0


def test_warmup_cosine_values():
    f = lambda s: warmup_cosine_factor(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine(opt, 110, warmup_steps=10)
    for _ in range(60):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.55)
