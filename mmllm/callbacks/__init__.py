"""Lightning callbacks of the kit (crash-safe checkpoints, throughput/MFU, ...)."""

from mmllm.callbacks.checkpoint import RunCheckpoint
from mmllm.callbacks.progress import StepRichProgressBar, progress_bar_callbacks
from mmllm.callbacks.throughput import ThroughputMonitor, flops_per_token, peak_tflops

__all__ = ["RunCheckpoint", "StepRichProgressBar", "ThroughputMonitor", "flops_per_token", "peak_tflops",
           "progress_bar_callbacks"]
