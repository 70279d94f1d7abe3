"""EvalCallback: run a small evaluation suite during training and log its metrics."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import lightning as L

from mmllm.eval.evaluator import evaluate
from mmllm.eval.tasks.base import Task

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    """Evaluates the module's model on ``tasks`` every N training steps and/or after validation.

    Metrics are logged as ``<prefix><task>/<metric>`` (e.g. ``eval/capitals/acc``) through the
    module's loggers and are also kept in :attr:`history`.

    The model is taken from ``pl_module.model`` (else the module itself) and the tokenizer from
    ``pl_module.tokenizer``, else ``trainer.datamodule.tokenizer``.

    Args:
        tasks: Task objects (or name -> Task, as Hydra instantiates a dict of task configs).
        every_n_steps: evaluate when ``global_step`` is a multiple of it (None: never by steps).
        on_validation: evaluate at the end of every validation epoch (not the sanity check).
        limit: examples per task (keep it small: this runs inside training).
        batch_size: rows per forward.
        prefix: metric name prefix.
    """

    def __init__(self, *, tasks: Mapping[str, Task] | Sequence[Task], every_n_steps: int | None = None,
                 on_validation: bool = True, limit: int | None = 32, batch_size: int = 8,
                 prefix: str = "eval/") -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.tasks = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.limit, self.batch_size, self.prefix = limit, batch_size, prefix
        self.history: list[dict] = []

    @staticmethod
    def _model_and_tokenizer(trainer: L.Trainer, pl_module: L.LightningModule):
        model = getattr(pl_module, "model", pl_module)
        tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None and trainer.datamodule is not None:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise AttributeError("EvalCallback needs a tokenizer on the module (pl_module.tokenizer) "
                                 "or the datamodule (trainer.datamodule.tokenizer)")
        return model, tokenizer

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Evaluates now; logs and returns the flat metrics."""
        model, tokenizer = self._model_and_tokenizer(trainer, pl_module)
        report = evaluate(model, tokenizer, self.tasks, batch_size=self.batch_size, limit=self.limit,
                          progress=False)
        flat = {f"{self.prefix}{task}/{name}": float(v)
                for task, metrics in report["results"].items() for name, v in metrics.items()
                if not name.endswith("_stderr")}
        self.history.append({"step": trainer.global_step, **flat})
        for logger in trainer.loggers:
            logger.log_metrics(flat, step=trainer.global_step)
        trainer.callback_metrics.update({k: _tensor(v) for k, v in flat.items()})
        log.info("step %d: %s", trainer.global_step, flat)
        return flat

    def _done_at(self, step: int) -> bool:
        # One evaluation per optimizer step (several batches share it with grad accumulation).
        return bool(self.history) and self.history[-1]["step"] == step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and not self._done_at(step):
            self.run(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.on_validation and not trainer.sanity_checking and not self._done_at(trainer.global_step):
            self.run(trainer, pl_module)


def _tensor(value: float):
    import torch

    return torch.tensor(value)
