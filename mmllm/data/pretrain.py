"""PretrainDataModule: packed token shards mixed by weight/epochs, resumable mid-epoch.

Order of the training stream. The mixture (:class:`mmllm.data.mixture.Mixture`) fixes the
(source, window) at every global position. Global batch ``b`` holds positions
``[b*B*W, (b+1)*B*W)``; data-parallel rank ``r`` of ``W`` takes ``[b*B*W + r*B, b*B*W + (r+1)*B)``. An
epoch ("cycle") is ``N // (B*W)`` global batches (the last incomplete one is dropped so every rank
runs the same number of steps); the next cycle re-shuffles with new permutations. ``W`` counts
data-parallel ranks only (:func:`mmllm.distributed.data_parallel_rank`): under FSDP2 + tensor
parallel the ranks of one TP group read the same batch.

Resuming. The DataModule counts the training batches the model consumed in
``on_before_batch_transfer`` (the prefetched batches do not count) and saves the position in
its ``state_dict``, which Lightning stores in checkpoints and restores before the train
dataloader is iterated; the loader then starts at the next unseen batch, so a resumed run sees
exactly the batches an uninterrupted run would. The position lives in the DataModule, not in
``trainer.current_epoch``, so it stays right when Lightning ends an epoch early
(``limit_train_batches``) or resumes from a checkpoint taken on an epoch's last batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from mmllm.data.mixture import Mixture, MixtureSource
from mmllm.data.shards import TokenShards
from mmllm.distributed.strategy import data_parallel_rank

BATCH_KEYS = ("input_ids", "labels", "doc_ids")

# Lightning warns that an IterableDataset's __len__ may be wrong with several workers when each
# worker yields the whole dataset; MixtureBatches splits batches between workers, so it is exact.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


def _collate(samples: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stacks samples into a batch of (B, T) int64 tensors."""
    return {k: torch.from_numpy(np.stack([s[k] for s in samples])) for k in BATCH_KEYS}


class MixtureBatches(IterableDataset):
    """The batches of one rank for one cycle of a mixture, starting at a given batch.

    DataLoader workers split the work by batch: worker ``w`` of ``n`` yields batches
    ``start + w, start + w + n, ...``; the DataLoader reads workers round robin from worker 0, so
    the batches arrive in order.

    Args:
        shards: one :class:`TokenShards` per mixture source.
        mixture: the mixture (cycle 0); :meth:`set_position` picks the cycle.
        seq_len: tokens per sample.
        batch_size: samples per batch and data-parallel rank.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
    """

    def __init__(self, shards: list[TokenShards], mixture: Mixture, *, seq_len: int,
                 batch_size: int, rank: int = 0, world_size: int = 1):
        self.shards, self.mixture = shards, mixture
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.cycle, self.start = 0, 0

    @property
    def num_batches(self) -> int:
        """Batches per cycle (the same on every rank)."""
        return len(self.mixture) // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        # The full cycle, not what is left after `start`: after a mid-epoch resume Lightning
        # restores its batch counter to the batches already seen and ends the epoch when it
        # reaches len(), which is exactly when this iterable runs out.
        return self.num_batches

    def set_position(self, cycle: int, start: int) -> None:
        """Next iteration yields batches ``start..`` of ``cycle`` (set before ``iter()``:
        workers copy the dataset when the DataLoader iterator is created)."""
        self.cycle, self.start = int(cycle), int(start)

    def batch(self, b: int, mixture: Mixture | None = None) -> dict[str, torch.Tensor]:
        """This rank's part of global batch ``b``: dict of (B, T) int64 tensors."""
        mixture = mixture or self.mixture.for_cycle(self.cycle)
        first = b * self.batch_size * self.world_size + self.rank * self.batch_size
        sources, indices = mixture.get(first, first + self.batch_size)
        return _collate([self.shards[s].sample(int(i), self.seq_len)
                         for s, i in zip(sources, indices)])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mixture = self.mixture.for_cycle(self.cycle)
        for b in range(self.start + worker, self.num_batches, workers):
            yield self.batch(b, mixture)


class _WindowDataset(Dataset):
    """Map-style dataset over fixed (source, window) pairs (validation)."""

    def __init__(self, shards: list[TokenShards], pairs: list[tuple[int, int]], seq_len: int):
        self.shards, self.pairs, self.seq_len = shards, pairs, seq_len

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        s, j = self.pairs[i]
        return {k: torch.from_numpy(v) for k, v in self.shards[s].sample(j, self.seq_len).items()}


