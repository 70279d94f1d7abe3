"""CuratedTextDataModule: prepare_data curates, splits and tokenises; batches come out."""

from __future__ import annotations

import json

import pytest
from curation_testdata import MAX_PAYLOAD

from mmllm.data.curated import CuratedTextDataModule


@pytest.fixture
def dm_kwargs(tmp_path, warc_path, blocklist_dir) -> dict:
    return {"inputs": str(warc_path), "cache_dir": str(tmp_path / "cache"), "executor": "local",
            "curation_overrides": [f"stages.read.max_payload_bytes={MAX_PAYLOAD}",
                                   f"stages.url_filter.blocklist_paths=[{blocklist_dir}]"],
            "val_fraction": 0.2, "vocab_size": 400, "seq_len": 32, "batch_size": 2}


def test_prepare_data_curates_and_tokenises(dm_kwargs, tmp_path):
    dm = CuratedTextDataModule(**dm_kwargs)
    dm.prepare_data()
    assert dm.curation_report["output"]["documents"] == 7
    text = tmp_path / "cache" / "text"
    n_train = sum(1 for _ in (text / "train.jsonl").open())
    n_val = sum(1 for _ in (text / "val.jsonl").open())
    assert n_train + n_val == 7 and n_val >= 1
    meta = json.loads((tmp_path / "cache" / "corpus" / "shards" / "train" / "meta.json").read_text())
    assert meta["num_docs"] == n_train and meta["vocab_size"] == len(dm.tokenizer) == 400
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 32) and int(batch["input_ids"].max()) < 400
    assert (batch["labels"][:, :-1] == batch["input_ids"][:, 1:]).all()  # next-token targets
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[1] == 32
    # A second prepare_data reuses everything: same curation, same split, same shards.
    shard_meta = tmp_path / "cache" / "corpus" / "shards" / "train" / "meta.json"
    mtime = shard_meta.stat().st_mtime_ns
    again = CuratedTextDataModule(**dm_kwargs)
    again.prepare_data()
    assert shard_meta.stat().st_mtime_ns == mtime


def test_bad_val_fraction(dm_kwargs):
    with pytest.raises(ValueError, match="val_fraction"):
        CuratedTextDataModule(**{**dm_kwargs, "val_fraction": 0.0})
