"""Data sharding under tensor parallel, MoE under data parallel, and the fused loss under FSDP2,
with 2 CPU processes (gloo) against single-process runs (one launch serves all tests).

* The kit's PretrainDataModule under FSDP2+TP (tp=2, dp=1): both ranks of the TP group read the
  same batch, so losses equal one process with the same batch (sharding by the global rank gave
  each TP rank its own batch: a silently wrong model). Under dp=2 each rank reads its half of the
  global batch; ``tokens_seen`` and the saved data position count data-parallel ranks only.
* MoE with a router forced to leave expert 3 idle, under DDP (``find_unused_parameters=False``)
  and FSDP2: every expert takes part in every step, both run and match one process.
* ``fused_loss=true`` (the chunked fallback on CPU) under FSDP2: the LM head's weight is used
  after the forward (FSDP2 keeps the root gathered); its gradient is still reduced correctly.

Tolerance as in test_fsdp_tp.py: fp32, atol 2e-5 on losses around 4-6.
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import (
    SEQ,
    LossRecorder,
    RandomTokensDataModule,
    launch,
    make_module,
    pretrain_datamodule,
    save_init,
    trainer_kwargs,
    write_shards,
)
from lightning import Trainer

pytestmark = pytest.mark.distributed
ATOL = 2e-5
STEPS = 4  # crosses the end of the 3-batch data cycle
BIG_VOCAB = {"vocab_size": 320}  # the BPE corpus has < 320 ids; divisible by tp=2
MOE = {"n_experts": 4, "moe_top_k": 2}
# The load-balancing loss is a product of per-batch means, computed on each rank's own tokens
# (as in Switch/Mixtral training): it differs from the global batch's, so the parity runs leave
# it out; the router still learns through the expert weighting.
NO_AUX = {"moe_aux_coef": 0.0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist_data")
    return {"root": root, "shards": write_shards(root),
            "untied": str(save_init(root / "untied.pt", tie=False, seed=1, model=BIG_VOCAB)),
            "tied": str(save_init(root / "tied.pt", tie=True, seed=2, model=BIG_VOCAB)),
            "moe": str(save_init(root / "moe.pt", tie=True, seed=3, model=MOE)),
            "small": str(save_init(root / "small.pt", tie=True, seed=4))}


def _single(init: str, *, tie: bool, dm, model=None, idle_expert=None, **module) -> list[float]:
    recorder = LossRecorder()
    trainer = Trainer(devices=1, **trainer_kwargs(STEPS, recorder))
    trainer.fit(make_module(init, tie=tie, parallelism=None, model=model, idle_expert=idle_expert,
                            **module), datamodule=dm)
    return recorder.losses


def _assert_close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=ATOL, rtol=0,
                               msg=lambda m: f"{m}\ngot {got}\nexpected {expected}")


@pytest.fixture(scope="module")
def two(setup) -> dict:
    s = setup
    common = dict(steps=STEPS, global_batch=4)
    runs = [
        dict(name="tp_data", data="pretrain", dp=1, tp=2, tie=False, init=s["untied"],
             model=BIG_VOCAB, parallelism={"sequence_parallel": True}, **common),
        dict(name="dp_data", data="pretrain", dp=2, tp=1, tie=True, init=s["tied"],
             model=BIG_VOCAB, parallelism={"fsdp": True}, **common),
        dict(name="moe_ddp", strategy="ddp", dp=2, tp=1, tie=True, init=s["moe"], model=MOE,
             idle_expert=3, module=NO_AUX, **common),
        dict(name="moe_fsdp", dp=2, tp=1, tie=True, init=s["moe"], model=MOE, idle_expert=3,
             module=NO_AUX, parallelism={"fsdp": True}, **common),
        dict(name="fused_fsdp", dp=2, tp=1, tie=True, init=s["small"], module={"fused_loss": True},
             parallelism={"fsdp": True}, **common),
    ]
    out = s["root"] / "two"
    out.mkdir()
    return launch({"world": 2, "runs": runs, "shards": s["shards"]}, out, timeout=600)["runs"]


def test_tensor_parallel_ranks_read_the_same_batches(two, setup):
    run = two["tp_data"]
    assert run["batches"][0] == run["batches"][1]  # one TP group, one batch
    ref = _single(setup["untied"], tie=False, model=BIG_VOCAB,
                  dm=pretrain_datamodule(setup["shards"], global_batch=4, data_parallel=1))
    _assert_close(run["losses"], ref)
    assert run["tokens_seen"] == STEPS * 4 * SEQ  # counted once per TP group
    assert run["data_position"] == (STEPS - 3) * 4  # second cycle, one global batch in


def test_data_parallel_ranks_read_different_halves(two, setup):
    run = two["dp_data"]
    mine, other = run["batches"]
    assert len(mine) == STEPS and all(a != b for a, b in zip(mine, other, strict=True))
    ref = _single(setup["tied"], tie=True, model=BIG_VOCAB,
                  dm=pretrain_datamodule(setup["shards"], global_batch=4, data_parallel=1))
    _assert_close(run["losses"], ref)  # the two halves together are the one-process batch
    assert run["tokens_seen"] == STEPS * 4 * SEQ
    assert run["data_position"] == (STEPS - 3) * 4


@pytest.fixture(scope="module")
def moe_reference(setup) -> list[float]:
    return _single(setup["moe"], tie=True, model=MOE, idle_expert=3, **NO_AUX,
                   dm=RandomTokensDataModule(global_batch=4, data_parallel=1))


@pytest.mark.parametrize("name", ["moe_ddp", "moe_fsdp"])
def test_moe_with_an_idle_expert_trains_under_data_parallel(two, moe_reference, name):
    run = two[name]
    _assert_close(run["losses"], moe_reference)
    assert run["losses"][-1] < run["losses"][0]


def test_fused_loss_under_fsdp2_matches_plain_single_process(two, setup):
    ref = _single(setup["small"], tie=True, dm=RandomTokensDataModule(global_batch=4,
                                                                       data_parallel=1))
    _assert_close(two["fused_fsdp"]["losses"], ref)
