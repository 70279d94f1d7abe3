"""Learning-rate schedules, given to modules as ``_partial_`` configs: ``schedule(optimizer, total_steps)``."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0 to 1, then cosine decay to ``min_lr_ratio`` (LLaMA: 0.1)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _WarmupCosine:
    # A picklable callable (LambdaLR's state_dict keeps callable objects' __dict__).
    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps=self.warmup_steps,
                                    total_steps=self.total_steps, min_lr_ratio=self.min_lr_ratio)


def warmup_cosine(optimizer: Optimizer, total_steps: int, *, warmup_steps: int = 100,
                  warmup_ratio: float | None = None, min_lr_ratio: float = 0.1) -> LambdaLR:
    """Warmup + cosine schedule over ``total_steps`` optimizer steps.

    Args:
        warmup_steps: linear warmup length (ignored if ``warmup_ratio`` is set).
        warmup_ratio: warmup as a fraction of ``total_steps``.
        min_lr_ratio: final LR as a fraction of the peak.
    """
    if warmup_ratio is not None:
        warmup_steps = int(warmup_ratio * total_steps)
    return LambdaLR(optimizer, _WarmupCosine(warmup_steps, total_steps, min_lr_ratio))


def constant(optimizer: Optimizer, total_steps: int, *, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup, then a constant LR."""
    return LambdaLR(optimizer, _WarmupCosine(warmup_steps, warmup_steps, 1.0))