class _ResumableLoader(DataLoader):
    """A DataLoader that asks the DataModule where to start each time it is iterated.

    Under a Trainer the DataModule counts the batches the loop runs; without one (a plain
    ``for batch in loader``) the loader counts the batches it hands out.
    """

    def __init__(self, dataset: MixtureBatches, *, datamodule: PretrainDataModule, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._datamodule = datamodule

    def __iter__(self):
        self.dataset.set_position(*self._datamodule._start_position(self.dataset.num_batches))
        iterator = super().__iter__()
        return iterator if self._datamodule.trainer is not None else self._counting(iterator)

    def _counting(self, iterator):
        for batch in iterator:
            self._datamodule._consumed += 1
            yield batch

    # Lightning warns that a mid-epoch checkpoint of a non-resumable loader repeats data unless
    # the loader has state_dict/load_state_dict. It is resumable: the position is in the
    # DataModule's state (restored first), so the loader itself has nothing to save.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class PretrainDataModule(L.LightningDataModule):
    """Pretraining batches from packed token shards, mixed by weight or epochs per source.

    Args:
        sources: training sources, dicts with ``name``, ``path`` (a shard directory) and either
            ``weight`` (sampling proportion) or ``epochs``.
        val_sources: validation sources (``name``, ``path``); every window in order.
        seq_len: tokens per sample.
        batch_size: samples per batch and rank.
        num_samples: samples per epoch (required when a source has a weight).
        val_samples: cap on validation samples, split equally between the validation sources
            (first windows of each).
        num_workers: DataLoader workers (they split the work by batch, order is kept).
        seed: seed of the mixture permutations.
        pin_memory: pin batches in page-locked memory.

    Batches are dicts of (B, seq_len) int64 tensors ``input_ids``, ``labels`` and ``doc_ids``.
    """

    def __init__(self, *, sources: list[dict], val_sources: list[dict] | None = None, seq_len: int,
                 batch_size: int, num_samples: int | None = None, val_samples: int | None = None,
                 num_workers: int = 0, seed: int = 1234, pin_memory: bool = False):
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len}, "
                             f"{batch_size}")
        if not sources:
            raise ValueError("at least one training source is needed")
        self.sources = [MixtureSource.from_config(_plain(s)) for s in sources]
        self.val_sources = [MixtureSource.from_config(_plain(s)) for s in val_sources or []]
        self.seq_len, self.batch_size = seq_len, batch_size
        self.num_samples, self.val_samples = num_samples, val_samples
        self.num_workers, self.seed, self.pin_memory = num_workers, seed, pin_memory
        self.mixture: Mixture | None = None
        self._train_shards: list[TokenShards] = []
        self._val_shards: list[TokenShards] = []
        self._cycle, self._consumed = 0, 0  # position: batches of this rank consumed in the cycle
        self._restored: dict | None = None

    # ----------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Opens the shards and builds the mixture; a new fit starts at position 0 (a checkpoint
        restores its position after this)."""
        if stage in (None, "fit"):
            self._setup_train()
            self._cycle, self._consumed, self._restored = 0, 0, None
        if self.val_sources and not self._val_shards:
            self._val_shards = [_open(s) for s in self.val_sources]
            _check_vocab(list(zip(self.sources, self._train_shards))
                         + list(zip(self.val_sources, self._val_shards)))

    def _setup_train(self) -> None:
        self._train_shards = [_open(s) for s in self.sources]
        sizes = [sh.num_samples(self.seq_len) for sh in self._train_shards]
        if not any(sizes):
            raise ValueError(f"seq_len={self.seq_len} needs {self.seq_len + 1} tokens per "
                             "window; no shard of any training source is that long")
        _check_vocab(list(zip(self.sources, self._train_shards)))
        self.mixture = Mixture(self.sources, sizes, num_samples=self.num_samples, seed=self.seed)
        rank_zero_info(f"pretraining mixture (seq_len={self.seq_len}):\n"
                       f"{self.mixture.summary_table()}")

    def summary(self) -> dict:
        """The training mixture's :meth:`Mixture.summary`."""
        if self.mixture is None:
            self._setup_train()
        return self.mixture.summary()

    def _rank_world(self) -> tuple[int, int]:
        # Data-parallel rank and size: the ranks of one tensor-parallel group share batches.
        return data_parallel_rank(self.trainer)

    # ------------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        if self.mixture is None:
            self._setup_train()
        rank, world = self._rank_world()
        dataset = MixtureBatches(self._train_shards, self.mixture, seq_len=self.seq_len,
                                 batch_size=self.batch_size, rank=rank, world_size=world)
        if dataset.num_batches == 0:
            raise ValueError(f"{len(self.mixture)} samples make no global batch of "
                             f"{self.batch_size} x {world} ranks")
        # No persistent workers: each iteration must copy the dataset with its new position.
        return _ResumableLoader(dataset, datamodule=self, num_workers=self.num_workers,
                                pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_sources:
            return []
        if not self._val_shards:
            self.setup("validate")
        sizes = [sh.num_samples(self.seq_len) for sh in self._val_shards]
        if not any(sizes):
            raise ValueError(f"seq_len={self.seq_len}: no validation shard has "
                             f"{self.seq_len + 1} tokens")
        caps = sizes if self.val_samples is None else _equal_split(self.val_samples, sizes)
        pairs = [(s, j) for s, cap in enumerate(caps) for j in range(cap)]
        dataset = _WindowDataset(self._val_shards, pairs, self.seq_len)
        return DataLoader(dataset, batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory)

    # ------------------------------------------------------------------------- resuming
    def _start_position(self, num_batches: int) -> tuple[int, int]:
        """(cycle, first batch) for the next iteration of the train loader."""
        if self.trainer is not None and getattr(self.trainer, "overfit_batches", 0):
            return 0, 0  # overfitting: the same first batches every epoch
        if self._restored is not None:
            self._cycle, self._consumed = self._from_state(self._restored)
            self._restored = None
        if self._consumed >= num_batches:  # the cycle is done: the next one re-shuffles
            self._cycle, self._consumed = self._cycle + 1, 0
        return self._cycle, self._consumed

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        # Only training batches the loop actually runs; validation and model-summary inputs
        # pass through here too.
        if (trainer is not None and trainer.training and not trainer.sanity_checking
                and isinstance(batch, Mapping) and set(BATCH_KEYS) <= set(batch)):
            self._consumed += 1
        return batch

    def state_dict(self) -> dict:
        if self._restored is not None:  # restored but not iterated yet
            return dict(self._restored)
        _, world = self._rank_world()
        return {"cycle": self._cycle, "position": self._consumed * self.batch_size * world,
                "seed": self.seed,
                "num_samples": None if self.mixture is None else len(self.mixture)}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)

    def _from_state(self, state: dict) -> tuple[int, int]:
        """(cycle, batches consumed) of a saved state, checked against this configuration."""
        _, world = self._rank_world()
        per_batch = self.batch_size * world
        if state.get("seed") != self.seed or state.get("num_samples") != len(self.mixture):
            raise ValueError(f"checkpoint data state {state} does not match this mixture "
                             f"(seed={self.seed}, num_samples={len(self.mixture)})")
        if state["position"] % per_batch:
            raise ValueError(f"checkpoint position {state['position']} is not a multiple of the "
                             f"global batch {per_batch}: resume with the same "
                             "batch_size x world_size")
        return int(state["cycle"]), int(state["position"]) // per_batch


