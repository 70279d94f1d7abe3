"""FSDP2 / FSDP2+TP training with 2 CPU processes (gloo) against a single process.

Two launches serve all tests (each launch costs two Python start-ups): a 1-process
ModelParallelStrategy run that writes a distributed checkpoint, then one 2-process script that
trains FSDP2 (+ full activation checkpointing), FSDP2+TP (+ sequence parallel, selective
checkpointing, untied embeddings) and FSDP2 with CPU offload resumed from the 1-process
checkpoint. Reference losses come from plain single-process Lightning runs with the global batch.

Tolerance: fp32 everywhere; sharding changes only the order of floating-point sums (gradient
reduce-scatter, TP partial sums), measured differences are ~1e-7, asserted with atol=2e-5 on
losses around 4.1 — a missing gradient reduction or a wrong shard moves the loss by >1e-3 within
two steps at lr=1e-2.
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import (
    LossRecorder,
    RandomTokens,
    RandomTokensDataModule,
    launch,
    make_module,
    save_init,
    trainer_kwargs,
)
from lightning import Trainer

pytestmark = pytest.mark.distributed
ATOL = 2e-5
STEPS = 6  # 2 epochs of 3 global batches; checkpoints at step 3 (an epoch boundary)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def inits(workdir) -> dict[str, str]:
    return {"tied": str(save_init(workdir / "tied.pt", tie=True)),
            "untied": str(save_init(workdir / "untied.pt", tie=False, seed=1))}


def _single_process(init: str, tie: bool, steps: int, ckpt_path: str | None = None) -> dict:
    recorder = LossRecorder()
    trainer = Trainer(devices=1, **trainer_kwargs(steps, recorder))
    trainer.fit(make_module(init, tie=tie, parallelism=None),
                datamodule=RandomTokensDataModule(global_batch=4, data_parallel=1),
                ckpt_path=ckpt_path)
    return {"losses": recorder.losses, "grad_norms": recorder.grad_norms}


def _close(got: list[float], expected: list[float]) -> None:
    assert len(got) == len(expected)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def reference(inits) -> dict[str, dict]:
    return {"tied": _single_process(inits["tied"], True, STEPS),
            "untied": _single_process(inits["untied"], False, 5)}


@pytest.fixture(scope="module")
def one_process_dcp(workdir, inits):
    """A distributed checkpoint at step 3, written by ModelParallelStrategy with 1 process."""
    out = workdir / "one"
    out.mkdir()
    run = dict(name="mp1", dp=1, tp=1, tie=True, init=inits["tied"], parallelism={"fsdp": True},
               steps=3, ckpt_every=3)
    result = launch({"world": 1, "runs": [run]}, out)
    return out / "mp1" / "step3.ckpt", result


@pytest.fixture(scope="module")
def two_processes(workdir, inits, one_process_dcp):
    out = workdir / "two"
    out.mkdir()
    tied, untied = inits["tied"], inits["untied"]
    runs = [
        dict(name="fsdp", dp=2, tp=1, tie=True, init=tied, steps=STEPS, ckpt_every=3, probe=True,
             parallelism={"activation_checkpointing": "full"}),
        dict(name="tp", dp=1, tp=2, tie=False, init=untied, steps=5,
             parallelism={"sequence_parallel": True, "activation_checkpointing": "selective"}),
        dict(name="offload", dp=2, tp=1, tie=True, init=tied, steps=STEPS,
             resume=str(one_process_dcp[0]), parallelism={"cpu_offload": True}),
    ]
    meta = [dict(name="fsdp", init=tied, tie=True, mesh=[2, 1]),
            dict(name="tp", init=untied, tie=False, mesh=[1, 2],
                 parallelism={"sequence_parallel": True}),
            dict(name="tp_tied", init=tied, tie=True, mesh=[1, 2])]  # embedding replicated over TP
    return out, launch({"world": 2, "runs": runs, "meta_checks": meta}, out)


def test_fsdp2_with_activation_checkpointing_matches_single_process(two_processes, reference):
    run = two_processes[1]["runs"]["fsdp"]
    assert run["all_dtensor"] and abs(run["local_fraction"] - 0.5) < 0.05  # each rank holds half
    assert run["checkpointed"] == 2
    _close(run["losses"], reference["tied"]["losses"])
    # Gradient norms before clipping match too; some exceed gradient_clip_val=1, so the
    # DTensor-aware clipping took part in the trajectory.
    _close(run["grad_norms"], reference["tied"]["grad_norms"])
    assert max(run["grad_norms"]) > 1.0
    assert run["losses"][-1] < run["losses"][0] - 0.1  # it trains
    assert "cannot step the DTensor shards" in run["bnb_error"]  # 8-bit AdamW refused, clearly


def test_fsdp2_tp_sequence_parallel_matches_single_process(two_processes, reference):
    run = two_processes[1]["runs"]["tp"]
    assert "Shard(dim=0)" in run["q_placements"]  # column-parallel q_proj
    assert 0.5 < run["local_fraction"] < 0.51  # all matrices halved, only norms replicated
    assert run["checkpointed"] == 2
    _close(run["losses"], reference["untied"]["losses"])
    _close(run["grad_norms"], reference["untied"]["grad_norms"])


def test_one_process_checkpoint_resumes_in_two_processes_with_cpu_offload(
        two_processes, one_process_dcp, reference):
    run = two_processes[1]["runs"]["offload"]
    assert run["offload"] and abs(run["local_fraction"] - 0.5) < 0.05
    first = one_process_dcp[1]["runs"]["mp1"]["losses"]
    assert len(first) == 3 and len(run["losses"]) == 3  # steps 4..6 only
    _close(first + run["losses"], reference["tied"]["losses"])


def test_two_process_checkpoint_resumes_in_one_plain_process(two_processes, inits, reference, tmp_path):
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from mmllm.train import resolve_ckpt_arg

    out, _ = two_processes
    dcp = out / "fsdp" / "step3.ckpt"
    resolved = resolve_ckpt_arg(str(dcp), tmp_path, strategy=SingleDeviceStrategy("cpu"))
    assert resolved != str(dcp) and resolved.endswith(".ckpt")  # consolidated into one file
    resumed = _single_process(inits["tied"], True, STEPS, ckpt_path=resolved)
    _close(resumed["losses"], reference["tied"]["losses"][3:])


def test_distributed_checkpoint_exports_to_hf_llama(two_processes, tmp_path):
    from transformers import LlamaForCausalLM

    from mmllm.export import export

    out, _ = two_processes
    hf_dir = export(str(out / "fsdp" / "step6.ckpt"), str(tmp_path / "hf"))
    assert sorted(p.name for p in hf_dir.iterdir()) == ["config.json", "generation_config.json",
                                                        "model.safetensors"]
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir)).eval()
    probe = RandomTokens(2, seed=123).tokens[:, :-1]
    with torch.no_grad():
        logits = hf(probe).logits
    trained = torch.load(out / "probe_fsdp.pt")  # the sharded model's logits after step 6
    torch.testing.assert_close(logits, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["fsdp", "tp", "tp_tied"])
def test_meta_device_model_materialises_after_sharding(two_processes, name):
    _, result = two_processes
    meta = result["meta"][name]
    assert meta["meta_left"] == 0
    assert meta["norms_are_one"]
    # Host shards are drawn per rank (no duplicated halves), replicas are then made equal.
    assert meta["halves_differ"] and meta["replicas_agree"]
    assert 0.015 < meta["q_std"] < 0.025  # init_weights ran on the shards (std 0.02)
    assert meta["max_logit_diff"] < 1e-5  # a full state dict loads into the sharded model


@pytest.mark.gpu
def test_one_gpu_fsdp2_bf16_meta_init_with_cpu_offload(inits, tmp_path):
    """The GPU-only paths: meta-device build + shard-wise init (DTensor RNG on CUDA), bf16
    MixedPrecisionPolicy, CPUOffloadPolicy with pinned host shards under Lightning's model.to(cuda)."""
    run = dict(name="gpu", dp=1, tp=1, tie=True, init=inits["tied"], steps=STEPS, accelerator="cuda",
               parallelism={"meta_init": True, "param_dtype": "bfloat16", "cpu_offload": True,
                            "activation_checkpointing": "selective"})
    result = launch({"world": 1, "runs": [run]}, tmp_path)["runs"]["gpu"]
    assert result["offload"] and result["all_dtensor"] and result["checkpointed"] == 2
    assert all(map(torch.isfinite, torch.tensor(result["losses"])))
    assert result["losses"][-1] < result["losses"][0] - 0.1
