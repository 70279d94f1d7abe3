"""`mmllm plan`: parameter counts, Chinchilla tokens, wall time against the LLaMA paper, and the
memory estimate against torch's MemTracker on a measured training step."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mmllm.config import compose_config
from mmllm.errors import UserError
from mmllm.models import DecoderLM
from mmllm.plan import chinchilla_tokens, make_plan, plan_from_config


def test_chinchilla_tokens_follow_table3():
    assert chinchilla_tokens(10e9) == pytest.approx(205.1e9)
    assert chinchilla_tokens(67e9) == pytest.approx(1.5e12)
    assert 1.4e12 <= chinchilla_tokens(65.2e9) <= 1.5e12  # the seed: 65B -> 1.4T
    assert chinchilla_tokens(1e9) / 1e9 == pytest.approx(20.2)


def test_llama_65b_plan_matches_the_paper():
    cfg = compose_config("plan", ["model/lm=llama_65b", "cluster.gpu=a100-80gb",
                                  "cluster.nodes=256", "tokens=1.4e12", "mfu=0.494"])
    plan = plan_from_config(cfg)
    assert plan.params == pytest.approx(65.2e9, rel=0.01)  # LLaMA Table 2: 65.2B
    # LLaMA: 380 tokens/s/GPU on 2048 A100-80GB -> 1.4T tokens in about 21 days.
    assert plan.days == pytest.approx(21.0, rel=0.05)
    mem = plan.memory
    assert mem["DDP (replica)"]["total"] > 80 * 2**30  # a 65B replica cannot fit
    assert mem["FSDP2 + TP8 + AC"]["total"] < mem["FSDP2 + TP8"]["total"] < mem["FSDP2"]["total"]
    assert mem["FSDP2 + TP8 + AC + offload"]["host"] > 0
    assert mem["FSDP2 + TP8 + AC + 8-bit AdamW"]["state"] == pytest.approx(
        mem["FSDP2 + TP8 + AC"]["state"] * 10 / 16)


def test_memory_estimate_matches_a_measured_cpu_step():
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    model = DecoderLM(vocab_size=2048, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                      hidden_dim=352, max_seq_len=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 2048, (8, 128))

    def step():
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()  # optimizer state exists
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = {str(getattr(k, "value", k)): v for k, v in
            next(iter(tracker.get_tracker_snapshot("peak").values())).items()}
    plan = make_plan(model, gpu="h100", gpus_per_node=1, tp=1, micro_batch=8, seq_len=128,
                     precision="32-true", flash_attention=False)  # CPU SDPA: the math kernel
    est = plan.memory["DDP (replica)"]
    measured_state = peak["Parameter"] + peak["Gradient"] + peak["Optstate"]
    assert est["state"] == pytest.approx(measured_state, rel=0.02)
    print(f"estimated {est['total'] / 2**20:.1f} MiB, measured {peak['Total'] / 2**20:.1f} MiB "
          f"({peak})")
    assert est["total"] == pytest.approx(peak["Total"], rel=0.2)


def test_plan_command_and_errors(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "mmllm", "plan", *a],
                                    capture_output=True, text=True, cwd=tmp_path)
    ok = run("model/lm=llama_7b", f"output={tmp_path}/plan.json")
    assert ok.returncode == 0, ok.stderr
    assert "parameters:" in ok.stdout and "FSDP2 + TP8 + AC" in ok.stdout
    assert (tmp_path / "plan.json").exists()
    bad = run("cluster.gpu=tpu9000")
    assert bad.returncode != 0 and "unknown gpu 'tpu9000'" in bad.stderr
    with torch.device("meta"):
        model = DecoderLM(vocab_size=256, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    with pytest.raises(UserError, match="tp=3 must divide"):
        make_plan(model, tp=3)
    with pytest.raises(UserError, match="mfu=1.5"):
        make_plan(model, mfu=1.5)


def test_memory_estimate_matches_the_measured_1b_gpu_run():
    """benchmarks/pretrain_throughput.py --device cuda measured, on one H100 (README's benchmark
    table): TinyLlama-1.1B shapes, seq 2048, batch 8, bf16 autocast, AdamW: peak 56.5 GB, with full
    activation checkpointing 22.2 GB."""
    from mmllm.plan import Strategy, memory_per_gpu
    from mmllm.callbacks.throughput import DecoderShape

    with torch.device("meta"):
        model = DecoderLM(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                          hidden_dim=5632, max_seq_len=2048)
    shape, params = DecoderShape.from_model(model), sum(p.numel() for p in model.parameters())
    kw = dict(gpus=1, micro_batch=8, seq_len=2048, precision="bf16-mixed")
    plain = memory_per_gpu(shape, params, Strategy("single", fsdp=False), **kw)["total"] / 1e9
    ac = memory_per_gpu(shape, params, Strategy("ac", fsdp=False, checkpointing=True), **kw)["total"] / 1e9
    print(f"1.1B estimate: {plain:.1f} GB (measured 56.5), with AC {ac:.1f} GB (measured 22.2)")
    assert plain == pytest.approx(56.5, rel=0.25) and ac == pytest.approx(22.2, rel=0.25)
