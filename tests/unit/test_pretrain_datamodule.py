"""PretrainDataModule: batch content and order, ranks and workers, validation, errors, and the key
property: a Lightning run interrupted and resumed from a checkpoint sees exactly the batches of an
uninterrupted run (no repeats, no skips), with workers and across an epoch boundary."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mmllm.data import (
    Mixture,
    MixtureBatches,
    PretrainDataModule,
    TokenShards,
    tokenize_to_shards,
    train_bpe_tokenizer,
)

WORDS = ("alpha beta gamma delta river stone garden window morning market tower boat apple "
         "green quiet heavy broken winter yellow seven").split()
SEQ_LEN, BATCH = 8, 2
pytestmark = [pytest.mark.filterwarnings("ignore:The dirpath has changed"),
              pytest.mark.filterwarnings("ignore:.*`IterableDataset` has `__len__` defined")]


def docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory) -> dict[str, str]:
    """Three shard directories (web, wiki, val) of a tiny byte-level BPE corpus."""
    root = tmp_path_factory.mktemp("shards")
    tok = train_bpe_tokenizer(docs(200, seed=0), vocab_size=300, show_progress=False)
    out = {}
    corpora = (("web", 40, 1, 200), ("wiki", 15, 2, 10**6), ("val", 10, 3, 10**6))
    for name, n, seed, shard_size in corpora:
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs(n, seed)))
        tokenize_to_shards(path, root / name, tok, shard_size_tokens=shard_size)
        out[name] = str(root / name)
    return out


def make_dm(shard_dirs, **kw) -> PretrainDataModule:
    args = dict(sources=[{"name": "web", "path": shard_dirs["web"], "weight": 0.75},
                         {"name": "wiki", "path": shard_dirs["wiki"], "weight": 0.25}],
                val_sources=[{"name": "val", "path": shard_dirs["val"]}],
                seq_len=SEQ_LEN, batch_size=BATCH, num_samples=24, seed=5)
    return PretrainDataModule(**{**args, **kw})


def expected_batch(shard_dirs, mixture: Mixture, positions: range) -> dict[str, np.ndarray]:
    """The batch at mixture positions, read straight from TokenShards (independent of the DM)."""
    shards = [TokenShards(shard_dirs["web"]), TokenShards(shard_dirs["wiki"])]
    src, idx = mixture.get(positions.start, positions.stop)
    rows = [shards[s].sample(int(i), SEQ_LEN) for s, i in zip(src, idx)]
    return {k: np.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "doc_ids")}


def test_batches_follow_the_mixture(shard_dirs):
    dm = make_dm(shard_dirs)
    dm.setup("fit")
    assert dm.summary()["sources"]["web"]["num_samples"] == 18
    batches = list(dm.train_dataloader())
    assert len(batches) == 12 == len(dm.train_dataloader())
    for b, batch in enumerate(batches):
        assert set(batch) == {"input_ids", "labels", "doc_ids"}
        assert all(v.dtype == torch.int64 and v.shape == (BATCH, SEQ_LEN) for v in batch.values())
        want = expected_batch(shard_dirs, dm.mixture, range(b * BATCH, (b + 1) * BATCH))
        for k in want:
            np.testing.assert_array_equal(batch[k].numpy(), want[k])
    np.testing.assert_array_equal(batches[0]["input_ids"][:, 1:], batches[0]["labels"][:, :-1])
    # next iteration = next cycle: same source counts, new permutations
    again = list(dm.train_dataloader())
    assert len(again) == 12
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))


def test_ranks_take_consecutive_slices_of_each_global_batch(shard_dirs):
    dm = make_dm(shard_dirs)
    dm.setup("fit")
    shards = [TokenShards(shard_dirs["web"]), TokenShards(shard_dirs["wiki"])]
    single = MixtureBatches(shards, dm.mixture, seq_len=SEQ_LEN, batch_size=2 * BATCH)
    ranks = [MixtureBatches(shards, dm.mixture, seq_len=SEQ_LEN, batch_size=BATCH, rank=r,
                            world_size=2) for r in range(2)]
    assert single.num_batches == ranks[0].num_batches == 6
    for whole, r0, r1 in zip(single, *ranks):
        both = torch.cat([r0["input_ids"], r1["input_ids"]])
        torch.testing.assert_close(both, whole["input_ids"])


def test_workers_keep_the_global_order(shard_dirs):
    base = [b["input_ids"] for b in make_dm(shard_dirs).train_dataloader()]
    with_workers = [b["input_ids"] for b in make_dm(shard_dirs, num_workers=2).train_dataloader()]
    assert len(base) == len(with_workers) == 12
    for a, b in zip(base, with_workers):
        torch.testing.assert_close(a, b)


def test_validation_is_every_window_in_order(shard_dirs):
    val = TokenShards(shard_dirs["val"])
    n = val.num_samples(SEQ_LEN)
    batches = list(make_dm(shard_dirs).val_dataloader())
    ids = torch.cat([b["input_ids"] for b in batches])
    assert ids.shape == (n, SEQ_LEN)
    for j in range(n):
        np.testing.assert_array_equal(ids[j].numpy(), val.sample(j, SEQ_LEN)["input_ids"])
    capped = make_dm(shard_dirs, val_samples=3).val_dataloader()
    capped = torch.cat([b["input_ids"] for b in capped])
    torch.testing.assert_close(capped, ids[:3])


def test_clear_errors(shard_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="source 'nope'"):
        missing = [{"name": "nope", "path": str(tmp_path / "nope"), "weight": 1}]
        make_dm(shard_dirs, sources=missing).setup("fit")
    with pytest.raises(ValueError, match="no shard of any training source"):
        make_dm(shard_dirs, seq_len=100_000).setup("fit")
    with pytest.raises(ValueError, match=">= 0"):
        negative = [{"name": "web", "path": shard_dirs["web"], "weight": -1}]
        make_dm(shard_dirs, sources=negative).setup("fit")
    with pytest.raises(ValueError, match="num_samples is required"):
        make_dm(shard_dirs, num_samples=None).setup("fit")
    with pytest.raises(ValueError, match="positive"):
        make_dm(shard_dirs, batch_size=0)


def test_state_is_a_sample_position_independent_of_the_layout(shard_dirs):
    """The hook counts this rank's batches; the state is samples consumed by all ranks."""
    def dm_on(rank: int, world: int, training: bool = True) -> PretrainDataModule:
        dm = make_dm(shard_dirs)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=training,
                                     sanity_checking=False)
        dm.setup("fit")
        return dm

    dm = dm_on(1, 2)
    loader = iter(dm.train_dataloader())
    for _ in range(4):
        dm.on_before_batch_transfer(next(loader), 0)
    dm.on_before_batch_transfer({"input_ids": torch.zeros(3)}, 0)  # not a data batch: ignored
    assert dm.state_dict() == {"cycle": 0, "position": 4 * BATCH * 2, "seed": 5, "num_samples": 24}
    not_training = dm_on(1, 2, training=False)
    not_training.on_before_batch_transfer(next(iter(not_training.train_dataloader())), 0)
    assert not_training.state_dict()["position"] == 0  # validation batches do not count

    shards = [TokenShards(shard_dirs["web"]), TokenShards(shard_dirs["wiki"])]
    for world, rank, batch in ((2, 1, 4), (4, 3, 2)):  # 16 samples = batch 4 of 2 ranks = 2 of 4
        resumed = dm_on(rank, world)
        resumed.load_state_dict(dm.state_dict())
        first = next(iter(resumed.train_dataloader()))
        want = MixtureBatches(shards, resumed.mixture, seq_len=SEQ_LEN, batch_size=BATCH, rank=rank,
                              world_size=world).batch(batch)
        torch.testing.assert_close(first["input_ids"], want["input_ids"])
    odd = dm_on(0, 3)  # 16 samples is no whole number of 6-sample global batches
    odd.load_state_dict(dm.state_dict())
    with pytest.raises(ValueError, match="multiple of the global batch"):
        iter(odd.train_dataloader())
    other_seed = make_dm(shard_dirs, seed=6)
    other_seed.setup("fit")
    other_seed.load_state_dict(dm.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        iter(other_seed.train_dataloader())


# ------------------------------------------------------------------- resuming with Lightning
class Recorder(L.LightningModule):
    """Records the token ids of every training batch it runs (validation batches pass by too)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []
        self.validated = 0

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["input_ids"].flatten().tolist())
        return (self.w * batch["input_ids"].float().mean()).sum() ** 2

    def validation_step(self, batch, batch_idx):
        self.validated += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Crash(Callback):
    """Simulates a crash: raises when the batch after step ``at`` starts (after its checkpoint)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise KeyError("crash")


def fit(shard_dirs, root, *, steps: int, num_workers: int, ckpt_path=None, crash_at=None):
    model, dm = Recorder(), make_dm(shard_dirs, num_workers=num_workers)
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=1, save_top_k=-1,
                                 filename="{step}")]
    if crash_at is not None:
        callbacks.append(Crash(crash_at))
    # validation every 5 batches and a sanity check: their batches must not count as consumed
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, callbacks=callbacks, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=1, val_check_interval=5, limit_val_batches=2)
    if crash_at is None:
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    else:
        with pytest.raises(KeyError, match="crash"):
            trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert model.validated > 0
    return model.seen, trainer


