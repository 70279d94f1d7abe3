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


def lightning_optimizers(module, optimizer: Optimizer, scheduler_factory=None, *, steps_per_batch: int = 1):
    """What a LightningModule's ``configure_optimizers`` returns: ``optimizer`` alone, or with the
    schedule ``scheduler_factory(optimizer, total_steps)`` stepped every optimizer step.

    ``total_steps`` is the module's ``trainer.max_steps`` when set, else Lightning's estimate of
    the run's batches, times ``steps_per_batch`` (optimizer steps per batch, e.g. PPO's epochs x
    minibatches). Without a schedule the trainer is not consulted (a module may build its
    optimizer before it is attached to one).
    """
    if scheduler_factory is None:
        return optimizer
    trainer = module.trainer
    batches = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 \
        else int(trainer.estimated_stepping_batches)
    scheduler = scheduler_factory(optimizer, batches * steps_per_batch)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decay_groups(named_parameters) -> list[dict]:
    """AdamW groups by name: decay on matrices; none on vectors, norms and embeddings."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        is_matrix = p.dim() == 2 and "embed" not in name and "norm" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