def _plain(cfg):
    """A Hydra DictConfig or a dict as a plain dict."""
    if isinstance(cfg, (Mapping, MixtureSource)):
        return cfg if isinstance(cfg, MixtureSource) else {k: cfg[k] for k in cfg}
    raise ValueError(f"a source must be a mapping, got {cfg!r}")


def _open(source: MixtureSource) -> TokenShards:
    if not source.path:
        raise ValueError(f"source {source.name!r} has no 'path'")
    try:
        return TokenShards(source.path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"source {source.name!r}: {e}") from e


def _check_vocab(pairs: list[tuple[MixtureSource, TokenShards]]) -> None:
    vocab = {s.name: sh.vocab_size for s, sh in pairs}
    if len(set(vocab.values())) > 1:
        raise ValueError(f"sources were tokenised with different vocabularies: {vocab}")


def _equal_split(total: int, sizes: list[int]) -> list[int]:
    """``total`` split as equally as possible over sources, capped by their sizes."""
    caps = [0] * len(sizes)
    left = total
    while left > 0 and any(c < s for c, s in zip(caps, sizes)):
        open_ = [k for k, (c, s) in enumerate(zip(caps, sizes)) if c < s]
        share, extra = divmod(left, len(open_))
        for n, k in enumerate(open_):
            give = min(share + (n < extra), sizes[k] - caps[k])
            caps[k] += give
            left -= give
    return caps