_UNINTERRUPTED: dict[int, list] = {}


@pytest.mark.parametrize("num_workers, crash_at", [
    (0, 3),   # mid-epoch (an epoch is 12 batches)
    (0, 12),  # on the last batch of the epoch
    (2, 5),   # mid-epoch with two workers prefetching ahead
    (2, 14),  # in the second epoch
])
def test_resume_sees_exactly_the_uninterrupted_batches(shard_dirs, tmp_path, num_workers, crash_at):
    steps = 18  # crosses the epoch boundary at 12
    if num_workers not in _UNINTERRUPTED:
        seen, trainer = fit(shard_dirs, tmp_path / "full", steps=steps, num_workers=num_workers)
        assert trainer.global_step == steps
        assert trainer.datamodule.state_dict()["cycle"] == 1  # 12 batches of cycle 0, 6 of cycle 1
        assert trainer.datamodule.state_dict()["position"] == 6 * BATCH
        _UNINTERRUPTED[num_workers] = seen
    full = _UNINTERRUPTED[num_workers]
    assert len(full) == steps
    assert full[:6] != full[12:18]  # the second epoch is re-shuffled

    first, _ = fit(shard_dirs, tmp_path / "run", steps=steps, num_workers=num_workers,
                   crash_at=crash_at)
    assert first == full[:crash_at]
    ckpt = tmp_path / "run" / f"step={crash_at}.ckpt"
    state = torch.load(ckpt, weights_only=False)["PretrainDataModule"]
    # the checkpoint of step k: k batches of BATCH samples consumed (cycle 1 after 12)
    cycle, batches = (0, crash_at) if crash_at <= 12 else (1, crash_at - 12)
    assert (state["cycle"], state["position"]) == (cycle, batches * BATCH)
    rest, trainer = fit(shard_dirs, tmp_path / "resumed", steps=steps, num_workers=num_workers,
                        ckpt_path=str(ckpt))
    assert trainer.global_step == steps
    assert first + rest == full  # no batch repeated, none skipped


