"""DPOModule: direct preference optimisation of a policy against a frozen reference copy.

DPO (Rafailov et al. 2023) trains the policy on comparisons without a reward model or sampling:
the implicit reward of a response is ``beta * (log pi(y|x) - log ref(y|x))`` and the loss is the
ranking loss on those rewards (``mmllm.losses.ranking.dpo_ranking_loss``: every ordered pair of a
prompt's responses, prompts weighted once; K = 2 is the usual chosen/rejected DPO). Options: cDPO
label smoothing and the IPO loss. Batches come from ``mmllm.data.preference.PreferenceDataModule``
with ``labels: true`` (next-token labels on the responses) and ``end_token: null``.

The reference is a frozen copy of the starting policy (``init_from``, the SFT model), made before
parallelisation and sharded the same way; it is not a submodule, so it is neither in the
optimizer nor in checkpoints: a checkpoint is a plain DecoderLM policy (``mmllm export`` /
``generate`` / ``serve`` load it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mmllm.distributed import parallelize
from mmllm.losses.ranking import DPO_LOSSES, dpo_ranking_loss, pair_accuracy, sequence_logprobs
from mmllm.modules.causal_lm import CausalLMModule


class DPOModule(CausalLMModule):
    """DPO / cDPO / IPO on ranked responses.

    Args:
        beta: KL strength (implicit reward scale).
        label_smoothing: cDPO's flip probability.
        loss_type: "sigmoid" (DPO) or "ipo".
        average_logprobs: length-normalised sequence log-probabilities (mean per token).
        model, optimizer, scheduler, init_from, parallelism, compile, nan_policy, max_nan_skips:
            see :class:`mmllm.modules.causal_lm.CausalLMModule`.
    """

    def __init__(self, *, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 average_logprobs: bool = False, **kwargs: Any) -> None:
        if loss_type not in DPO_LOSSES:
            raise ValueError(f"loss_type must be one of {DPO_LOSSES}, got {loss_type!r}")
        kwargs.setdefault("fused_loss", False)
        kwargs.setdefault("document_masking", False)
        super().__init__(**kwargs)
        self.beta, self.label_smoothing, self.loss_type = beta, label_smoothing, loss_type
        self.average_logprobs = average_logprobs
        self._ref: list[nn.Module] = []  # a list: hidden from Lightning (no state dict, no optimizer)
        self._val: dict[str, torch.Tensor] = {}

    @property
    def reference(self) -> nn.Module:
        return self._ref[0]

    def configure_model(self) -> None:
        """Builds the policy (``init_from``), copies the frozen reference, parallelises both."""
        if self._configured:
            return
        parallelism, compile_ = dict(self.parallelism), self.compile
        self.parallelism, self.compile = {}, False  # build + init_from only, unsharded
        super().configure_model()
        self.parallelism, self.compile = parallelism, compile_
        ref = copy.deepcopy(self.model).requires_grad_(False).eval()
        if parallelism or compile_:
            parallelism.pop("meta_init", None)
            mesh = getattr(self, "device_mesh", None)
            self.model = parallelize(self.model, mesh, compile=compile_, **parallelism)
            ref = parallelize(ref, mesh, **parallelism)
        self._ref = [ref]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reference.to(self.device)

    def on_validation_start(self) -> None:
        self.reference.to(self.device)

    def logprobs(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) sequence log-probabilities of the labelled response tokens (right padding, causal)."""
        logits = model(batch["input_ids"]).logits
        return sequence_logprobs(logits, batch["labels"], average=self.average_logprobs)

    def forward_loss(self, batch: dict[str, torch.Tensor]):
        """``(loss, pairs, implicit rewards)`` of one batch."""
        if "labels" not in batch:
            raise ValueError("DPO needs response labels: set data.labels=true (PreferenceDataModule)")
        policy = self.logprobs(self.model, batch)
        with torch.no_grad():
            ref = self.logprobs(self.reference, batch)
        return dpo_ranking_loss(policy, ref, batch["group"], batch["rank"], beta=self.beta,
                                label_smoothing=self.label_smoothing, loss_type=self.loss_type)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss, pairs, rewards = self.forward_loss(batch)
        self.tokens_seen += int(batch["attention_mask"].sum()) * self.data_parallel_size
        if not self._all_finite(loss):
            return self.handle_nonfinite(loss)
        self._consecutive_nan = 0
        n = max(pairs.num_prompts, 1)
        correct, total = pair_accuracy(rewards, pairs)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/reward_acc", correct.float() / total.clamp(min=1), batch_size=n)
        if len(pairs):
            self.log("train/margin", (rewards[pairs.better] - rewards[pairs.worse]).mean(), batch_size=n)
            self.log("train/chosen_reward", rewards[pairs.better].mean(), batch_size=n)
            self.log("train/rejected_reward", rewards[pairs.worse].mean(), batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = {k: torch.zeros((), device=self.device, dtype=torch.float64)
                     for k in ("loss", "prompts", "correct", "pairs", "margin")}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, pairs, rewards = self.forward_loss(batch)
        correct, total = pair_accuracy(rewards, pairs)
        v = self._val
        v["loss"] += loss.double() * pairs.num_prompts
        v["prompts"] += pairs.num_prompts
        v["correct"] += correct
        v["pairs"] += total
        v["margin"] += (rewards[pairs.better] - rewards[pairs.worse]).double().sum()

    def on_validation_epoch_end(self) -> None:
        """Preference accuracy of the implicit reward over all held-out pairs, and its margin."""
        v = {k: self.trainer.strategy.reduce(t, reduce_op="sum") for k, t in self._val.items()}
        self.log("val/loss", float(v["loss"] / v["prompts"].clamp(min=1)), prog_bar=True, sync_dist=False)
        self.log("val/reward_acc", float(v["correct"] / v["pairs"].clamp(min=1)), prog_bar=True, sync_dist=False)
        self.log("val/margin", float(v["margin"] / v["pairs"].clamp(min=1)), sync_dist=False)
