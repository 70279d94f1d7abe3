"""``mmllm plan``: what a training run of a model on a cluster needs, before it is launched.

For a model preset (``model/lm=llama_65b``) or sizes (``model.lm.dim=...``) and a cluster
(``cluster.gpu=h100 cluster.gpus_per_node=8 cluster.nodes=4``) it prints:

* the parameter count (the model built on the meta device: exact, no memory used);
* the compute-optimal token count of Hoffmann et al. 2022 (Chinchilla, Table 3, interpolated
  log-log: 10 B -> 205 B tokens, 67 B -> 1.5 T; a 65 B model -> ~1.45 T, the 1.4 T LLaMA-65B
  was trained on);
* the memory per GPU of each strategy: FSDP2, + tensor parallel, + activation checkpointing,
  + CPU offload, + an 8-bit optimizer (the model below);
* the FLOPs per token and the wall time to train on that many tokens at a given MFU.

Memory model, per GPU (``P`` parameters, ``N`` GPUs, TP degree ``t``, micro-batch ``b``, sequence
``s``, bytes per activation element ``a``: 2 in bf16-mixed, 4 in fp32):

* weights + gradients + AdamW state: ``(w + g + o) * P / N`` with FSDP2 (fp32 master weights and
  gradients: w = g = 4; AdamW o = 8, 8-bit AdamW o = 2); a DDP replica holds all of ``P``;
* the unsharded working set: FSDP2 all-gathers one block at a time and prefetches the next, so two
  blocks of parameters in the compute dtype (``/ t`` under TP);
* activations kept for the backward pass, per layer and token: the norm inputs and outputs
  (4 d), q, k, v and the attention output (2 q + 2 kv, flash attention keeps no T x T scores),
  and the SwiGLU gate, up, activation and product (4 h): ``a * (4d + 2q + 2kv + 4h) * b * s / t``
  (Korthikanti et al. 2022 count 34 d bytes for a GPT layer with a 4d MLP; same order); without
  flash attention (CPU, the math kernel) also the T x T scores and probabilities of every head;
  with full activation checkpointing only each layer's input (``a * d * b * s``) plus one layer's
  activations during its recomputation;
* logits: ``b * s * V * (a + 4)`` (the fp32 log-softmax of the loss) unless a fused / chunked loss
  is used;
* CPU offload moves weights, gradients and optimizer state to host memory (``host GB`` column).

``tests/unit/test_plan.py`` checks the estimate against torch's MemTracker on a measured CPU step;
the 1.1 B GPU check runs with ``benchmarks/pretrain_throughput.py --device cuda``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mmllm.callbacks.throughput import DecoderShape, matmul_params
from mmllm.config import CONF_DIR
from mmllm.errors import UserError

# Hoffmann et al. 2022, Table 3 (approach 1): parameters -> compute-optimal training tokens.
CHINCHILLA_TABLE3 = ((400e6, 8.0e9), (1e9, 20.2e9), (10e9, 205.1e9), (67e9, 1.5e12),
                     (175e9, 3.7e12), (280e9, 5.9e12), (520e9, 11.0e12), (1e12, 21.2e12),
                     (10e12, 216.2e12))

# name -> (memory GiB, dense bf16 TFLOP/s), from NVIDIA's data sheets (SXM parts).
GPUS = {"h100": (80.0, 989.0), "h200": (141.0, 989.0), "a100-80gb": (80.0, 312.0),
        "a100-40gb": (40.0, 312.0), "l40s": (48.0, 362.0), "b200": (180.0, 2250.0)}

GIB = 2**30


def chinchilla_tokens(params: float) -> float:
    """Compute-optimal training tokens for ``params`` parameters (Chinchilla Table 3, log-log)."""
    pts = CHINCHILLA_TABLE3
    if params <= pts[0][0]:
        return params * pts[0][1] / pts[0][0]
    for (n0, d0), (n1, d1) in zip(pts, pts[1:]):
        if params <= n1 or (n1, d1) == pts[-1]:
            slope = math.log(d1 / d0) / math.log(n1 / n0)
            return d0 * (params / n0) ** slope
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Strategy:
    """One row of the memory table."""

    name: str
    fsdp: bool = True
    tp: int = 1
    checkpointing: bool = False
    offload: bool = False
    optimizer_bytes: float = 8.0  # AdamW: two fp32 moments


def default_strategies(tp: int) -> list[Strategy]:
    return [Strategy("DDP (replica)", fsdp=False),
            Strategy("FSDP2"),
            Strategy(f"FSDP2 + TP{tp}", tp=tp),
            Strategy(f"FSDP2 + TP{tp} + AC", tp=tp, checkpointing=True),
            Strategy(f"FSDP2 + TP{tp} + AC + offload", tp=tp, checkpointing=True, offload=True),
            Strategy(f"FSDP2 + TP{tp} + AC + 8-bit AdamW", tp=tp, checkpointing=True,
                     optimizer_bytes=2.0)]


def activation_bytes_per_token_layer(shape: DecoderShape, elem: int) -> int:
    """Bytes kept for backward per token and layer (module docstring)."""
    d, q, kv = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    h = shape.hidden_dim * (shape.top_k if shape.n_experts else 1)
    mlp = 4 * h if shape.mlp == "swiglu" else 3 * h
    return elem * (4 * d + 2 * q + 2 * kv + mlp)


def memory_per_gpu(shape: DecoderShape, params: int, strategy: Strategy, *, gpus: int,
                   micro_batch: int, seq_len: int, precision: str = "bf16-mixed",
                   fused_loss: bool = False, flash_attention: bool = True) -> dict[str, float]:
    """Estimated peak bytes per GPU by category (and the host bytes of CPU offload)."""
    elem = 4 if precision in ("32", "32-true", "fp32") else 2
    tp, tokens = strategy.tp, micro_batch * seq_len
    state = (4 + 4 + strategy.optimizer_bytes) * params / (gpus if strategy.fsdp else 1)
    block = (params - shape.vocab_size * shape.dim) / max(shape.n_layers, 1)
    working = (2 * block * elem / tp) if strategy.fsdp else 0.0
    if strategy.fsdp and elem == 4:
        working = 0.0  # fp32 compute reads the (sharded) fp32 weights as they are gathered
    per_layer = activation_bytes_per_token_layer(shape, elem) * tokens / tp
    if not flash_attention:  # the math kernel keeps the T x T scores and probabilities per head
        per_layer += 2 * elem * micro_batch * shape.n_heads * seq_len**2 / tp
    if strategy.checkpointing:
        acts = shape.n_layers * elem * shape.dim * tokens / tp + per_layer
    else:
        acts = shape.n_layers * per_layer
    logits = 0.0 if fused_loss else tokens * shape.vocab_size * (elem + 4) / tp
    out = {"state": 0.0 if strategy.offload else state, "working_params": working,
           "activations": acts, "logits": logits}
    out["total"] = sum(out.values())
    out["host"] = state if strategy.offload else 0.0
    return out


@dataclass
class Plan:
    params: int
    chinchilla_tokens: float
    tokens: float
    flops_per_token: float
    gpus: int
    gpu: str
    gpu_memory_gib: float
    mfu: float
    days: float
    memory: dict[str, dict[str, float]]

    def table(self) -> str:
        lines = [f"parameters:           {self.params / 1e9:.3f} B ({self.params:,})",
                 f"chinchilla tokens:    {self.chinchilla_tokens / 1e9:,.0f} B "
                 f"({self.chinchilla_tokens / self.params:.1f} tokens/parameter)",
                 f"training tokens:      {self.tokens / 1e9:,.0f} B",
                 f"FLOPs per token:      {self.flops_per_token:.3e}",
                 f"cluster:              {self.gpus} x {self.gpu} ({self.gpu_memory_gib:.0f} GiB)",
                 f"wall time at MFU {self.mfu:.0%}: {self.days:,.1f} days", "",
                 f"{'memory per GPU (GiB)':<38} {'state':>8} {'params':>8} {'activ.':>8} "
                 f"{'logits':>8} {'total':>8} {'host':>8}  fits"]
        for name, m in self.memory.items():
            fits = "yes" if m["total"] / GIB <= 0.9 * self.gpu_memory_gib else "no"
            lines.append(f"{name:<38} " + " ".join(
                f"{m[k] / GIB:>8.1f}" for k in ("state", "working_params", "activations", "logits",
                                                "total", "host")) + f"  {fits}")
        return "\n".join(lines)


def make_plan(model: torch.nn.Module, *, gpu: str = "h100", gpus_per_node: int = 8, nodes: int = 1,
              tp: int = 8, micro_batch: int = 1, seq_len: int | None = None,
              precision: str = "bf16-mixed", fused_loss: bool = False, flash_attention: bool = True,
              tokens: float | None = None,
              mfu: float = 0.484, gpu_memory_gib: float | None = None,
              peak_tflops: float | None = None) -> Plan:
    """The plan of one model (built on any device, meta included) on one cluster."""
    if gpu not in GPUS and (gpu_memory_gib is None or peak_tflops is None):
        raise UserError(f"unknown gpu {gpu!r}: one of {sorted(GPUS)}",
                        fix="cluster.gpu=h100, or describe yours: cluster.memory_gib=... cluster.peak_tflops=...")
    if not 0 < mfu <= 1:
        raise UserError(f"mfu={mfu}: must be in (0, 1]", fix="mfu=0.4 (a fraction, not a percentage)")
    mem, peak = GPUS.get(gpu, (gpu_memory_gib, peak_tflops))
    mem, peak = gpu_memory_gib or mem, peak_tflops or peak
    n = gpus_per_node * nodes
    if n < 1 or tp < 1 or n % tp or gpus_per_node % tp:
        raise UserError(f"tp={tp} must divide gpus_per_node={gpus_per_node} (and the {n} GPUs)",
                        fix=f"cluster.tp= a divisor of {gpus_per_node}, e.g. cluster.tp={gpus_per_node}")
    shape = DecoderShape.from_model(model)
    params = sum(p.numel() for p in model.parameters())
    seq_len = seq_len or model.max_seq_len
    flops = 6 * matmul_params(shape) + 12 * shape.n_layers * seq_len * shape.n_heads * shape.head_dim
    optimal = chinchilla_tokens(params)
    tokens = float(tokens or optimal)
    days = flops * tokens / (n * peak * 1e12 * mfu) / 86400
    memory = {s.name: memory_per_gpu(shape, params, s, gpus=n, micro_batch=micro_batch,
                                     seq_len=seq_len, precision=precision, fused_loss=fused_loss,
                                     flash_attention=flash_attention)
              for s in default_strategies(tp)}
    return Plan(params=params, chinchilla_tokens=optimal, tokens=tokens, flops_per_token=flops,
                gpus=n, gpu=gpu, gpu_memory_gib=mem, mfu=mfu, days=days, memory=memory)


def plan_from_config(cfg: DictConfig) -> Plan:
    with torch.device("meta"):  # exact sizes, no memory
        model = instantiate(cfg.model.lm)
    c = cfg.cluster
    return make_plan(model, gpu=c.gpu, gpus_per_node=c.gpus_per_node, nodes=c.nodes, tp=c.tp,
                     micro_batch=cfg.micro_batch, seq_len=cfg.seq_len, precision=cfg.precision,
                     fused_loss=cfg.fused_loss, tokens=cfg.tokens, mfu=cfg.mfu,
                     gpu_memory_gib=c.memory_gib, peak_tflops=c.peak_tflops)


@hydra.main(config_path=CONF_DIR, config_name="plan", version_base="1.3")
def main(cfg: DictConfig) -> None:
    plan = plan_from_config(cfg)
    print(plan.table())
    if cfg.output:
        import json
        from pathlib import Path

        Path(cfg.output).write_text(json.dumps(asdict(plan) | {"config": OmegaConf.to_container(
            cfg, resolve=True)}, indent=2))
        print(f"\nwritten: {cfg.output}")


if __name__ == "__main__":
    main()
