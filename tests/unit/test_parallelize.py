"""mmllm.distributed pieces that need no process group: activation checkpointing, compile, meta
materialisation, gradient clipping, TP checks, checkpoint conversion, launcher run dirs."""

from __future__ import annotations

import copy

import pytest
import torch

from mmllm.distributed import (
    apply_activation_checkpointing,
    check_tp_compatible,
    clip_grad_norm_,
    grad_norm,
    parallelize,
    rank_overrides,
    run_id,
)
from mmllm.distributed.checkpoint import optimizer_state_to_torch
from mmllm.distributed.parallelize import model_class_path, to_dtype
from mmllm.losses import causal_lm_loss
from mmllm.models import DecoderLM


def _grads(model: DecoderLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss, _ = causal_lm_loss(model(ids).logits, ids)
    loss.backward()
    # named_parameters shows the wrapper's module; state_dict() hides it (checked below).
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode,every", [("full", 1), ("selective", 1), ("full", 2)])
def test_activation_checkpointing_leaves_gradients_unchanged(tiny_lm_kwargs, mode, every):
    model = DecoderLM(**tiny_lm_kwargs)
    ids = torch.randint(0, tiny_lm_kwargs["vocab_size"], (2, 16))
    expected = _grads(model, ids)
    wrapped = parallelize(copy.deepcopy(model), None, activation_checkpointing=mode,
                          activation_checkpointing_every=every)
    n_wrapped = sum(type(b).__name__ == "CheckpointWrapper" for b in wrapped.layers)
    assert n_wrapped == (2 if every == 1 else 1)
    got = _grads(wrapped, ids)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)
    assert set(wrapped.state_dict()) == set(model.state_dict())  # checkpoints keep plain names


