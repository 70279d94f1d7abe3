"""Loss functions: pure, tested against hand-computed values."""

from mmllm.losses.lm import IGNORE_INDEX, causal_lm_loss

__all__ = ["IGNORE_INDEX", "causal_lm_loss"]
