"""The reward model under FSDP2 with 2 CPU processes: it learns the synthetic preference, every
parameter is sharded, normalisation runs on the shards, and the distributed checkpoint reloads as
a scorer (in one process) that reproduces the sharded model's scores with mean 0 on the
reference responses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_helpers import _kill_group, free_port

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("rm_fsdp")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("reward_worker.py")), str(out)],
                            env=env, cwd=out, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=300)
    finally:
        _kill_group(proc.pid)
    if proc.returncode != 0 or not (out / "result.json").is_file():
        raise RuntimeError(f"reward worker failed (exit {proc.returncode}):\n{log[-6000:]}")
    return json.loads((out / "result.json").read_text()), out


def test_fsdp2_reward_model_learns_and_is_sharded(result):
    r, _ = result
    assert r["world"] == 2 and r["dtensor"]
    assert r["metrics"]["val/reward_acc"] > 0.75


def test_distributed_checkpoint_reloads_as_normalised_scorer(result):
    from mmllm.data.preference import PreferenceCollate
    from mmllm.distributed import is_distributed_checkpoint
    from mmllm.modules.reward import load_reward_model

    r, out = result
    assert is_distributed_checkpoint(Path(r["last"]))  # one shard per rank
    scorer = load_reward_model(out / "run")
    assert scorer.reward_offset == pytest.approx(r["offset"]) and r["offset"] != 0.0
    import mmllm.data.preference as pref

    dm = pref.PreferenceDataModule(sources=[{"name": "synthetic", "path": str(out / "synthetic.jsonl")}],
                                   vocab_size=512, seq_len=96, batch_size=4, cache_dir=str(out / "cache"),
                                   val_fraction=0.2)
    dm.setup()
    batch = PreferenceCollate(pad_id=0)(dm._val[:4])
    with torch.no_grad():
        scores = scorer.model(batch["input_ids"], lengths=batch["lengths"]).scores
    assert scores.tolist() == pytest.approx(r["scores"], abs=1e-4)
    refs = dm.val_responses()
    assert abs(scorer([p for p, _ in refs], [x for _, x in refs]).mean().item()) < 1e-4
