"""The training progress bar: Lightning's, told how long a step-bounded run is.

The kit's runs are bounded by ``max_steps`` with ``max_epochs=-1``; Lightning's rich bar then
names the epoch ``Epoch 3/-2`` (it prints ``max_epochs - 1``). :func:`progress_bar_callbacks`
gives the bar that says ``Epoch 3 · step 40/90`` instead, and nothing when the bar is off (a bar
callback with ``enable_progress_bar=False`` is an error in Lightning).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar; an open-ended run (``max_epochs`` -1 or None) shows its global step
    out of ``max_steps`` in place of Lightning's ``/<max_epochs - 1>``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        text = f"Epoch {current_epoch}"
        if trainer.max_steps and trainer.max_steps > 0:
            text += f" · step {trainer.global_step}/{trainer.max_steps}"
        if len(self.validation_description) > len(text):  # as Lightning pads, against flicker
            text = f"{text:{len(self.validation_description)}}"
        return text

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # Lightning names the bar once per epoch; the step count moves with every batch.
        if not self.is_disabled and self.progress is not None and self.train_progress_bar_id is not None:
            self.progress.update(self.train_progress_bar_id,
                                 description=self._get_train_description(trainer.current_epoch))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def progress_bar_callbacks(enabled: bool, callbacks: Sequence[Any] = ()) -> list:
    """The bar to add to ``callbacks``: none when disabled or one is already there."""
    if not enabled or any(isinstance(c, ProgressBar) for c in callbacks):
        return []
    return [StepRichProgressBar() if _RICH_AVAILABLE else TQDMProgressBar()]
