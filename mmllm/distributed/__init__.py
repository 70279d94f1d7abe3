"""Parallelism applied from outside the single-device model code.

``parallelize`` (FSDP2 + tensor parallel + activation checkpointing + compile + meta-device
materialisation) is called from ``CausalLMModule.configure_model`` under Lightning's
``ModelParallelStrategy``; the rest are helpers for gradients, distributed checkpoints, launchers
and pipeline parallelism.
"""

from mmllm.distributed.activation_checkpoint import apply_activation_checkpointing, checkpoint_block
from mmllm.distributed.checkpoint import (
    consolidate_checkpoint,
    is_distributed_checkpoint,
    load_distributed_state,
    model_state_dict,
)
from mmllm.distributed.grad import clip_grad_norm_, grad_norm
from mmllm.distributed.launch import rank_overrides, run_id
from mmllm.distributed.parallelize import (
    apply_compile,
    apply_fsdp,
    load_full_state_dict,
    materialize,
    parallelize,
    sync_module_states,
)
from mmllm.distributed.pipeline import DecoderStage, PipelineRunner, stage_layers
from mmllm.distributed.strategy import ModelParallelStrategy, data_parallel_rank
from mmllm.distributed.tensor_parallel import apply_tensor_parallel, check_tp_compatible

__all__ = [
    "DecoderStage",
    "ModelParallelStrategy",
    "PipelineRunner",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_fsdp",
    "apply_tensor_parallel",
    "check_tp_compatible",
    "checkpoint_block",
    "clip_grad_norm_",
    "consolidate_checkpoint",
    "data_parallel_rank",
    "grad_norm",
    "is_distributed_checkpoint",
    "load_distributed_state",
    "load_full_state_dict",
    "materialize",
    "model_state_dict",
    "parallelize",
    "rank_overrides",
    "run_id",
    "stage_layers",
    "sync_module_states",
]
