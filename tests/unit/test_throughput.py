"""ThroughputMonitor: the FLOP formula by hand, the peak table, and the logged metrics."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmllm.callbacks import ThroughputMonitor, flops_per_token, peak_tflops
from mmllm.callbacks.throughput import DecoderShape, matmul_params
from mmllm.models import DecoderLM
from mmllm.modules import CausalLMModule

SHAPE = dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96)


def test_flops_per_token_by_hand():
    model = DecoderLM(**SHAPE, max_seq_len=64)
    shape = DecoderShape.from_model(model)
    # per layer: q 64*64 + k,v 2*64*32 + o 64*64 = 12288; SwiGLU 3*64*96 = 18432
    # 2 layers -> 61440; LM head 64*100 = 6400 -> N = 67840
    assert matmul_params(shape) == 67840
    # 6N = 407040; attention 12 * L * T * (H*hd) = 12 * 2 * 32 * 64 = 49152
    assert flops_per_token(shape, 32) == 456192
    # N is exactly the weights of the model's Linear layers (embedding lookup excluded).
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_params(shape) == linears


def test_moe_counts_active_experts_and_router():
    shape = DecoderShape(n_layers=1, dim=8, n_heads=2, n_kv_heads=2, head_dim=4, hidden_dim=16,
                         vocab_size=10, n_experts=4, top_k=2)
    # attn 4*8*8 = 256; experts 2 active * 3*8*16 = 768; router 8*4 = 32; head 80
    assert matmul_params(shape) == 256 + 768 + 32 + 80


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_tflops_from_device_name(name, peak):
    assert peak_tflops(name) == peak


def test_compute_turns_a_window_into_rates():
    mon = ThroughputMonitor(peak_tflops=2.0)
    mon._shape = DecoderShape.from_model(DecoderLM(**SHAPE))
    mon._last_seq_len = 32
    m = mon.compute(tokens=1000, seconds=2.0, batches=4, world_size=2, device=torch.device("cpu"))
    assert m["tokens_per_sec"] == 500 and m["tokens_per_sec_per_device"] == 250
    assert m["step_time"] == 0.5
    assert m["tflops_per_device"] == pytest.approx(456192 * 250 / 1e12)
    assert m["mfu"] == pytest.approx(m["tflops_per_device"] / 2.0)
    assert m["peak_mem_gb"] > 0.01  # this process's peak RSS


def test_monitor_logs_every_n_steps_during_training(tmp_path):
    data = [{"input_ids": torch.randint(0, 100, (16,)), "labels": torch.randint(0, 100, (16,))}
            for _ in range(12)]
    module = CausalLMModule(model=DecoderLM(**SHAPE), optimizer=partial(torch.optim.AdamW, lr=1e-3))
    mon = ThroughputMonitor(log_every_n_steps=3, peak_tflops=1.0)
    logged = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("perf/")})

    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, logger=False, callbacks=[mon, Spy()],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(data, batch_size=2))
    assert [bool(m) for m in logged] == [False, False, True, True, True, True]
    m = mon.metrics
    # A batch is 2 x 16 tokens: the rate and the step time describe the same window.
    assert m["tokens_per_sec"] == pytest.approx(32 / m["step_time"], rel=1e-6)
    assert m["mfu"] == pytest.approx(m["tflops_per_device"] / 1.0)
    assert 0 < m["mfu"] < 1


def test_monitor_rejects_a_zero_interval():
    with pytest.raises(ValueError, match="log_every_n_steps"):
        ThroughputMonitor(log_every_n_steps=0)
