"""VisionTextDataModule: batches of image-text records, sharded over workers and ranks, resumable.

Readers. Data-parallel rank ``r`` of ``D`` (:func:`mmllm.distributed.data_parallel_rank`) with
``W`` DataLoader workers runs ``R = D*W`` readers; reader ``r*W + w`` reads units (tar shards,
JSON blocks) ``i, i+R, i+2R, ...`` of each pass's unit order (shuffled per pass with the seed
when ``shuffle_units``), so no two readers read the same unit. Each worker batches its own
records; the DataLoader takes workers round robin.

Epochs. Without ``batches_per_epoch`` an epoch is one pass over the data (single process
only: data-parallel ranks would run different numbers of steps and hang). With it, every rank
runs exactly that many batches per epoch from endless streams (each reader starts its next
pass when its units run out), as webdataset's ``with_epoch`` does; the streams continue across
epochs.

Resuming. Every batch carries, from its worker, that reader's position after it
``(pass, unit, sample)``; the DataModule keeps the position of the batches the training loop
consumed (``on_before_batch_transfer``) and saves them in ``state_dict`` (gathered over ranks),
so a resumed run reads exactly the samples an uninterrupted one would, skipping raw samples of
a half-read unit without decoding them.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections import deque
from collections.abc import Callable

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmllm.data.vlm_data import ReadStats
from mmllm.distributed.strategy import data_parallel_rank

log = logging.getLogger(__name__)

# Each worker yields its own share of the epoch's batches (RecordStream.__iter__), so the length
# Lightning warns about is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


def records_collate(records: list[dict]) -> list[dict]:
    """The default collate: a batch is the list of its records (the VLM collate makes tensors)."""
    return records


class RecordStream(IterableDataset):
    """``(batch, (reader, position after it))`` of the readers of one rank (see the module doc).

    Args:
        source: a source of :mod:`mmllm.data.vlm_data` (``units()``, ``read_unit()``).
        batch_size: records per batch.
        rank, world_size: data-parallel rank and size.
        seed: seeds the unit order of each pass.
        shuffle_units: shuffle the unit order each pass (else the source's order).
        num_batches: batches per epoch of this rank (None: one pass).
        transform: applied to each record in the worker (None: records as read).
        collate_fn: turns a list of records into a batch (default: the list).
        drop_last: drop a reader's last incomplete batch of a pass (one-pass mode).
    """

    def __init__(self, source, *, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_units: bool = True, num_batches: int | None = None,
                 transform: Callable | None = None, collate_fn: Callable | None = None,
                 drop_last: bool = False) -> None:
        self.source, self.batch_size, self.rank, self.world_size = source, batch_size, rank, world_size
        self.seed, self.shuffle_units, self.num_batches = seed, shuffle_units, num_batches
        self.transform, self.collate_fn = transform, collate_fn or records_collate
        self.drop_last = drop_last
        self.positions: dict[int, tuple[int, int, int]] = {}  # reader -> (pass, unit, sample)
        self.first_reader = 0  # the local reader whose batch comes first (set before iter())
        self.remaining: int | None = None  # batches left in this epoch (endless mode)
        self.stats = ReadStats()

    def __len__(self) -> int:  # the whole epoch, as Lightning counts a resumed one
        if self.num_batches is None:
            raise TypeError("a one-pass RecordStream has no length")
        return self.num_batches

    def unit_order(self, n_pass: int, reader: int, readers: int) -> list:
        """The units reader ``reader`` of ``readers`` reads in pass ``n_pass``."""
        units = list(self.source.units())
        if len(units) < readers:
            raise ValueError(f"{self.source.name}: {len(units)} units (shards / blocks) for {readers} "
                             "readers (data-parallel ranks x workers); every reader needs one: write "
                             "more shards, use a smaller block_size or fewer workers")
        if self.shuffle_units:
            random.Random(f"{self.seed}/{n_pass}").shuffle(units)
        return units[reader::readers]

    def _records(self, reader: int, readers: int, endless: bool):
        """``(record, position after it)`` from the reader's saved position on."""
        n_pass, k, j = self.positions.get(reader, (0, 0, 0))
        while True:
            units = self.unit_order(n_pass, reader, readers)
            while k < len(units):
                for item in self.source.read_unit(units[k], stats=self.stats, skip=j):
                    j += 1
                    if item is not None:
                        yield item, (n_pass, k, j)
                k, j = k + 1, 0
                yield None, (n_pass, k, 0)  # a unit boundary: the position moves on
            self.stats.log_summary(f"{self.source.name} reader {reader} pass {n_pass}")
            if not endless:
                return
            n_pass, k, j = n_pass + 1, 0, 0

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # Worker w plays reader (w + offset) % W: the loader takes workers round robin from
        # worker 0, and a resumed epoch must go on with the reader whose turn was next.
        local = (worker + self.first_reader) % workers
        reader, readers = self.rank * workers + local, self.world_size * workers
        endless = self.num_batches is not None
        todo = None
        if endless:
            todo = len(range(worker, self.num_batches if self.remaining is None else self.remaining,
                             workers))
            if todo == 0:
                return
        batch, pos = [], self.positions.get(reader, (0, 0, 0))
        for record, pos in self._records(reader, readers, endless):
            if record is None:
                continue
            batch.append(self.transform(record) if self.transform is not None else record)
            if len(batch) == self.batch_size:
                yield self.collate_fn(batch), (reader, pos)
                batch = []
                if todo is not None:
                    todo -= 1
                    if todo == 0:
                        return
        if batch and not self.drop_last:
            yield self.collate_fn(batch), (reader, pos)


class _PositionLoader(DataLoader):
    """Unwraps ``(batch, position)`` and hands positions to the DataModule."""

    def __init__(self, dataset: RecordStream, *, datamodule: VisionTextDataModule, **kwargs) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=_identity, **kwargs)
        self._datamodule = datamodule

    def __iter__(self):
        dm = self._datamodule
        self.dataset.positions, self.dataset.first_reader, self.dataset.remaining = \
            dm._start_positions(self.num_workers)
        for batch, pos in super().__iter__():
            dm._pending.append(pos)
            if dm.trainer is None:
                dm._commit()
            yield batch
        dm._pass_ended = self.dataset.num_batches is None

    # Resumable through the DataModule's state (restored first): nothing to save here.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


