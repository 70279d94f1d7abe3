"""Hydra/OmegaConf helpers shared by the entry points."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

# The configs ship inside the package (package data), so a wheel install has them too.
CONF_DIR = str(Path(__file__).resolve().parent / "conf")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("mmllm.unset_env"):
        # True when an environment variable is unset (wandb offline unless a key is set).
        OmegaConf.register_new_resolver("mmllm.unset_env", lambda name: not os.environ.get(name))


_register_resolvers()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def to_dtype(value: "str | torch.dtype | None") -> "torch.dtype | None":
    """``"bfloat16"``/``"bf16"``/a torch dtype/None -> torch dtype or None (clear error otherwise)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ValueError(f"unknown dtype {value!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[value]


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python (what runs and checkpoints record), minus Hydra's own node."""
    keys = [k for k in cfg.keys() if k != "hydra"]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True, throw_on_missing=False)


def save_resolved(cfg: DictConfig, path: str | Path) -> Path:
    """Writes the resolved config as YAML."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(to_container(cfg))))
    return path


def compose_config(name: str = "train", overrides: list[str] | None = None, *,
                   output_dir: str | Path | None = None, data_dir: str | Path | None = None) -> DictConfig:
    """Composes ``conf/<name>.yaml`` as the CLI would, for notebooks and tests.

    Args:
        overrides: Hydra overrides (``["debug=tiny", "model.lm.n_layers=4"]``).
        output_dir: the run directory (``paths.output_dir``; the CLI takes it from hydra.run.dir).
        data_dir: where data caches go (``paths.data_dir``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(name, overrides=list(overrides or []), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if output_dir is not None and "paths" in cfg:
        cfg.paths.root_dir = str(Path(output_dir).parent)
        cfg.paths.output_dir = str(output_dir)
    if data_dir is not None and "paths" in cfg:
        cfg.paths.data_dir = str(data_dir)
    return cfg
