"""Hydra entry point of pretraining / fine-tuning: ``mmllm train`` or ``python -m mmllm.train``."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mmllm.config import CONF_DIR, save_resolved, to_container

log = logging.getLogger(__name__)


def build_strategy(cfg: DictConfig | None):
    """A Lightning strategy object from ``strategy/*.yaml`` (``name: auto`` means Lightning's choice)."""
    if cfg is None:
        return "auto"
    if "_target_" in cfg:
        return instantiate(cfg)
    return cfg.get("name", "auto")


def _instantiate_all(group: DictConfig | None) -> list:
    if not group:
        return []
    return [instantiate(node) for node in group.values() if node is not None and "_target_" in node]


def resolve_ckpt_arg(ckpt_path: str | None, output_dir: Path) -> str | None:
    """``ckpt_path`` for Trainer.fit: None, "last" (this run dir's last.ckpt), a file or a run dir."""
    if not ckpt_path:
        return None
    from mmllm.checkpoint import resolve_ckpt

    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path=last but {last} does not exist: resume inside the old run with "
                "hydra.run.dir=<old run dir>, or pass ckpt_path=<file or run dir>")
        return str(last)
    return str(resolve_ckpt(ckpt_path))


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiates datamodule, module (model built lazily in configure_model) and trainer."""
    datamodule = instantiate(cfg.data)
    model_factory = instantiate(cfg.model.lm, _partial_=True)
    module = instantiate(cfg.module, model=model_factory)
    module.run_config = to_container(cfg)
    trainer = instantiate(cfg.trainer, callbacks=_instantiate_all(cfg.get("callbacks")),
                          logger=_instantiate_all(cfg.get("logger")) or False,
                          strategy=build_strategy(cfg.get("strategy")))
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains as configured; returns the final logged metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    module, datamodule, trainer = build(cfg)
    if trainer.is_global_zero:
        save_resolved(cfg, output_dir / "config.yaml")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resolve_ckpt_arg(cfg.get("ckpt_path"), output_dir))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        log.info("finished: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # A scalar return value lets Hydra sweepers optimise the run (lower val/loss is better).
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
