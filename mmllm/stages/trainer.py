"""One Lightning Trainer for the pipeline's training stages after pretrain (sft, reward_model, ppo, ...).

    from mmllm.stages.trainer import stage_trainer
    trainer = stage_trainer(ctx, max_steps=self.steps, callbacks=[losses], limit_val_batches=0)

It is built from the ``stage_trainer`` section of the pipeline config (mmllm/conf/pipeline.yaml):
the device settings (accelerator, devices, precision, strategy), gradient clipping, the logging
cadence, the progress bar, extra callbacks and the loggers. Every stage logs into the run
directory, all stages under one run group:

* CSV / TensorBoard: ``<run>/logs/<stage>`` (``<run>/logs/<stage>/<phase>`` for a stage that
  trains twice), so ``tensorboard --logdir <run>/logs`` shows the stages side by side;
* wandb: one wandb run per stage (``name=<stage>``, ``job_type=<stage>``) in
  ``group=<run id>`` (:func:`run_group`), files under ``<run>/wandb``; offline unless
  ``WANDB_API_KEY`` is set (``wandb sync <run>/wandb/offline-run-*`` uploads them later).

Precedence: :data:`DEFAULTS` (all there is for a bare StageContext) < the ``stage_trainer``
section < what every stage fixes (no checkpoint callback or model summary: the stages write their
own outputs; no sanity validation; ``default_root_dir=<run>/stages/<stage>``) < the caller's
keyword arguments (what the stage needs structurally: step count, manual-optimisation settings,
validation cadence).
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from mmllm.errors import ConfigError
from mmllm.stages.base import StageContext

SECTION = "stage_trainer"
# Keys of the section that change how a stage is watched, not what it produces: a stage that
# lists SECTION in its config_keys puts these in its config_ignore (changing them reruns nothing).
CONFIG_IGNORE = tuple(f"{SECTION}.{k}" for k in ("loggers", "group", "log_every_n_steps",
                                                  "enable_progress_bar"))
# The section's defaults (the old hard-coded stage trainers: one device, fp32, clipping at 1).
DEFAULTS: dict[str, Any] = {"accelerator": "auto", "devices": 1, "precision": "32-true",
                            "strategy": "auto", "gradient_clip_val": 1.0, "log_every_n_steps": 1,
                            "enable_progress_bar": False}
# Section keys that are not Trainer arguments.
_OWN_KEYS = ("loggers", "callbacks", "group")
_CSV = [{"_target_": "mmllm.loggers.CSVLogger"}]  # the loggers without a section


def run_group(ctx: StageContext) -> str:
    """The run group every stage logs under: ``stage_trainer.group``, else the run directory's name."""
    group = OmegaConf.select(ctx.cfg, f"{SECTION}.group", default=None)
    return str(group) if group else Path(ctx.run_dir).resolve().name


def stage_log_dir(ctx: StageContext, phase: str | None = None) -> Path:
    """``<run>/logs/<stage>[/<phase>]``: where the stage's CSV and TensorBoard logs go."""
    root = Path(ctx.run_dir) / "logs" / ctx.name
    return root / phase if phase else root


def stage_trainer(ctx: StageContext, *, max_steps: int, phase: str | None = None,
                  callbacks: Sequence[Any] = (), **overrides: Any):
    """A Lightning Trainer for one stage, configured by the ``stage_trainer`` section.

    Args:
        ctx: the running stage's context (its name, run directory and config).
        max_steps: optimizer steps of this fit.
        phase: a sub-run of the stage (e.g. "pmp" then "comparisons"): its own log directory
            ``<run>/logs/<stage>/<phase>`` and wandb run ``<stage>/<phase>``.
        callbacks: the stage's own callbacks, added after the section's.
        **overrides: any other ``lightning.Trainer`` argument; wins over the section.

    Returns:
        The ``lightning.Trainer``. Its CSV/TensorBoard log directory is emptied first: a stage
        reruns from scratch, so its logs describe its latest run only.

    Raises:
        ConfigError: a section key the Trainer does not take.
    """
    import lightning as L

    section = _section(ctx)
    unknown = sorted(set(section) - set(_OWN_KEYS) - _trainer_args())
    if unknown:
        raise ConfigError(f"{SECTION}.{unknown[0]}: not an argument of lightning.Trainer",
                          fix=f"remove it, or use one of {sorted(DEFAULTS)} (any Trainer argument works)")
    kwargs = {k: v for k, v in {**DEFAULTS, **section}.items() if k not in _OWN_KEYS}
    kwargs["strategy"] = _strategy(kwargs.get("strategy"))
    kwargs.update(enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                  default_root_dir=str(ctx.dir))
    kwargs.update(overrides)
    from mmllm.callbacks.progress import progress_bar_callbacks

    kwargs["callbacks"] = [*_instantiate_nodes(section.get("callbacks")), *callbacks]
    kwargs["callbacks"] += progress_bar_callbacks(kwargs.get("enable_progress_bar", True), kwargs["callbacks"])
    kwargs["logger"] = stage_loggers(ctx, section.get("loggers", _CSV), phase=phase) or False
    return L.Trainer(max_steps=max_steps, **kwargs)


