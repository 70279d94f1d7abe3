"""``parallelize()``: FSDP2 + tensor parallel + activation checkpointing + compile, from outside.

The order follows torchtitan: tensor parallel (needs the plain modules) -> activation
checkpointing (wraps the TP'd blocks) -> ``torch.compile`` per block -> FSDP2 ``fully_shard`` per
block and then the root -> materialisation of a meta-device model (``to_empty`` +
``init_weights``). The model code in ``mmllm.nn`` never sees any of it.

Used from ``CausalLMModule.configure_model`` under Lightning's ``ModelParallelStrategy``, whose
2-D device mesh has the dims ``("data_parallel", "tensor_parallel")``.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from mmllm.config import to_dtype
from mmllm.distributed.activation_checkpoint import apply_activation_checkpointing
from mmllm.distributed.tensor_parallel import apply_tensor_parallel, decoder_of

log = logging.getLogger(__name__)


def submesh(mesh: DeviceMesh | None, name: str) -> DeviceMesh | None:
    """The 1-D sub-mesh called ``name`` of ``mesh`` (a 1-D mesh without names is data parallel)."""
    if mesh is None:
        return None
    names = mesh.mesh_dim_names or ()
    if name in names:
        return mesh[name]
    if mesh.ndim == 1 and not names and name == "data_parallel":
        return mesh
    return None


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def model_class_path(model: nn.Module) -> str:
    """``module.Class`` of ``model``, skipping the classes FSDP2 creates (``FSDPDecoderLM``)."""
    cls = next(c for c in type(model).__mro__ if not c.__module__.startswith("torch.distributed"))
    return f"{cls.__module__}.{cls.__qualname__}"


def init_device(mesh: DeviceMesh | None, *, cpu_offload: bool) -> torch.device:
    """Where a meta model is materialised: the host when offloading, else the mesh's device."""
    if cpu_offload or mesh is None or mesh.device_type == "cpu":
        return torch.device("cpu")
    handle = getattr(torch, mesh.device_type)
    return torch.device(mesh.device_type, handle.current_device())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocates a (sharded) meta-device model on ``device`` and initialises it.

    ``to_empty`` allocates each rank's shards only; ``init_weights`` (DecoderLM) fills them;
    modules without it fall back to their leaves' ``reset_parameters``. DTensor random ops draw
    each shard of the global tensor on CUDA; shards on the host (CPU meshes, CPU offload) come
    from the local generator, so it is seeded per rank for independent shards, and replicated
    placements are then broadcast so that replicas agree (:func:`sync_replicas`).

    Returns:
        ``model``.
    """
    model.to_empty(device=device)
    host = any(t.device.type == "cpu" for t in _local_tensors(model))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if host and distributed:
        saved = torch.get_rng_state()
        torch.default_generator.manual_seed(torch.initial_seed() + dist.get_rank())  # CPU only
    if hasattr(model, "init_weights"):
        model.init_weights()
    else:
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    if host and distributed:
        torch.set_rng_state(saved)
        sync_replicas(model)
    return model


def _local_tensors(model: nn.Module) -> list[torch.Tensor]:
    return [t.to_local() if isinstance(t, DTensor) else t for t in (*model.parameters(), *model.buffers())]


@torch.no_grad()
def sync_replicas(model: nn.Module) -> None:
    """Makes replicated copies of parameters identical after a per-rank random init.

    Each Replicate mesh dim of a DTensor parameter takes the values of the dim's first rank;
    parameters left as plain tensors take global rank 0's. Buffers are deterministic (RoPE tables).
    """
    for p in {id(p): p for p in model.parameters()}.values():
        if not isinstance(p, DTensor):
            _broadcast(p.data, src=0, group=None)
            continue
        mesh, local = p.device_mesh, p.to_local()
        for dim, placement in enumerate(p.placements):
            if placement.is_replicate() and mesh.size(dim) > 1:
                group = mesh.get_group(dim)
                _broadcast(local, src=dist.get_global_rank(group, 0), group=group)


def _broadcast(t: torch.Tensor, *, src: int, group) -> None:
    # NCCL cannot send host tensors (CPU-offloaded shards): go through the GPU.
    if t.device.type == "cpu" and dist.get_backend(group) == "nccl":
        on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.broadcast(on_device, src=src, group=group)
        t.copy_(on_device)
    else:
        dist.broadcast(t, src=src, group=group)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads an ordinary (unsharded) state dict into a parallelised model: each rank keeps its shards.

    Args:
        model: the model after :func:`parallelize` (DTensor parameters).
        state_dict: full tensors with the model's parameter names, identical on every rank.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # set_model_state_dict replaces the dict's values by shards: keep the caller's dict intact.
    set_model_state_dict(model, dict(state_dict), options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def sync_module_states(model: nn.Module, src: int = 0) -> None:
    """Broadcasts parameters and buffers from rank ``src`` so every rank shards the same model.

    FSDP2 slices each rank's local copy without communication; ranks whose RNG drifted (e.g.
    rank 0 ran ``prepare_data``) would otherwise train a patchwork of different initialisations.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
        dist.broadcast(t.data, src=src)


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, reshard_after_forward: bool = True,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = torch.float32,
               cpu_offload: bool = False) -> nn.Module:
    """FSDP2 ``fully_shard`` on every block of the decoder, then on the root.

    Args:
        model: the model, a DecoderLM or a wrapper of one (:func:`decoder_of`); blocks may
            already be TP'd / checkpoint-wrapped / compiled. The root unit holds everything
            outside the blocks: embeddings, final norm, LM head and a wrapper's own modules.
        dp_mesh: the data-parallel mesh (1-D).
        reshard_after_forward: free each block's gathered parameters after its forward (ZeRO-3;
            False keeps them until backward: ZeRO-2-like, more memory, one all-gather less). The
            last block never reshards: its backward starts right after the forward.
        param_dtype: compute/all-gather dtype (bf16 for mixed precision); None keeps fp32.
        reduce_dtype: gradient reduce-scatter dtype (fp32 keeps reductions exact).
        cpu_offload: keep sharded parameters, gradients and optimizer states on the host.

    Returns:
        ``model``, now an ``FSDPModule``.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype,
                              reduce_dtype=reduce_dtype if param_dtype is not None else None)
    # Pinned memory makes H2D copies async and makes FSDP move shards back to the host if a
    # later `.to(cuda)` (Lightning's model_to_device) touches them; it needs CUDA.
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    blocks = list(decoder_of(model).layers)
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    # The root holds embeddings, final norm and head; FSDP keeps them gathered after forward.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, offload_policy=offload)
    return model


def apply_compile(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = False) -> nn.Module:
    """``torch.compile`` each block in place (``Module.compile`` keeps parameter names unchanged).

    Per-block compilation compiles one block once (all blocks share the code) and leaves FSDP's
    hooks between blocks, where its communication overlaps with compute.
    """
    for block in decoder_of(model).layers:
        block.compile(backend=backend, fullgraph=fullgraph)
    return model


def parallelize(model: nn.Module, device_mesh: DeviceMesh | None = None, *, compile: bool = False,
                compile_backend: str = "inductor", fsdp: bool = True,
                reshard_after_forward: bool = True, sequence_parallel: bool = False,
                activation_checkpointing: str = "none", activation_checkpointing_every: int = 1,
                cpu_offload: bool = False, param_dtype: str | torch.dtype | None = None,
                reduce_dtype: str | torch.dtype | None = "float32") -> nn.Module:
    """Applies tensor parallel, activation checkpointing, compile and FSDP2 to a DecoderLM.

    Args:
        model: a model with a ``layers`` ModuleList (DecoderLM), or a wrapper with a
            ``decoder`` that has them (reward model, policy + value head, vision-language model:
            see :func:`~mmllm.distributed.tensor_parallel.decoder_of`; an optional
            ``parallel_plan(sequence_parallel=...)`` adds TP entries for the wrapper's modules),
            materialised or on the meta device (then it is materialised after sharding:
            ``to_empty`` + ``init_weights``).
        device_mesh: Lightning's ``ModelParallelStrategy`` mesh (dims "data_parallel",
            "tensor_parallel"), a 1-D data-parallel mesh, or None (one device: only activation
            checkpointing / compile apply).
        compile: ``torch.compile`` each block.
        compile_backend: the ``torch.compile`` backend ("inductor"; "aot_eager" to debug).
        fsdp: shard with FSDP2 over the data-parallel dim (also when it has size 1, which makes
            parameters DTensors so distributed checkpoints reshard on load).
        reshard_after_forward: see :func:`apply_fsdp`.
        sequence_parallel: with TP, shard norms / residuals along the sequence.
        activation_checkpointing: "none", "full" or "selective" (per block).
        activation_checkpointing_every: checkpoint every n-th block.
        cpu_offload: FSDP2 ``CPUOffloadPolicy`` (parameters, gradients, optimizer state on host).
        param_dtype: FSDP2 compute dtype ("bfloat16" for bf16 mixed precision; None: fp32).
        reduce_dtype: FSDP2 gradient reduction dtype (default fp32).

    Returns:
        The parallelised model (same object, modified in place).
    """
    dp_mesh = submesh(device_mesh, "data_parallel")
    tp_mesh = submesh(device_mesh, "tensor_parallel")
    if device_mesh is not None and dp_mesh is None and tp_mesh is None:
        raise ValueError(f"device mesh dims {device_mesh.mesh_dim_names} have neither "
                         "'data_parallel' nor 'tensor_parallel'")
    if (cpu_offload or param_dtype is not None) and not (fsdp and dp_mesh is not None):
        raise ValueError("cpu_offload and param_dtype are FSDP2 policies: they need a device mesh "
                         "(strategy=fsdp2 or fsdp2_tp) and fsdp=true")
    meta = has_meta_tensors(model)
    if not meta:
        sync_module_states(model)
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh, sequence_parallel=sequence_parallel)
    elif sequence_parallel:
        log.warning("sequence_parallel ignored: tensor-parallel size is 1")
    apply_activation_checkpointing(model, activation_checkpointing, every=activation_checkpointing_every)
    if compile:
        apply_compile(model, backend=compile_backend)
    if fsdp and dp_mesh is not None:
        apply_fsdp(model, dp_mesh, reshard_after_forward=reshard_after_forward,
                   param_dtype=to_dtype(param_dtype), reduce_dtype=to_dtype(reduce_dtype),
                   cpu_offload=cpu_offload)
    if meta:
        materialize(model, init_device(device_mesh, cpu_offload=cpu_offload))
    return model
