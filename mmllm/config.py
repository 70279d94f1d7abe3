"""Hydra/OmegaConf helpers shared by the entry points."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("mmllm.unset_env"):
        # True when an environment variable is unset (wandb offline unless a key is set).
        OmegaConf.register_new_resolver("mmllm.unset_env", lambda name: not os.environ.get(name))


_register_resolvers()


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (what runs and checkpoints record)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)


def save_resolved(cfg: DictConfig, path: str | Path) -> Path:
    """Writes the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    return path
