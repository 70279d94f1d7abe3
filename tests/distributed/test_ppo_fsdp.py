"""PPO under FSDP2 with 2 CPU processes: policy + value head, reference and reward model all
sharded; rollouts gather the policy once and decode without collectives (each rank stops after
its own number of tokens); results equal an unsharded copy's; PPO-ptx trains; the policy saves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from dist_helpers import launch_ranks

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ppo_fsdp")
    launch_ranks(Path(__file__).with_name("ppo_fsdp_worker.py"), [str(out)], world=2, timeout=300)
    return json.loads((out / "result.json").read_text())


def test_every_model_is_sharded(result):
    assert result["dtensor"] == {"model": True, "ref": True, "reward_model": True}


def test_sharded_rollouts_match_unsharded(result):
    p = result["parity"]
    assert p["same_tokens"]
    assert p["score_diff"] < 1e-5 and p["logprob_diff"] < 1e-5


def test_ppo_trains_under_fsdp2(result):
    h = result["history"]
    assert result["rollouts"] == 3 and len(h) == 3  # 12 optimizer steps / (2 epochs x 2 minibatches)
    for r in h:
        for key in ("reward_mean", "kl", "ptx_loss", "value_loss", "clip_frac", "probe/score_mean"):
            assert math.isfinite(r[key]), (key, r)
    assert h[-1]["ptx_loss"] < h[0]["ptx_loss"]
    # Ranks decoded different prompts (each its half of every global batch) and stopped after
    # their own numbers of tokens: no collective ran per decode step.
    seen, lengths = result["seen"], result["lengths"]
    assert all(len(rank) == 3 for rank in seen)
    for a, b in zip(*seen):
        assert not set(map(tuple, a)) & set(map(tuple, b))
    assert any(max(a) != max(b) for a, b in zip(*lengths)), lengths
    assert result["saved_diff"] == 0.0
