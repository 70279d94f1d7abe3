"""Lightning callbacks of the kit (throughput/MFU, ...)."""

from mmllm.callbacks.throughput import ThroughputMonitor, flops_per_token, peak_tflops

__all__ = ["ThroughputMonitor", "flops_per_token", "peak_tflops"]