def stage_loggers(ctx: StageContext, nodes: Any, *, phase: str | None = None) -> list:
    """Instantiates logger nodes (a list, or a ``{name: node}`` mapping like ``cfg.logger``) for a stage.

    Each node's target decides what is filled in: Lightning's CSV and TensorBoard loggers write
    to :func:`stage_log_dir` (emptied first); WandbLogger gets the run group, the stage as run
    name and job type, ``<run>`` as save_dir and ``offline`` unless the node sets it; any other
    logger gets ``save_dir=<stage log dir>`` when it takes one. Null nodes are skipped.
    """
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    loggers, cleared = [], False
    for node in _nodes(nodes):
        cls, log_dir = get_class(node["_target_"]), stage_log_dir(ctx, phase)
        if issubclass(cls, WandbLogger):
            _finish_wandb_run()  # else Lightning reuses the previous stage's run
            fill = {"save_dir": str(ctx.run_dir), "group": run_group(ctx), "job_type": ctx.name,
                    "name": f"{ctx.name}/{phase}" if phase else ctx.name}
            if node.get("offline") is None:
                fill["offline"] = not os.environ.get("WANDB_API_KEY")
        elif issubclass(cls, (CSVLogger, TensorBoardLogger)):
            if not cleared and log_dir.is_dir():
                shutil.rmtree(log_dir)
            cleared = True
            fill = {"save_dir": str(log_dir.parent), "name": log_dir.name, "version": ""}
        else:
            fill = {"save_dir": str(log_dir)} if "save_dir" in inspect.signature(cls).parameters else {}
        Path(fill.get("save_dir", log_dir)).mkdir(parents=True, exist_ok=True)
        loggers.append(instantiate(node, **fill))
    return loggers


# ------------------------------------------------------------------------------- helpers
def _section(ctx: StageContext) -> dict:
    node = OmegaConf.select(ctx.cfg, SECTION, default=None)
    if node is None:
        return {}
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{SECTION} must be a mapping of Trainer settings, got {node!r}",
                          fix=f"see the {SECTION} section of mmllm/conf/pipeline.yaml")
    out = {}
    for key in node:
        value = node[key]  # resolved against the whole config (${trainer.accelerator})
        if key in ("loggers", "callbacks"):  # stay nodes: instantiated with the stage's paths
            out[key] = value
        elif isinstance(value, (DictConfig, ListConfig)):
            out[key] = OmegaConf.to_container(value, resolve=True)
        else:
            out[key] = value
    return out


def _nodes(nodes: Any) -> list:
    """Logger/callback nodes from a list or a ``{name: node}`` mapping, nulls dropped."""
    if nodes is None:
        return []
    if isinstance(nodes, (Mapping, DictConfig)) and "_target_" in nodes:
        nodes = [nodes]  # a single node
    elif isinstance(nodes, (Mapping, DictConfig)):
        nodes = list(nodes.values())
    elif not isinstance(nodes, (Sequence, ListConfig)) or isinstance(nodes, str):
        raise ConfigError(f"{SECTION}.loggers/callbacks: expected a list of _target_ nodes, got {nodes!r}",
                          fix=f"e.g. {SECTION}.loggers=[{{_target_: mmllm.loggers.CSVLogger}}]")
    out = []
    for node in nodes:
        if node is None:
            continue
        if not isinstance(node, (Mapping, DictConfig)) or "_target_" not in node:
            raise ConfigError(f"{SECTION}: {node!r} is not a _target_ node",
                              fix="give each logger/callback as {_target_: <class>, ...}")
        out.append(node)
    return out


def _instantiate_nodes(nodes: Any) -> list:
    from hydra.utils import instantiate

    return [instantiate(node) for node in _nodes(nodes)]


def _strategy(value: Any):
    """A strategy name, or a ``_target_`` node (e.g. lightning.pytorch.strategies.DDPStrategy)."""
    if isinstance(value, Mapping) and "_target_" in value:
        from hydra.utils import instantiate

        return instantiate(value)
    return value if value is not None else "auto"


def _trainer_args() -> set[str]:
    import lightning as L

    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def _finish_wandb_run() -> None:
    import sys

    wandb = sys.modules.get("wandb")  # not imported: no run can be active
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()
