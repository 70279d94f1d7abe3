"""The PPO policy's checkpoint layout: its parameter names and a gathered CPU copy of its weights.

With a shared trunk the module's policy is ``model.decoder.*`` and its value head ``model.head.*``;
checkpoints save them as ``model.*`` and ``value_head.*`` (:data:`SAVED_NAMES`), so
``mmllm.checkpoint.load_model`` reads a PPO checkpoint like any kit checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor

# Checkpoint names of the shared-trunk policy (old prefix, saved prefix).
SAVED_NAMES = (("model.decoder.", "model."), ("model.head.", "value_head."))


def rename_keys(state_dict: Mapping[str, torch.Tensor], pairs: Iterable[tuple[str, str]]) -> dict:
    """``state_dict`` with the first matching ``(old, new)`` prefix of each key replaced."""
    pairs = list(pairs)
    return {_rename(k, pairs): v for k, v in state_dict.items()}


def _rename(key: str, pairs: Iterable[tuple[str, str]]) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def full_cpu_state(module: nn.Module, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """The full (FSDP2 shards gathered: every rank must call it) CPU state dict of ``module``."""
    return {f"{prefix}{k}": (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in module.state_dict().items()}