def test_selective_checkpointing_recomputes_less_than_full(tiny_lm_kwargs):
    """Selective keeps matmul outputs: fewer ops are re-run in backward than with full AC."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.mm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                self.mm += 1
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, tiny_lm_kwargs["vocab_size"], (2, 16))
    counts = {}
    for mode in ("none", "full", "selective"):
        model = parallelize(DecoderLM(**tiny_lm_kwargs), None, activation_checkpointing=mode)
        loss, _ = causal_lm_loss(model(ids).logits, ids)
        with CountMM() as counter:
            loss.backward()
        counts[mode] = counter.mm
    # Full AC re-runs the projections of both blocks (all but down_proj, whose output backward
    # does not need: recomputation stops early); selective re-runs none of them.
    assert counts["full"] >= counts["none"] + 2 * 6
    assert counts["selective"] == counts["none"]


def test_unknown_activation_checkpointing_mode_is_rejected(tiny_lm_kwargs):
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_activation_checkpointing(DecoderLM(**tiny_lm_kwargs), "sometimes")


def test_compile_per_block_keeps_names_and_gradients(tiny_lm_kwargs):
    model = DecoderLM(**tiny_lm_kwargs)
    ids = torch.randint(0, tiny_lm_kwargs["vocab_size"], (2, 16))
    expected = _grads(model, ids)
    compiled = parallelize(copy.deepcopy(model), None, compile=True, compile_backend="aot_eager")
    got = _grads(compiled, ids)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5)


def test_meta_model_is_materialised_by_parallelize(tiny_lm_kwargs):
    with torch.device("meta"):
        model = DecoderLM(**tiny_lm_kwargs, tie_embeddings=True)
    model = parallelize(model, None, activation_checkpointing="full")
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.lm_head.weight is model.embed_tokens.weight  # re-tied after to_empty
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert 0.015 < float(model.layers[0].attn.q_proj.weight.std()) < 0.025
    reference = DecoderLM(**tiny_lm_kwargs, tie_embeddings=True)
    torch.testing.assert_close(model.rotary.inv_freq, reference.rotary.inv_freq)


def test_fsdp_policies_without_a_mesh_are_an_error(tiny_lm_kwargs):
    with pytest.raises(ValueError, match="need a device mesh"):
        parallelize(DecoderLM(**tiny_lm_kwargs), None, cpu_offload=True)
    with pytest.raises(ValueError, match="unknown dtype"):
        to_dtype("bf17")


def test_tensor_parallel_degree_must_divide_heads(tiny_lm_kwargs):
    model = DecoderLM(**{**tiny_lm_kwargs, "n_heads": 6, "n_kv_heads": 3, "dim": 48, "hidden_dim": 96})
    with pytest.raises(ValueError, match=r"n_heads=6 is not divisible .* 4.*n_kv_heads=3"):
        check_tp_compatible(model, 4)
    check_tp_compatible(model, 3)  # 6 heads, 3 kv heads, MLP 96, vocab 96: all divisible
    moe = DecoderLM(**{**tiny_lm_kwargs, "n_experts": 4})
    with pytest.raises(ValueError, match="MoE"):
        check_tp_compatible(moe, 2)


def test_grad_norm_and_clipping_match_torch(tiny_lm_kwargs):
    model = DecoderLM(**tiny_lm_kwargs)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, tiny_lm_kwargs["vocab_size"], (2, 16))
    _grads(model, ids)
    _grads(twin, ids)
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    norm = clip_grad_norm_(model.parameters(), 0.1)
    torch.testing.assert_close(norm, expected)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(grad_norm(model.parameters()), torch.tensor(0.1), atol=1e-5, rtol=0)


def test_optimizer_state_by_name_converts_to_torch_indices():
    a, b, c = (torch.nn.Parameter(torch.randn(2)) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [a, b]}, {"params": [c], "weight_decay": 0.0}])
    for p in (a, b, c):
        p.grad = torch.ones(2)
    opt.step()
    native = opt.state_dict()
    by_name = {"state": {n: native["state"][i] for i, n in enumerate("abc")},
               "param_groups": [{**g, "params": ["abc"[i] for i in g["params"]]}
                                for g in native["param_groups"]]}
    converted = optimizer_state_to_torch(by_name)
    assert converted["param_groups"] == native["param_groups"]
    fresh = torch.optim.AdamW([{"params": [a, b]}, {"params": [c], "weight_decay": 0.0}])
    fresh.load_state_dict(converted)
    torch.testing.assert_close(fresh.state[c]["exp_avg"], opt.state[c]["exp_avg"])


def test_model_class_path_skips_fsdp_classes(tiny_lm_kwargs):
    model = DecoderLM(**tiny_lm_kwargs)
    fsdp_cls = type("FSDPDecoderLM", (DecoderLM,), {"__module__": "torch.distributed.fsdp._x"})
    model.__class__ = fsdp_cls
    assert model_class_path(model) == "mmllm.models.decoder_lm.DecoderLM"


@pytest.mark.parametrize("env,argv,expected", [
    ({}, [], []),  # plain run: Hydra's timestamp directory
    ({"TORCHELASTIC_RUN_ID": "abc", "RANK": "0"}, [],
     ["hydra.run.dir='${paths.log_dir}/${task_name}/runs/torchrun-abc'"]),
    ({"TORCHELASTIC_RUN_ID": "abc", "RANK": "1"}, [],
     ["hydra.run.dir='${paths.log_dir}/${task_name}/runs/torchrun-abc'",
      "hydra.output_subdir=null", "hydra.job.name=train_rank1"]),
    ({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, [],
     ["hydra.run.dir='${paths.log_dir}/${task_name}/runs/slurm-77-0'",
      "hydra.output_subdir=null", "hydra.job.name=train_rank3"]),
    ({"MMLLM_RUN_ID": "exp1", "TORCHELASTIC_RUN_ID": "abc", "RANK": "2"}, ["hydra.run.dir=/x"],
     ["hydra.output_subdir=null", "hydra.job.name=train_rank2"]),  # explicit dir wins
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, [], []),  # spawned by Lightning: it passes the dir
])
def test_rank_overrides_give_all_ranks_one_run_dir(env, argv, expected):
    assert rank_overrides(argv, env) == expected


def test_run_id_prefers_the_explicit_variable():
    assert run_id({"MMLLM_RUN_ID": "x", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0",
                   "SLURM_NTASKS": "2"}) == "x"
    assert run_id({"TORCHELASTIC_RUN_ID": "none", "RANK": "0"}) is None


def check_optimizer_config_trains(name: str, device: str, tiny_lm_kwargs: dict) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mmllm.config import CONF_DIR
    from mmllm.modules import CausalLMModule

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"module/optimizer={name}"])
    assert cfg.module.optimizer._target_.startswith("bitsandbytes.optim.")
    module = CausalLMModule(model=DecoderLM(**tiny_lm_kwargs).to(device),
                            optimizer=instantiate(cfg.module.optimizer, lr=3e-3, min_8bit_size=0))
    opt = module.configure_optimizers()
    ids = torch.randint(0, tiny_lm_kwargs["vocab_size"], (4, 16), device=device)
    losses = []
    for _ in range(8):
        loss = module.forward_loss({"input_ids": ids, "labels": ids})[0]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.5
    state = opt.state[module.model.layers[0].attn.q_proj.weight]
    assert state["state1"].dtype == torch.uint8  # the first moment is stored in 8 bits


def test_adamw8bit_config_trains_on_cpu(tiny_lm_kwargs):
    check_optimizer_config_trains("adamw8bit", "cpu", tiny_lm_kwargs)


@pytest.mark.gpu
def test_paged_adamw8bit_config_trains_on_cuda(tiny_lm_kwargs):
    check_optimizer_config_trains("paged_adamw8bit", "cuda", tiny_lm_kwargs)


def test_data_parallel_rank_follows_the_strategy_sampler_kwargs():
    from types import SimpleNamespace

    from mmllm.distributed import data_parallel_rank

    # FSDP2 + TP (dp=2 x tp=2): global rank 3 is data-parallel rank 1 of 2.
    mesh_strategy = SimpleNamespace(distributed_sampler_kwargs={"rank": 1, "num_replicas": 2})
    assert data_parallel_rank(SimpleNamespace(strategy=mesh_strategy, global_rank=3,
                                              world_size=4)) == (1, 2)
    single = SimpleNamespace(strategy=SimpleNamespace(), global_rank=0, world_size=1)
    assert data_parallel_rank(single) == (0, 1)
    assert data_parallel_rank(None) == (0, 1)
