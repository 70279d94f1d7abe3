"""Models that wrap a decoder (reward model, policy + value head, vision-language model) shard
like the decoder: under FSDP2 (dp=2) and FSDP2+TP (tp=2, sequence parallel) with 2 CPU processes,
losses before and after an AdamW step and all gradients equal the unsharded model's (fp32;
sharding reorders sums only: measured gradient differences <4e-6 with |grad| up to ~1,
loss differences <5e-7; asserted at 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dist_helpers import launch_ranks

pytestmark = pytest.mark.distributed
CASES = [f"{kind}/{mesh}" for kind in ("reward", "policy_value", "vlm") for mesh in ("fsdp", "tp")]


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("heads")
    launch_ranks(Path(__file__).with_name("heads_worker.py"), [str(out)], world=2, timeout=300)
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_wrapped_model_matches_unsharded(result, case):
    r = result[case]
    assert r["dtensor"]  # every parameter is sharded or placed: the wrapper's modules too
    assert r["names"] == r["ref_names"]  # the same parameters get gradients
    assert r["grad_diff"] < 1e-5
    for got, ref in zip(r["got"], r["ref"], strict=True):
        assert abs(got - ref) < 1e-5, (r["got"], r["ref"])
    assert r["got"][1] != r["got"][0]  # the step changed the model
