"""The three attention masks of BLIP-2 stage 1 over the joint sequence ``[queries (M); text (T)]``.

All masks are boolean ``(B, 1, M + T, M + T)``, True = "row may attend to column" (the convention
of ``F.scaled_dot_product_attention``). Padded text positions are never attended to as keys; a
padded row still sees its own queries so no row is empty (softmax over nothing is NaN)::

    uni-modal (ITC)        bidirectional (ITM)     multimodal causal (ITG)
         Q   T                  Q   T                    Q   T
    Q  [ 1   0 ]           Q  [ 1   1 ]             Q  [ 1   0 ]
    T  [ 0   1 ]           T  [ 1   1 ]             T  [ 1   causal ]
"""

from __future__ import annotations

import torch


def _blocks(text_mask: torch.Tensor, num_queries: int, *, q2t: bool, t2q: bool,
            causal: bool) -> torch.Tensor:
    B, T = text_mask.shape
    M, dev = num_queries, text_mask.device
    keys = torch.cat([torch.ones(B, M, dtype=torch.bool, device=dev), text_mask.bool()], dim=1)  # (B, L)
    allowed = torch.ones(M + T, M + T, dtype=torch.bool, device=dev)
    allowed[:M, M:] = q2t
    allowed[M:, :M] = t2q
    if causal:
        allowed[M:, M:] = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    mask = allowed[None] & keys[:, None, :]  # (B, L, L): pads are never keys
    mask[:, M:, :M] |= ~text_mask.bool()[:, :, None]  # padded text rows see the queries (not empty)
    return mask[:, None]  # (B, 1, L, L)


def unimodal_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITC: queries see only queries, text sees only (non-pad) text.

    Args:
        text_mask: (B, T) True at real text tokens.
        num_queries: M.

    Returns:
        (B, 1, M + T, M + T) bool.
    """
    return _blocks(text_mask, num_queries, q2t=False, t2q=False, causal=False)


def bidirectional_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITM: every position sees every query and every real text token."""
    return _blocks(text_mask, num_queries, q2t=True, t2q=True, causal=False)


def multimodal_causal_mask(text_mask: torch.Tensor, num_queries: int) -> torch.Tensor:
    """ITG: queries see queries (not the text they must not leak); text sees all queries and
    the text up to and including itself."""
    return _blocks(text_mask, num_queries, q2t=False, t2q=True, causal=True)
