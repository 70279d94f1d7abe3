"""Lightning's ModelParallelStrategy with a data-parallel size that fills the world.

Lightning's ``data_parallel_size="auto"`` means "the number of nodes" (and ``"auto"`` TP means
"all devices of a node"), which only fits 2-D runs with TP over a whole node. Here ``"auto"``
data parallelism is ``world_size // tensor_parallel_size``, so ``strategy=fsdp2`` (TP 1) shards
over every device of every node and ``strategy=fsdp2_tp strategy.tensor_parallel_size=8`` puts the rest in FSDP.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy as _LightningModelParallel


class ModelParallelStrategy(_LightningModelParallel):
    """FSDP2 x tensor parallel over a 2-D mesh ("data_parallel", "tensor_parallel").

    Args:
        data_parallel_size: FSDP degree; "auto" = world size / tensor_parallel_size.
        tensor_parallel_size: TP degree; "auto" = the devices of one node.
        save_distributed_checkpoint: save one shard per rank (a DCP directory) instead of
            gathering a full checkpoint on rank 0.
        process_group_backend: "nccl" / "gloo"; None picks by device.
        timeout: collective timeout.
    """

    def __init__(self, *, data_parallel_size: int | Literal["auto"] = "auto",
                 tensor_parallel_size: int | Literal["auto"] = 1,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size=data_parallel_size,
                         tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        # Resolve "auto" before Lightning does (its "auto" DP is the node count).
        world = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = self.num_processes
        if self._data_parallel_size == "auto":
            tp = int(self._tensor_parallel_size)
            if world % tp:
                raise ValueError(f"tensor_parallel_size={tp} does not divide the world size {world} "
                                 f"({self.num_nodes} nodes x {self.num_processes} devices)")
            self._data_parallel_size = world // tp
        super().setup_environment()

    def model_to_device(self) -> None:
        # Lightning moves the whole model to the GPU after configure_model. With FSDP2's
        # CPUOffloadPolicy the sharded parameters must stay on the host (FSDP copies them to the
        # GPU for compute), so only buffers (RoPE tables) move then.
        parallelism = getattr(self.lightning_module, "parallelism", None) or {}
        if not parallelism.get("cpu_offload"):
            super().model_to_device()
            return
        for module in self.model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    module._buffers[name] = buf.to(self.root_device)


def data_parallel_rank(trainer) -> tuple[int, int]:
    """``(rank, size)`` of this process among the ranks that read different batches.

    Tensor-parallel ranks of one group must read the same batch, so data is sharded over the
    data-parallel dim of the device mesh, not over the global rank. Every Lightning strategy
    that shards data says how in ``distributed_sampler_kwargs`` (DDP: the global rank and world;
    ModelParallelStrategy: the "data_parallel" mesh dim); single-device strategies have none.

    Args:
        trainer: a Lightning Trainer, or None (no trainer: one rank).

    Returns:
        ``(data_parallel_rank, data_parallel_size)``.
    """
    if trainer is None:
        return 0, 1
    kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
    if kwargs:
        return int(kwargs["rank"]), int(kwargs["num_replicas"])
    return trainer.global_rank, trainer.world_size