def _identity(item):
    return item


class VisionTextDataModule(L.LightningDataModule):
    """Image-text records from any source of :mod:`mmllm.data.vlm_data`, batched per worker.

    Args:
        train: the training source (``WebDatasetSource``, ``CocoCaptionsSource``,
            ``LlavaInstructSource``, ``RecordsSource``; Hydra ``_target_`` configs).
        val: an optional validation source (one pass, in order, no resume).
        batch_size: records per batch and rank.
        num_workers: DataLoader workers (each reads its own units).
        batches_per_epoch: batches per epoch and rank from endless streams (required with
            several data-parallel ranks); None: an epoch is one pass.
        seed: seeds the unit order of each pass.
        shuffle_units: shuffle the unit order every pass.
        transform: per-record function run in the workers (image preprocessing).
        collate_fn: records -> batch (the VLM module's collate); default: the list of records.
        drop_last: drop each reader's last incomplete batch of a pass.
        pin_memory: pin tensor batches.
    """

    def __init__(self, *, train, val=None, batch_size: int, num_workers: int = 0,
                 batches_per_epoch: int | None = None, seed: int = 1234, shuffle_units: bool = True,
                 transform: Callable | None = None, collate_fn: Callable | None = None,
                 drop_last: bool = False, pin_memory: bool = False) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        if batches_per_epoch is not None and batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1 or None, got {batches_per_epoch}")
        self.train_source, self.val_source = train, val
        self.batch_size, self.num_workers, self.batches_per_epoch = batch_size, num_workers, batches_per_epoch
        self.seed, self.shuffle_units, self.drop_last = seed, shuffle_units, drop_last
        self.transform, self.collate_fn, self.pin_memory = transform, collate_fn, pin_memory
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._pending: deque[dict] = deque()
        self._pass_ended = False
        self._next_reader, self._consumed = 0, 0  # local reader due next; batches of this epoch
        self._restored: dict | None = None

    def _stream(self, source, *, train: bool) -> RecordStream:
        rank, world = data_parallel_rank(self.trainer) if train else (0, 1)
        if train and world > 1 and self.batches_per_epoch is None:
            raise ValueError(f"{world} data-parallel ranks need batches_per_epoch: one-pass epochs "
                             "would give ranks different numbers of steps")
        return RecordStream(source, batch_size=self.batch_size, rank=rank, world_size=world,
                            seed=self.seed, shuffle_units=self.shuffle_units and train,
                            num_batches=self.batches_per_epoch if train else None,
                            transform=self.transform, collate_fn=self.collate_fn,
                            drop_last=self.drop_last and train)

    def train_dataloader(self) -> DataLoader:
        return _PositionLoader(self._stream(self.train_source, train=True), datamodule=self,
                               num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_source is None:
            return []
        stream = self._stream(self.val_source, train=False)
        return DataLoader(stream, batch_size=None, collate_fn=_first, num_workers=self.num_workers,
                          pin_memory=self.pin_memory)

    # ------------------------------------------------------------------------- positions
    def _readers(self) -> int:
        _, world = data_parallel_rank(self.trainer)
        return world * max(self.num_workers, 1)

    def _start_positions(self, workers: int) -> tuple[dict, int, int | None]:
        """Where the readers start the next iteration of the train loader: their positions, the
        local reader that goes first, the batches left in the epoch (endless mode)."""
        if self._restored is not None:
            state, self._restored = self._restored, None
            if state.get("readers") != self._readers() or state.get("seed") != self.seed:
                log.warning("the checkpoint's data state was saved with %s readers (seed %s); this run "
                            "has %s (seed %s): the data restarts from its first pass",
                            state.get("readers"), state.get("seed"), self._readers(), self.seed)
                state = {"positions": {}}
            self._positions = {int(r): tuple(p) for r, p in state["positions"].items()}
            self._pass_ended = bool(state.get("pass_ended"))
            self._next_reader, self._consumed = state.get("next_reader", 0), state.get("consumed", 0)
        if self._pass_ended:  # one-pass mode: the last epoch read everything, start the next pass
            n_pass = max((p[0] for p in self._positions.values()), default=0) + 1
            self._positions = {r: (n_pass, 0, 0) for r in range(self._readers())}
            self._pass_ended, self._next_reader = False, 0
        remaining = None
        if self.batches_per_epoch is not None:
            if self._consumed >= self.batches_per_epoch:
                self._consumed = 0  # a new epoch; the streams go on
            remaining = self.batches_per_epoch - self._consumed
        self._pending.clear()
        return dict(self._positions), self._next_reader % max(workers, 1), remaining

    def _commit(self) -> None:
        if self._pending:
            reader, pos = self._pending.popleft()
            self._positions[reader] = pos
            self._next_reader = reader % max(self.num_workers, 1) + 1
            self._consumed += 1

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        if trainer is not None and trainer.training and not trainer.sanity_checking:
            self._commit()  # a batch the training loop runs (prefetched ones wait in _pending)
        return batch

    def state_dict(self) -> dict:
        if self._restored is not None:
            return dict(self._restored)
        return {"positions": {str(r): list(p) for r, p in _gather(self._positions).items()},
                "readers": self._readers(), "seed": self.seed, "pass_ended": self._pass_ended,
                "next_reader": self._next_reader, "consumed": self._consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)


def _first(item):
    return item[0]


def _gather(positions: dict) -> dict:
    """The positions of every rank's readers (rank 0 alone writes the checkpoint)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(positions)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, positions)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged
