"""LightningModules of the kit (class names end in Module)."""

from mmllm.modules.causal_lm import CausalLMModule

__all__ = ["CausalLMModule"]
