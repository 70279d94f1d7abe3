"""Hydra entry point of pretraining / fine-tuning: ``mmllm train`` or ``python -m mmllm.train``."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mmllm.callbacks.progress import progress_bar_callbacks
from mmllm.config import CONF_DIR, check_config, save_resolved, to_container

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


def resolve_ckpt_arg(ckpt_path: str | None, output_dir: Path, *, strategy=None) -> str | None:
    """``ckpt_path`` for Trainer.fit: None, "last" (this run dir's last.ckpt), a file or a run dir.

    A distributed checkpoint (DCP directory of an FSDP2/TP run) resumes directly under
    ModelParallelStrategy with any number of processes; under any other strategy it is first
    consolidated into a temporary single-file checkpoint (see :func:`train`).

    Args:
        ckpt_path: the ``ckpt_path`` config value.
        output_dir: this run's directory.
        strategy: the trainer's strategy object (decides whether a DCP directory needs consolidating).
    """
    if not ckpt_path:
        return None
    from mmllm.checkpoint import latest_valid_checkpoint, resolve_ckpt
    from mmllm.distributed import consolidate_checkpoint, is_distributed_checkpoint

    if ckpt_path == "last":
        # last.ckpt, or the newest valid checkpoint (with a warning) when it is torn or missing.
        path = latest_valid_checkpoint(output_dir / "checkpoints")
    else:
        path = resolve_ckpt(ckpt_path)
    if is_distributed_checkpoint(path) and not _is_model_parallel(strategy):
        # One file per process: every rank of a DDP/single run reads its own copy.
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="consolidated-", dir=output_dir))
        path = consolidate_checkpoint(path, tmp / "resume.ckpt")
        log.info("consolidated distributed checkpoint %s into %s", ckpt_path, path)
    return str(path)


def _is_model_parallel(strategy) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def _hydra_choices() -> dict:
    """The config group choices of the running Hydra app (empty outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}


def build(cfg: DictConfig) -> tuple[L.LightningModule, L.LightningDataModule, L.Trainer]:
    """Instantiates datamodule, module (model built lazily in configure_model) and trainer.

    Seeds every RNG first (``cfg.seed``), so the same config gives the same initial weights.
    """
    check_config(cfg, choices=_hydra_choices())  # wrong types, keys no target takes
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model_factory = instantiate(cfg.model.lm, _partial_=True)
    module = instantiate(cfg.module, model=model_factory)
    module.run_config = to_container(cfg)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    callbacks += progress_bar_callbacks(cfg.trainer.get("enable_progress_bar", True), callbacks)
    trainer = instantiate(cfg.trainer, callbacks=callbacks,
                          logger=_instantiate_all(cfg.get("logger")) or False,
                          strategy=build_strategy(cfg.get("strategy")))
    return module, datamodule, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Trains as configured; returns the final logged metrics."""
    output_dir = Path(cfg.paths.output_dir)
    module, datamodule, trainer = build(cfg)
    if trainer.is_global_zero:
        save_resolved(cfg, output_dir / "config.yaml")
    ckpt = resolve_ckpt_arg(cfg.get("ckpt_path"), output_dir, strategy=trainer.strategy)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    finally:
        if ckpt and Path(ckpt).parent.name.startswith("consolidated-"):
            shutil.rmtree(Path(ckpt).parent, ignore_errors=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        log.info("finished: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from mmllm.cli import restore_command_line

    restore_command_line()  # Lightning reruns this command for ranks 1.. of a multi-device run
    metrics = train(cfg)
    # A scalar return value lets Hydra sweepers optimise the run (lower val/loss is better).
    return metrics.get("val/loss")


def main() -> float | None:
    """``mmllm train``: Hydra's main, with all ranks of a torchrun/srun launch in one run dir.

    See :mod:`mmllm.distributed.launch`: the overrides are added before Hydra reads the command
    line, because Hydra creates the run directory before the task function runs.
    """
    from mmllm.distributed.launch import rank_overrides

    sys.argv = [*sys.argv, *rank_overrides(sys.argv[1:], os.environ)]
    return _hydra_main()


if __name__ == "__main__":
    main()