class RankRecorder(Recorder):
    """Writes what each rank saw to ``out/rank{r}.json`` (ddp_spawn runs in other processes)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = out

    def on_train_end(self):
        path = f"{self.out}/rank{self.global_rank}.json"
        with open(path, "a") as f:
            f.write(json.dumps(self.seen) + "\n")


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_ranks_read_their_slices_and_resume(shard_dirs, tmp_path):
    """Two gloo processes: rank r runs positions [b*B*W + r*B, ...) and a resumed run continues."""
    def run(steps: int, ckpt_path=None):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=steps,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}",
                                                       every_n_train_steps=3, save_top_k=-1)],
                            logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(RankRecorder(str(tmp_path)), datamodule=make_dm(shard_dirs, val_sources=None),
                    ckpt_path=ckpt_path)

    run(3)
    run(8, ckpt_path=str(tmp_path / "ckpt" / "step=3.ckpt"))  # 6 global batches a cycle: crosses
    dm = make_dm(shard_dirs)
    dm.setup("fit")
    shards = [TokenShards(shard_dirs["web"]), TokenShards(shard_dirs["wiki"])]
    for rank in range(2):
        lines = (tmp_path / f"rank{rank}.json").read_text().splitlines()
        runs = [json.loads(line) for line in lines]
        assert [len(r) for r in runs] == [3, 5]
        ds = MixtureBatches(shards, dm.mixture, seq_len=SEQ_LEN, batch_size=BATCH, rank=rank,
                            world_size=2)
        want = []
        for cycle in (0, 1):
            ds.set_position(cycle, 0)
            want += [b["input_ids"].flatten().tolist() for b in ds]
        assert runs[0] + runs[1] == want[:8]
