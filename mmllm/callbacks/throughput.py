"""Training throughput: tokens/s, achieved TFLOP/s, MFU and peak memory, logged every N steps.

FLOPs per trained token (the PaLM / torchtitan convention, Chowdhery et al. 2022, appendix B)::

    6 * N_matmul + 12 * L * T * (n_heads * head_dim)

* ``N_matmul``: weights that take part in a matmul for each token: per layer the q/k/v/o
  projections ``d*(H*hd) + 2*d*(Hkv*hd) + (H*hd)*d``, the MLP ``3*d*h`` (SwiGLU; GELU: ``2*d*h``;
  MoE: ``top_k`` experts + the router ``d*E``), and the LM head ``d*V``. The embedding lookup is
  not a matmul; norms are negligible. Each weight costs 2 FLOPs per token forward and 4 backward.
* attention: per layer and token, ``Q K^T`` and ``A V`` are 2 * 2*T*(H*hd) FLOPs forward, x3 with
  backward = ``12*T*(H*hd)``. Like PaLM, the full T x T score matrix is counted although causal
  masking (and per-document masking of packed sequences) lets flash kernels skip about half.

MFU = achieved FLOP/s per device / the device's peak dense bf16 FLOP/s (:data:`PEAK_BF16_TFLOPS`,
or ``peak_tflops`` when configured; on CPU MFU is logged only when it is configured).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import lightning as L
import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s.
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
                    "H200 NVL": 835.0, "H200": 989.0}


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a device from its name (``torch.cuda.get_device_name()``).

    Returns:
        The peak, or None for devices not in :data:`PEAK_BF16_TFLOPS`.
    """
    name = device_name.replace("PCIE", "PCIe")
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "H100 NVL" before "H100"
        if all(part in name for part in key.split()):
            return PEAK_BF16_TFLOPS[key]
    return None


@dataclass(frozen=True)
class DecoderShape:
    """The shape numbers the FLOP count needs (see the module docstring)."""

    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    vocab_size: int
    mlp: str = "swiglu"
    n_experts: int = 0
    top_k: int = 2

    @classmethod
    def from_model(cls, model) -> DecoderShape:
        """Reads a DecoderLM (also when wrapped by FSDP2, compiled or sharded)."""
        cfg = getattr(model, "config", {}) or {}
        return cls(n_layers=model.n_layers, dim=model.dim, n_heads=model.n_heads,
                   n_kv_heads=model.n_kv_heads, head_dim=model.head_dim, hidden_dim=model.hidden_dim,
                   vocab_size=model.vocab_size, mlp=cfg.get("mlp", "swiglu"),
                   n_experts=model.n_experts, top_k=model.moe_top_k)


def matmul_params(shape: DecoderShape) -> int:
    """Weights used in a matmul per token (active experts only), including the LM head."""
    d, q, kv = shape.dim, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    attn = d * q + 2 * d * kv + q * d
    mlp = (3 if shape.mlp == "swiglu" else 2) * d * shape.hidden_dim
    if shape.n_experts:
        mlp = shape.top_k * mlp + d * shape.n_experts
    return shape.n_layers * (attn + mlp) + d * shape.vocab_size


def flops_per_token(shape: DecoderShape, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token: ``6 N + 12 L T (H hd)``."""
    attention = 12 * shape.n_layers * seq_len * shape.n_heads * shape.head_dim
    return 6.0 * matmul_params(shape) + attention


def peak_memory_gb(device: torch.device, *, reset: bool = True) -> float:
    """Peak allocated CUDA memory since the last reset, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ThroughputMonitor(L.Callback):
    """Logs ``perf/*`` every ``log_every_n_steps`` training batches.

    Metrics: ``tokens_per_sec`` (global), ``tokens_per_sec_per_device``, ``step_time``,
    ``tflops_per_device`` (achieved), ``mfu`` (when the peak is known) and ``peak_mem_gb``
    (CUDA peak allocated per device, or CPU peak RSS of the process). The last values are also kept
    in :attr:`metrics`.

    Args:
        log_every_n_steps: batches per measurement window (the device is synchronised only at the
            window ends, so measuring costs nothing in between).
        peak_tflops: peak TFLOP/s of one device; None: from the device name (A100/H100/H200 bf16).
        seq_len: tokens per sequence for the attention FLOPs; None: from the batch.
    """

    def __init__(self, *, log_every_n_steps: int = 10, peak_tflops: float | None = None,
                 seq_len: int | None = None) -> None:
        super().__init__()
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps, self.peak, self.seq_len = log_every_n_steps, peak_tflops, seq_len
        self.metrics: dict[str, float] = {}
        self._shape: DecoderShape | None = None
        self._t0 = 0.0
        self._tokens = self._batches = 0
        self._last_seq_len = 0

    def _sync(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        self._shape = DecoderShape.from_model(model) if hasattr(model, "n_layers") else None
        if self.peak is None and pl_module.device.type == "cuda":
            self.peak = peak_tflops(torch.cuda.get_device_name(pl_module.device))
        peak_memory_gb(pl_module.device)
        self._t0, self._tokens, self._batches = self._sync(pl_module.device), 0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        ids = batch["input_ids"]
        dp = getattr(pl_module, "data_parallel_size", trainer.world_size)
        self._tokens += ids.numel() * dp  # tensor-parallel ranks share their batch
        self._last_seq_len = ids.shape[-1]
        self._batches += 1
        if self._batches < self.log_every_n_steps:
            return
        now = self._sync(pl_module.device)
        self.metrics = self.compute(self._tokens, now - self._t0, self._batches, trainer.world_size,
                                    pl_module.device)
        for name, value in self.metrics.items():
            pl_module.log(f"perf/{name}", value, on_step=True, on_epoch=False, batch_size=ids.shape[0])
        self._t0, self._tokens, self._batches = self._sync(pl_module.device), 0, 0

    def compute(self, tokens: int, seconds: float, batches: int, world_size: int,
                device: torch.device) -> dict[str, float]:
        """The metrics of one window.

        Args:
            tokens: tokens trained by all ranks in the window.
            seconds: wall time of the window.
            batches: batches in the window.
            world_size: devices sharing the work.
            device: this rank's device (for peak memory).
        """
        tps = tokens / seconds
        out = {"tokens_per_sec": tps, "tokens_per_sec_per_device": tps / world_size,
               "step_time": seconds / batches, "peak_mem_gb": peak_memory_gb(device)}
        if self._shape is not None:
            flops = flops_per_token(self._shape, self.seq_len or self._last_seq_len)
            out["tflops_per_device"] = flops * tps / world_size / 1e12
            if self.peak:
                out["mfu"] = out["tflops_per_device"] / self.peak
        return out
