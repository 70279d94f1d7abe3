"""Loss functions: pure, tested against hand-computed values."""

from mmllm.losses.lm import (
    IGNORE_INDEX,
    causal_lm_loss,
    liger_available,
    linear_cross_entropy_loss,
)

__all__ = ["IGNORE_INDEX", "causal_lm_loss", "liger_available", "linear_cross_entropy_loss"]
