"""Activation checkpointing of transformer blocks: full (recompute the block) or selective.

"full" stores only each block's input and recomputes the whole block in backward (memory ~ one
block's activations; ~+33% compute). "selective" (op-level, as in torchtitan) keeps the outputs of
matmuls and attention during forward and recomputes only the cheap elementwise ops and norms, which
frees most of the activation memory of a block for a few percent of extra compute.
``every`` > 1 checkpoints only every n-th block (layer-level selective checkpointing).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from mmllm.distributed.tensor_parallel import decoder_of

AC_MODES = ("none", "full", "selective")


def _save_ops() -> set:
    """The ops whose outputs selective checkpointing keeps (matmuls and attention kernels)."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_attention_math")
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    # flash-attn registers its kernels as torch ops when installed.
    flash = getattr(torch.ops, "flash_attn", None)
    for n in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        if flash is not None and hasattr(flash, n):
            ops.add(getattr(flash, n).default)
    return ops


def _policy(save_ops: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in save_ops else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(partial(_policy, _save_ops()))


def checkpoint_block(block: nn.Module, mode: str) -> nn.Module:
    """Wraps ``block`` for activation checkpointing.

    The wrapper's state-dict hooks remove its ``_checkpoint_wrapped_module.`` prefix, so
    checkpoints and exports see the plain parameter names.

    Args:
        block: the module to recompute in backward.
        mode: "full" or "selective" (see the module docstring).

    Returns:
        The wrapped module (or ``block`` itself for mode "none").
    """
    if mode == "none":
        return block
    if mode == "full":
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                  preserve_rng_state=False)
    if mode == "selective":
        return checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
                                  preserve_rng_state=False, context_fn=_selective_context)
    raise ValueError(f"unknown activation_checkpointing {mode!r}: expected one of {AC_MODES}")


def apply_activation_checkpointing(model: nn.Module, mode: str, *, every: int = 1) -> nn.Module:
    """Wraps every ``every``-th block of ``model.layers`` in place.

    Args:
        model: a model with a ``layers`` ModuleList (DecoderLM) or a wrapper of one (its
            ``decoder``'s blocks are wrapped).
        mode: "none", "full" or "selective".
        every: checkpoint blocks 0, every, 2*every, ... (1 = all blocks).

    Returns:
        ``model``.
    """
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation_checkpointing {mode!r}: expected one of {AC_MODES}")
    if every < 1:
        raise ValueError(f"activation_checkpointing_every must be >= 1, got {every}")
    if mode == "none":
        return model
    layers = decoder_of(model).layers
    for i, block in enumerate(layers):
        if i % every == 0:
            layers[i] = checkpoint_block(block, mode)
    return model
