"""Pipeline parallelism for DecoderLM with ``torch.distributed.pipelining``.

The decoder is split by layers into ``num_stages`` contiguous stages: the first stage also owns
the token embedding, the last one the final norm and LM head. Each rank builds only its stage
(:class:`DecoderStage`, which keeps the parameter names of the full model, so checkpoints of all
stages together form one DecoderLM state dict) and runs a GPipe or 1F1B schedule over
micro-batches; the last stage computes the loss.

Scope: dense RoPE / learned-position models without packed-document masks (``doc_ids`` would be
one more micro-batched input) and without the MoE auxiliary loss. The Lightning integration is not
wired: ModelParallelStrategy builds a 2-D (data, tensor) mesh and Lightning's automatic
optimisation runs forward and backward itself, whereas a pipeline schedule must own both. A
pipelined CausalLMModule would use ``automatic_optimization = False`` and call
:meth:`PipelineRunner.step` in ``training_step`` on a 3-D (pipeline, data, tensor) mesh.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from mmllm.losses import causal_lm_loss
from mmllm.nn.attention import build_attention_inputs

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def stage_layers(n_layers: int, num_stages: int) -> list[range]:
    """Contiguous layer ranges per stage, sizes differing by at most one (earlier stages larger).

    Raises:
        ValueError: when there are fewer layers than stages.
    """
    if num_stages < 1 or n_layers < num_stages:
        raise ValueError(f"cannot split {n_layers} layers into {num_stages} pipeline stages")
    base, extra = divmod(n_layers, num_stages)
    bounds, start = [], 0
    for s in range(num_stages):
        end = start + base + (s < extra)
        bounds.append(range(start, end))
        start = end
    return bounds


class DecoderStage(nn.Module):
    """Layers ``layers`` of a DecoderLM, plus the embedding (first stage) / norm and head (last).

    Args:
        model: the full DecoderLM (may be on the meta device); its modules are shared, not copied.
        layers: the layer indices of this stage.
        first: owns ``embed_tokens`` (input: token ids (B, T)); else input: hidden (B, T, C).
        last: owns ``norm`` and ``lm_head`` (output: logits (B, T, V)); else hidden (B, T, C).
    """

    def __init__(self, model: nn.Module, layers: range, *, first: bool, last: bool) -> None:
        super().__init__()
        if getattr(model, "alibi", None) is not None or getattr(model, "n_experts", 0):
            raise ValueError("pipeline stages support RoPE/learned positions and dense MLPs only")
        if model.tie_embeddings and not (first and last):
            # The first and last stage would each update their own copy of the shared matrix.
            raise ValueError("tied embeddings cannot be split across pipeline stages: use "
                             "tie_embeddings=false with pipeline parallelism")
        self.first, self.last = first, last
        self.embed_tokens = model.embed_tokens if first else None
        self.pos_embed = model.pos_embed if first else None
        self.rotary = model.rotary
        # A ModuleDict keyed by the global index keeps the names "layers.<i>.…" of the full model.
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.embed_tokens(x)  # (B, T, C)
        B, T, _ = x.shape
        positions = torch.arange(T, device=x.device).expand(B, T)
        if self.first and self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        inputs = build_attention_inputs(q_len=T, kv_len=T, device=x.device, dtype=x.dtype)
        rope = self.rotary(positions, x.dtype) if self.rotary is not None else None
        for layer in self.layers.values():
            x, _ = layer(x, inputs=inputs, rope=rope)
        if self.last:
            x = self.lm_head(self.norm(x))  # (B, T, V)
        return x


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss(logits, labels)[0]


class PipelineRunner:
    """This rank's stage of a pipelined DecoderLM and the schedule that trains it.

    Args:
        model: the full DecoderLM, built identically on every rank (the meta device is fine when
            the stage is materialised afterwards).
        stage_index: this rank's stage (its rank in the pipeline group).
        num_stages: the pipeline degree.
        device: where the stage runs.
        n_microbatches: micro-batches per step (>= num_stages keeps the bubble small).
        schedule: "gpipe" (all forwards, then all backwards) or "1f1b" (one forward, one backward:
            at most ``num_stages`` micro-batches of activations alive).
        group: the pipeline process group (default: the world).
    """

    def __init__(self, model: nn.Module, *, stage_index: int, num_stages: int,
                 device: torch.device | str, n_microbatches: int, schedule: str = "1f1b",
                 group=None) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown pipeline schedule {schedule!r}: expected one of {list(SCHEDULES)}")
        layers = stage_layers(model.n_layers, num_stages)[stage_index]
        self.first, self.last = stage_index == 0, stage_index == num_stages - 1
        self.module = DecoderStage(model, layers, first=self.first, last=self.last).to(device)
        self.stage = PipelineStage(self.module, stage_index, num_stages, torch.device(device), group=group)
        self.schedule = SCHEDULES[schedule](self.stage, n_microbatches=n_microbatches, loss_fn=_loss)

    def step(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of one batch (gradients accumulate in the stage's parameters).

        Every rank passes the same batch; the first stage feeds ``input_ids``, the last uses
        ``labels``.

        Returns:
            The mean loss over micro-batches on the last stage, else None.
        """
        losses: list[torch.Tensor] = []
        kwargs = {"target": labels, "losses": losses} if self.last else {}
        args = (input_ids,) if self.first else ()
        self.schedule.step(*args, **kwargs)
        return torch.stack(losses).mean() if self.last else None
