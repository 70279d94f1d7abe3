"""RunCheckpoint: Lightning's ModelCheckpoint with crash-safe saves and the tokenizer in the run.

* Every save (``step*.ckpt``, ``last.ckpt``; a file, or a DCP directory under FSDP2/TP) is written
  to ``<name>.partial`` in the checkpoint directory, fsynced and renamed (see
  :func:`mmllm.distributed.checkpoint.commit_checkpoint`), so a crash or SIGKILL mid-save never
  leaves a torn checkpoint under a real name; ``.partial`` leftovers are removed at the next start.
* At fit start the datamodule's tokenizer is copied to ``<run>/tokenizer`` and recorded in the
  checkpoints relative to them (``../tokenizer``): a run directory is self-contained and loads from
  any working directory or machine (``mmllm generate checkpoint=<run>``).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Literal
from weakref import proxy

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from mmllm.distributed.checkpoint import commit_checkpoint, partial_path, remove_partials

log = logging.getLogger(__name__)

# Testing hook of the crash-safety test: at this global step the save writes its temporary file,
# truncates it to half (a save cut short) and blocks, so the test can SIGKILL the process mid-save.
STALL_ENV = "MMLLM_TEST_STALL_SAVE"


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint (same arguments, see Lightning's docs) with atomic saves and the tokenizer.

    Args:
        tokenizer_dir: where the run's copy of the tokenizer goes (None: ``<dirpath>/../tokenizer``,
            i.e. ``<run>/tokenizer`` with the kit's ``dirpath: <run>/checkpoints``).
        copy_tokenizer: copy the datamodule's tokenizer (``tokenizer_dir`` attribute, or a
            ``tokenizer`` with ``save_pretrained``) into the run at fit start.
    """

    def __init__(self, *, dirpath: str | None = None, filename: str | None = None,
                 monitor: str | None = None, verbose: bool = False,
                 save_last: bool | Literal["link"] | None = None, save_top_k: int = 1,
                 save_on_exception: bool = False, save_weights_only: bool = False,
                 mode: str = "min", auto_insert_metric_name: bool = True,
                 every_n_train_steps: int | None = None,
                 train_time_interval: timedelta | None = None, every_n_epochs: int | None = None,
                 save_on_train_epoch_end: bool | None = None, enable_version_counter: bool = True,
                 tokenizer_dir: str | None = None, copy_tokenizer: bool = True) -> None:
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, verbose=verbose,
                         save_last=save_last, save_top_k=save_top_k,
                         save_on_exception=save_on_exception, save_weights_only=save_weights_only,
                         mode=mode, auto_insert_metric_name=auto_insert_metric_name,
                         every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=save_on_train_epoch_end,
                         enable_version_counter=enable_version_counter)
        self.tokenizer_dir, self.copy_tokenizer = tokenizer_dir, copy_tokenizer

    # ------------------------------------------------------------------------------ set up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath:
            for path in remove_partials(self.dirpath):
                log.warning("removed %s, left over by a save that was interrupted", path)
        trainer.strategy.barrier("RunCheckpoint.setup")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.copy_tokenizer and self.dirpath:
            self._copy_tokenizer(trainer, pl_module)

    def _copy_tokenizer(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = getattr(trainer, "datamodule", None)
        src = getattr(dm, "tokenizer_dir", None)
        src = Path(src) if src and Path(src).is_dir() else None
        tokenizer = getattr(dm, "tokenizer", None) if src is None else None
        if src is None and not hasattr(tokenizer, "save_pretrained"):
            return  # nothing to copy: checkpoints record no tokenizer
        dst = Path(self.tokenizer_dir) if self.tokenizer_dir else Path(self.dirpath).parent / "tokenizer"
        if trainer.is_global_zero:
            if src is not None and src.resolve() != dst.resolve():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src is None:
                tokenizer.save_pretrained(str(dst))
        trainer.strategy.barrier("RunCheckpoint.tokenizer")
        # Relative to the checkpoints' directory: mmllm.checkpoint resolves it from there.
        pl_module.tokenizer_path = os.path.relpath(dst.resolve(), Path(self.dirpath).resolve())

    # -------------------------------------------------------------------------------- save
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        """Writes ``<filepath>.partial`` (every rank, for DCP), then rank 0 commits it by rename."""
        tmp = partial_path(filepath)
        trainer.save_checkpoint(str(tmp), self.save_weights_only)
        if os.environ.get(STALL_ENV) == str(trainer.global_step):
            _stall(tmp)
        if trainer.is_global_zero:
            commit_checkpoint(tmp, filepath)
        trainer.strategy.barrier("RunCheckpoint.commit")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


def _stall(tmp: Path) -> None:
    """Testing hook: cut the written checkpoint to half (its largest file) and block forever."""
    target = max((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size) \
        if tmp.is_dir() else tmp
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    print(f"[mmllm] {STALL_ENV}: checkpoint save stalled after {size // 2} of {size} bytes "
          f"of {target}", file=sys.stderr, flush=True)
    while True:
        signal.pause()
