"""Lightning callbacks of the kit (crash-safe checkpoints, throughput/MFU, ...)."""

from mmllm.callbacks.checkpoint import RunCheckpoint
from mmllm.callbacks.throughput import ThroughputMonitor, flops_per_token, peak_tflops

__all__ = ["RunCheckpoint", "ThroughputMonitor", "flops_per_token", "peak_tflops"]
