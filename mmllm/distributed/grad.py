"""Gradient norm and clipping that work for plain tensors and DTensors on several meshes.

Under FSDP2 + TP, TP-sharded weights are DTensors on the 2-D (dp, tp) mesh while norms and tied
embeddings are DTensors on the 1-D dp mesh; ``torch.nn.utils.clip_grad_norm_`` stacks all norms
into one tensor and fails on that mix. Here norms are reduced per mesh (DTensor ``full_tensor``
does the right all-reduce for sharded and replicated placements alike) and then combined.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def _mesh_key(t: torch.Tensor):
    return id(t.device_mesh) if isinstance(t, DTensor) else None


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    """Global norm of the gradients of ``parameters`` (a plain fp32 scalar tensor).

    Args:
        parameters: parameters (plain tensors or DTensors); those without a gradient are skipped.
        norm_type: the p of the p-norm (``inf`` supported).

    Returns:
        The norm, identical on every rank, on the gradients' device (0 if no gradients).
    """
    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p.grad)
    if not groups:
        return torch.zeros(())
    per_group = []
    for grads in groups.values():
        norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # all-reduce of partial norms over the mesh
        per_group.append(total)
    device = per_group[0].device
    stacked = torch.stack([t.to(device) for t in per_group])
    return torch.linalg.vector_norm(stacked, norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    norm_type: float = 2.0) -> torch.Tensor:
    """Scales gradients in place so that their global norm is at most ``max_norm``.

    Args:
        parameters: parameters whose ``.grad`` is clipped (plain tensors or DTensors).
        max_norm: the largest allowed global norm.
        norm_type: the p of the p-norm.

    Returns:
        The global norm before clipping.
    """
    params = [p for p in parameters if p.grad is not None]
    total = grad_norm(params, norm_type)
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        g = p.grad
        # Scaling is linear, so scaling each local shard scales the global tensor for any placement.
        local = g.to_local() if isinstance(g, DTensor) else g
        local.mul_(coef.to(local.device, local.dtype))
    return total
