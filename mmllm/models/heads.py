"""A decoder with a scalar head: reward models and policies with a value head.

The wrapper owns a :class:`~mmllm.models.DecoderLM` (``decoder``) and a small head on its final
hidden states. ``mmllm.distributed.parallelize`` shards it like the bare decoder: the blocks of
``decoder`` get tensor parallel, activation checkpointing and their own FSDP2 units, the head is
in the root FSDP2 unit, and :meth:`DecoderWithScalarHead.parallel_plan` adds the head's entries to
the tensor-parallel plan.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, PrepareModuleInput


@dataclass
class ScalarHeadOutput:
    """What :meth:`DecoderWithScalarHead.forward` returns.

    Attributes:
        scores: (B,) one score per sequence (pool "last") or (B, T) per token (pool "all"), fp32.
        aux_loss: the decoder's MoE load-balancing loss (0 for dense decoders).
        logits: (B, T, V) LM logits when requested (a policy with a value head), else None.
    """

    scores: torch.Tensor
    aux_loss: torch.Tensor
    logits: torch.Tensor | None = None


class DecoderWithScalarHead(nn.Module):
    """A decoder LM and a head on its final hidden states (reward model, policy + value).

    Args:
        decoder: the decoder (e.g. a DecoderLM; it must accept ``return_hidden`` and
            ``return_logits`` and return ``.hidden``, ``.logits``, ``.aux_loss``).
        head: the head module (e.g. :class:`mmllm.nn.heads.ScalarHead`), or a factory called
            with ``dim=decoder.dim`` (a Hydra ``_partial_``).
        return_logits: also compute the LM logits by default (policy with a value head); a
            reward model skips the (B, T, V) logits.
    """

    def __init__(self, *, decoder: nn.Module, head: nn.Module | Callable[..., nn.Module],
                 return_logits: bool = False) -> None:
        super().__init__()
        self.decoder = decoder
        self.head = head if isinstance(head, nn.Module) else head(dim=decoder.dim)
        self.return_logits = return_logits

    @property
    def vocab_size(self) -> int:
        return self.decoder.vocab_size

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialises decoder and head (also after ``to_empty()`` from the meta device)."""
        self.decoder.init_weights()
        self.head.reset_parameters()

    def parallel_plan(self, *, sequence_parallel: bool) -> dict[str, ParallelStyle]:
        """Tensor-parallel plan entries of the wrapper's own modules (relative to it).

        The head is small and stays replicated over TP. With sequence parallelism the decoder's
        final hidden states come out sharded along the sequence: the head gathers them first.
        """
        if not sequence_parallel:
            return {}
        return {"head": PrepareModuleInput(input_layouts=(Shard(1),),
                                           desired_input_layouts=(Replicate(),),
                                           use_local_output=True)}

    def forward(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, return_logits: bool | None = None,
                **decoder_kwargs) -> ScalarHeadOutput:
        """Scores of a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 1 for tokens, 0 for padding (left or right); the decoder masks
                padding and the head reads each sequence's last real token.
            lengths: (B,) lengths of right-padded rows (instead of a mask, for the head only).
            return_logits: override of the constructor's ``return_logits``.
            decoder_kwargs: passed to the decoder (``doc_ids``, ``position_ids``,
                ``inputs_embeds``).

        Returns:
            :class:`ScalarHeadOutput`.
        """
        want_logits = self.return_logits if return_logits is None else return_logits
        out = self.decoder(input_ids, attention_mask=attention_mask, return_hidden=True,
                           return_logits=want_logits, **decoder_kwargs)
        scores = self.head(out.hidden, attention_mask=attention_mask, lengths=lengths)
        return ScalarHeadOutput(scores=scores, aux_loss=out.aux_loss,
                                logits=out.logits if want_logits else None)
