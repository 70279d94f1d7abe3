"""Tensor-parallel (Megatron-style) plan for :class:`mmllm.models.DecoderLM`.

Attention and MLP are split the Megatron way: q/k/v and gate/up projections are column-parallel
(each rank owns whole heads / a slice of the MLP width), o/down are row-parallel (their partial
outputs are summed across the TP group). ``mmllm.nn.Attention`` reads its head count from the
weight shapes, so a rank simply sees ``n_heads / tp`` heads and needs no TP-aware code.

With ``sequence_parallel`` the residual stream between the matmuls (norms, residual adds) is
sharded along the sequence (Korthikanti et al. 2022): the all-reduce after o/down becomes a
reduce-scatter, and an all-gather brings the sequence back before q/k/v and gate/up.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder whose blocks are parallelised: ``model`` itself when it has ``layers``
    (DecoderLM), else its ``decoder`` attribute (reward model, policy + value, VLM).

    Raises:
        ValueError: neither ``model.layers`` nor ``model.decoder.layers`` exists.
    """
    if hasattr(model, "layers"):
        return model
    inner = getattr(model, "decoder", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    raise ValueError(f"{type(model).__name__} has neither `layers` (a decoder) nor a `decoder` "
                     "with `layers`: parallelize() cannot find the blocks to shard")


def check_tp_compatible(model: nn.Module, tp: int) -> None:
    """Raises a ValueError when ``model`` cannot be split ``tp`` ways.

    Args:
        model: a DecoderLM (reads n_heads, n_kv_heads, hidden_dim, vocab_size, ...).
        tp: tensor-parallel degree.
    """
    problems = []
    for attr in ("n_heads", "n_kv_heads", "hidden_dim"):
        value = getattr(model, attr, None)
        if value is not None and value % tp:
            problems.append(f"{attr}={value} is not divisible by the tensor-parallel degree {tp}")
    if not getattr(model, "tie_embeddings", True) and model.vocab_size % tp:
        problems.append(f"vocab_size={model.vocab_size} is not divisible by tensor-parallel degree "
                        f"{tp} (pad the vocabulary to a multiple of {tp})")
    if getattr(model, "n_experts", 0):
        problems.append("tensor parallelism of MoE blocks is not supported (use FSDP2 only: "
                        "tensor_parallel_size=1)")
    if getattr(model, "alibi", None) is not None:
        problems.append("ALiBi biases cover all heads and cannot follow sharded heads: use "
                        "position=rope with tensor parallelism")
    if problems:
        raise ValueError("cannot apply tensor parallelism: " + "; ".join(problems))


def block_plan(block: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """The TP plan of one DecoderBlock (keys are relative to the block).

    Args:
        block: a DecoderBlock (attn_norm, attn.{q,k,v,o}_proj, mlp_norm, mlp.{gate,up,down}_proj).
        sequence_parallel: shard norms and residuals along the sequence.

    Returns:
        ``{submodule name: ParallelStyle}``.
    """
    out = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(output_layouts=out),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=out),
    }
    if hasattr(block.mlp, "gate_proj"):
        plan["mlp.gate_proj"] = ColwiseParallel()
    if sequence_parallel:
        gather = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                      use_local_output=True)
        plan.update({"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                     "attn": PrepareModuleInput(**gather), "mlp": PrepareModuleInput(**gather)})
    return plan


def root_plan(model: nn.Module, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
    """TP plan of the embedding, final norm and LM head.

    Tied embeddings stay replicated over TP (sharding them twice would split one Parameter into
    two DTensors); untied ones are split over the vocabulary (row-wise embedding, column-wise head
    whose logits are all-gathered, so the loss code stays unchanged).

    Returns:
        ``{submodule name: ParallelStyle}`` relative to the model.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, ParallelStyle] = {}
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    if model.tie_embeddings:
        if sequence_parallel:
            plan["lm_head"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                                 desired_input_layouts=(Replicate(),),
                                                 use_local_output=True)
        return plan
    plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    plan["lm_head"] = ColwiseParallel(input_layouts=seq, output_layouts=Replicate())
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *,
                          sequence_parallel: bool = False) -> nn.Module:
    """Shards ``model`` (a DecoderLM, or a wrapper of one) in place over ``tp_mesh``.

    A wrapper (see :func:`decoder_of`) has its decoder sharded with the plan below; a
    ``model.parallel_plan(sequence_parallel=...)`` method returns the plan entries of the
    wrapper's own modules (relative to the wrapper); modules it does not name stay replicated.

    Args:
        model: the model, on the meta device or materialised (then every rank must hold the same
            values, e.g. built after the same seed: each rank keeps its slice).
        tp_mesh: 1-D mesh of the tensor-parallel group.
        sequence_parallel: also shard norms / residual stream along the sequence (needs the
            sequence length divisible by the TP degree).

    Returns:
        ``model`` (modified in place).
    """
    decoder = decoder_of(model)
    check_tp_compatible(decoder, tp_mesh.size())
    for block in decoder.layers:
        parallelize_module(block, tp_mesh, block_plan(block, sequence_parallel=sequence_parallel))
    if sequence_parallel:
        # Embeddings come out replicated; each rank keeps its slice of the sequence (no comm).
        parallelize_module(decoder.layers[0], tp_mesh, PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True))
    plan = root_plan(decoder, sequence_parallel=sequence_parallel)
    if plan:
        parallelize_module(decoder, tp_mesh, plan)
    extra = model.parallel_plan(sequence_parallel=sequence_parallel) \
        if model is not decoder and hasattr(model, "parallel_plan") else {}
    if extra:
        parallelize_module(model, tp_mesh, extra)
    return model
