"""Loggers that survive resumption."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger, minus the data loss on resume.

    Lightning deletes an existing ``metrics.csv`` when it opens a log directory, so resuming a
    run in its own directory (``ckpt_path=last``) would erase the history before the crash. The
    old file is kept as ``metrics.part<N>.csv`` (N = 0, 1, ... in order) before the new
    ``metrics.csv`` is started.
    """

    @property
    def experiment(self):
        if self._experiment is None:
            path = Path(self.log_dir) / "metrics.csv"
            if path.is_file() and self._is_rank_zero():
                n = 0
                while path.with_name(f"metrics.part{n}.csv").exists():
                    n += 1
                path.rename(path.with_name(f"metrics.part{n}.csv"))
        return super().experiment

    @staticmethod
    def _is_rank_zero() -> bool:
        from lightning.pytorch.utilities import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0
