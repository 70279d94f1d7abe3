"""Language-modelling losses (pure functions)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy with masked positions.

    ``labels`` are already aligned with ``logits`` (label t is the token after input t), as the
    kit's data modules produce them; positions equal to ``ignore_index`` (padding, prompts in SFT)
    contribute nothing.

    Args:
        logits: (B, T, V).
        labels: (B, T) target ids or ``ignore_index``.
        reduction: "mean" over counted tokens, or "sum".

    Returns:
        ``(loss, n_tokens)``: the loss (fp32 scalar; 0 when nothing is counted) and the number of
        counted tokens.
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = labels.reshape(-1)
    total = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum")
    n = (target != ignore_index).sum()
    if reduction == "sum":
        return total, n
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    return total / n.clamp(min=1), n


FUSED_IMPLS = ("liger", "chunked")
CHUNK_BYTES = 2**28  # fp32 logits of one chunk of the "chunked" fallback


@functools.cache
def liger_available() -> bool:
    """Whether liger-kernel's fused linear + cross-entropy can run here (CUDA and the library)."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except ImportError:
        return False
    return True


def linear_cross_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                              bias: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX,
                              reduction: str = "mean", impl: str = "liger",
                              chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`causal_lm_loss` of ``hidden @ weight.T (+ bias)`` without the (B, T, V) logits.

    The LM head's matmul is fused into the loss, so logits exist one chunk of tokens at a time:
    the memory of the loss drops from O(B*T*V) to O(chunk*V) (at V=128k, T=8k, B=8 the logits
    alone are 32 GB in fp32).

    Args:
        hidden: (B, T, C) final hidden states.
        weight: (V, C) LM-head weight (plain tensor: a vocabulary-sharded TP head cannot fuse).
        labels: (B, T) target ids or ``ignore_index`` (aligned as in :func:`causal_lm_loss`).
        bias: (V,) LM-head bias, if any.
        reduction: "mean" over counted tokens, or "sum".
        impl: "liger" (liger-kernel's Triton kernel, CUDA) or "chunked" (any device: logits per
            chunk of tokens under activation checkpointing, recomputed in backward).
        chunk_size: tokens per chunk of "chunked"; None: as many as keep a chunk's fp32 logits
            within 256 MiB (2048 tokens at V=32k, 512 at V=128k).

    Returns:
        ``(loss, n_tokens)`` with the same meaning as :func:`causal_lm_loss`.
    """
    if impl not in FUSED_IMPLS:
        raise ValueError(f"unknown fused loss impl {impl!r}: expected one of {FUSED_IMPLS}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {reduction!r}")
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, C)
    target = labels.reshape(-1)  # (N,)
    n = (target != ignore_index).sum()
    if impl == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        # Sum then divide by our own count: exactly causal_lm_loss's masked mean (and 0, not
        # NaN, for a batch without a counted token). fp32 accumulation as in the plain path.
        fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum",
                                              accum_dtype=torch.float32)
        # Autocast does not reach the Triton kernel: cast as autocast would cast the head's
        # matmul (bf16 under bf16-mixed), else the weight takes the activations' dtype.
        dtype = torch.get_autocast_dtype(flat.device.type) \
            if torch.is_autocast_enabled(flat.device.type) else flat.dtype
        total = fn(weight.to(dtype), flat.to(dtype), target,
                   None if bias is None else bias.to(dtype)).float()
    else:
        chunk = chunk_size if chunk_size is not None else max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        total = _chunked_ce_sum(flat, weight, bias, target, ignore_index, chunk)
    if reduction == "sum":
        return total, n
    return total / n.clamp(min=1), n


def _chunk_ce_sum(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    logits = F.linear(h, weight, bias).float()  # (chunk, V)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")


def _chunked_ce_sum(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    target: torch.Tensor, ignore_index: int, chunk_size: int) -> torch.Tensor:
    """Sum of the cross-entropy over chunks of tokens; each chunk's logits are freed after its
    forward and recomputed in backward (non-reentrant checkpoint), never all alive at once."""
    from torch.utils.checkpoint import checkpoint

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(_chunk_ce_sum, flat[start:end], weight, bias,
                                   target[start:end], ignore_index, use_reentrant=False)
    return total
