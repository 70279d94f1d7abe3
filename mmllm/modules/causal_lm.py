"""CausalLMModule: next-token training of a decoder LM (pretraining, instruction tuning, SFT).

Hooks are small and overridable: :meth:`forward_loss` (loss of one batch), :meth:`param_groups`
(weight-decay split), :meth:`handle_nonfinite` (NaN policy). Parallelism is applied from outside in
:meth:`configure_model` (mmllm.distributed), so the model code stays single-device.

Loss normalisation (``loss_normalization="step"``, the default): the training loss of one optimizer
step is ``sum(token losses) / N`` with N the supervised tokens of ALL its micro-batches (gradient
accumulation) on ALL data-parallel ranks, so every supervised token weighs the same however the
SFT rows fall into micro-batches (a mean per micro-batch over-weights the tokens of short ones).
N is only known after the last micro-batch, so each micro-batch backpropagates its loss SUM
(divided by a fixed constant that keeps fp16 gradients in range), its count is accumulated, and
at the step's last backward (``on_after_backward``, after DDP/FSDP have reduced the gradients and
before clipping and every ``on_before_optimizer_step``) the gradients are rescaled once by
``K * W * constant / N`` (Lightning divides by K accumulation steps, DDP/FSDP average over W
ranks). With equal counts per micro-batch (pretraining) this equals the old per-batch mean.
The returned/logged ``train/loss`` keeps the micro-batch per-token mean as its value;
``train/step_loss`` is the exact per-token mean of the whole step over all ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmllm.distributed import clip_grad_norm_, grad_norm, load_full_state_dict, parallelize
from mmllm.distributed.parallelize import model_class_path
from mmllm.distributed.strategy import data_parallel_rank
from mmllm.losses import causal_lm_loss, liger_available, linear_cross_entropy_loss
from mmllm.modules.schedules import lightning_optimizers
from mmllm.nn.moe import GroupedExperts

NAN_POLICIES = ("skip", "stop")
FUSED_LOSS = ("auto", True, False, "liger", "chunked")
LOSS_NORMALIZATIONS = ("step", "micro_batch")


class CausalLMModule(L.LightningModule):
    """Trains ``model`` with the causal LM loss.

    Args:
        model: the LM, or a zero-argument factory building it (called in ``configure_model``,
            which lets large models be created lazily / sharded).
        optimizer: partial ``optimizer(param_groups)``, e.g. AdamW with lr and weight_decay.
        scheduler: partial ``scheduler(optimizer, total_steps)`` (mmllm.modules.schedules).
        document_masking: pass ``doc_ids`` so attention stays inside packed documents.
        moe_aux_coef: weight of the MoE load-balancing loss.
        nan_policy: on a non-finite loss, "skip" the step or "stop" training with an error.
        max_nan_skips: consecutive skipped steps tolerated before stopping anyway.
        init_from: weights to start from (see mmllm.checkpoint.load_model: "smollm2", an HF
            dir, a .gguf, a kit .ckpt); loaded in ``configure_model`` before parallelisation.
        parallelism: keyword arguments of ``mmllm.distributed.parallelize`` (FSDP2/TP/AC/offload/
            mixed precision), plus ``meta_init``: build the model on the meta device and
            materialise it shard by shard after sharding (with a device mesh).
        compile: ``torch.compile`` each block.
        fused_loss: fuse the LM head into the cross-entropy so the (B, T, V) logits are never
            materialised (:func:`mmllm.losses.linear_cross_entropy_loss`): "auto" = liger-kernel
            on CUDA when installed, else the plain loss; true = liger on CUDA when installed,
            else the chunked fallback; "liger"/"chunked" force one; false = plain. Not with
            tensor parallelism (the head is vocabulary-sharded): "auto" falls back, true fails.
        loss_normalization: "step": per supervised token over all micro-batches and DP ranks of an
            optimizer step (see the module docstring); "micro_batch": each micro-batch's own mean
            (the usual Lightning behaviour; wrong weights with unequal supervised counts).
        lora: LoRA/QLoRA options of :func:`mmllm.modules.lora.apply_lora` (``r``, ``alpha``,
            ``dropout``, ``target_modules``, ``quantize``: null | nf4 | fp4, ...): the model's
            weights are frozen and only the adapters train; checkpoints record the options, so
            ``load_model``/``mmllm export`` give the merged plain model.
    """

    def __init__(self, *, model: nn.Module | Callable[[], nn.Module],
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, document_masking: bool = True,
                 moe_aux_coef: float = 0.01, nan_policy: str = "skip", max_nan_skips: int = 20,
                 init_from: str | None = None, parallelism: dict | None = None,
                 compile: bool = False, fused_loss: bool | str = "auto",
                 loss_normalization: str = "step", lora: dict | None = None) -> None:
        super().__init__()
        if loss_normalization not in LOSS_NORMALIZATIONS:
            raise ValueError(f"loss_normalization must be one of {LOSS_NORMALIZATIONS}, "
                             f"got {loss_normalization!r}")
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        if fused_loss not in FUSED_LOSS:
            raise ValueError(f"fused_loss must be one of {FUSED_LOSS}, got {fused_loss!r}")
        self.fused_loss, self.loss_normalization = fused_loss, loss_normalization
        self.lora = dict(lora) if lora else None
        if self.lora:
            from mmllm.modules.lora import check_lora_options

            check_lora_options(self.lora, parallelism=parallelism)
        if isinstance(model, nn.Module):
            self.model: nn.Module | None = model
            self._model_factory = None
        else:
            self.model = None
            self._model_factory = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.document_masking, self.moe_aux_coef = document_masking, moe_aux_coef
        self.nan_policy, self.max_nan_skips = nan_policy, max_nan_skips
        self.parallelism, self.compile = dict(parallelism or {}), compile
        self._configured = False
        self.init_from = init_from
        self.tokenizer_path: str | None = None  # recorded in checkpoints for export/generation
        self.run_config: dict | None = None  # the resolved Hydra config, saved in checkpoints
        self.tokens_seen = 0
        self.nan_skips = 0
        self._consecutive_nan = 0
        self._val_sum = self._val_count = None
        # Token normalisation of the current optimizer step (see the module docstring).
        self._step_tokens = self._step_loss_sum = None
        self._grad_divisor: float | None = None
        self._last_micro_batch = False

    # --------------------------------------------------------------------------- model setup
    def configure_model(self) -> None:
        """Builds the model (on the meta device when ``parallelism.meta_init``) and parallelises it.

        Lightning calls this hook once per ``fit``/``validate``/``test``; the model is built and
        sharded only the first time.
        """
        if self._configured:
            return
        kwargs = dict(self.parallelism)
        meta_init = bool(kwargs.pop("meta_init", False))
        mesh = getattr(self, "device_mesh", None)
        meta = False
        if self.model is None:
            meta = meta_init and mesh is not None  # one device gains nothing from it
            with torch.device("meta") if meta else nullcontext():
                self.model = self._model_factory()
        if self.init_from and not meta:
            # A built model (``model=<nn.Module>``) starts from init_from too, not its own init.
            from mmllm.checkpoint import init_weights_from

            init_weights_from(self.model, self.init_from)
        if self.lora:
            from mmllm.modules.lora import apply_lora

            apply_lora(self.model, **self.lora)
        if self.parallelism or self.compile:
            self.model = parallelize(self.model, mesh, compile=self.compile, **kwargs)
            if self.init_from and meta:
                from mmllm.checkpoint import load_model

                load_full_state_dict(self.model, load_model(self.init_from)[0].state_dict())
        self._configured = True

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tokenizer = getattr(dm, "tokenizer", None)
        if tokenizer is not None:
            vocab = getattr(self.model, "vocab_size", None)
            if vocab is not None and len(tokenizer) > vocab:
                raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                                 f"is {vocab}: set model.lm.vocab_size >= {len(tokenizer)}")
        if not self.tokenizer_path and getattr(dm, "tokenizer_dir", None):
            # The checkpoint callback (mmllm.callbacks.checkpoint) may have set a run-relative copy.
            self.tokenizer_path = str(Path(dm.tokenizer_dir).resolve())

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.model(input_ids, **kwargs)

    # ------------------------------------------------------------------------------- losses
    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss of one batch.

        Packed batches pass their ``doc_ids`` (attention stays inside each document) and
        ``position_ids`` (restarting in every document) on to the model, unless
        ``document_masking`` is off.

        Args:
            batch: ``input_ids`` and ``labels`` (B, T), optionally ``doc_ids``, ``position_ids``,
                ``attention_mask``.

        Returns:
            ``(loss, lm_loss, n_tokens)``: ``lm_loss`` is the mean over the ``n_tokens``
            supervised tokens (``training_step`` turns it back into their sum for the step's
            token normalisation); loss adds the MoE aux term.
        """
        # Without document masking a packed row is one stream: positions run on across documents.
        doc_ids = batch.get("doc_ids") if self.document_masking else None
        positions = batch.get("position_ids") if self.document_masking else None
        impl = self.fused_loss_impl()
        fused = {"return_hidden": True, "return_logits": False} if impl else {}
        out = self.model(batch["input_ids"], doc_ids=doc_ids, position_ids=positions,
                         attention_mask=batch.get("attention_mask"), **fused)
        if impl is None:
            lm_loss, n = causal_lm_loss(out.logits, batch["labels"])
        else:
            head = self.model.lm_head
            if isinstance(head.weight, DTensor):  # FSDP2 leaves the root gathered after forward
                raise RuntimeError("fused_loss needs the LM head's gathered weight, got a DTensor "
                                   f"{head.weight.placements}: set module.fused_loss=false")
            lm_loss, n = linear_cross_entropy_loss(out.hidden, head.weight, batch["labels"],
                                                   bias=head.bias, impl=impl)
        return lm_loss + self.moe_aux_coef * out.aux_loss, lm_loss, n

    def fused_loss_impl(self) -> str | None:
        """The fused linear + cross-entropy to use ("liger", "chunked"), or None (plain loss)."""
        if self.fused_loss is False:
            return None
        mesh = getattr(self, "device_mesh", None)
        tp = mesh["tensor_parallel"].size() \
            if mesh is not None and "tensor_parallel" in (mesh.mesh_dim_names or ()) else 1
        usable = tp == 1 and isinstance(getattr(self.model, "lm_head", None), nn.Linear)
        liger = self.device.type == "cuda" and liger_available()
        if self.fused_loss == "auto":
            return "liger" if usable and liger else None
        if not usable:
            raise ValueError(f"fused_loss={self.fused_loss!r} needs a model with an nn.Linear "
                             "lm_head and no tensor parallelism (a vocabulary-sharded head): "
                             "use fused_loss=auto or false")
        if self.fused_loss is True:
            return "liger" if liger else "chunked"
        return self.fused_loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        step_norm = self.loss_normalization == "step"
        if step_norm:
            self._start_micro_batch(batch, batch_idx)
        loss, lm_loss, n = self.forward_loss(batch)
        tokens = batch["input_ids"].numel() * self.data_parallel_size
        self.tokens_seen += tokens
        if not self._all_finite(loss):
            return self.handle_nonfinite(loss)
        self._consecutive_nan = 0
        if step_norm:
            loss, lm_loss = self._token_normalized(loss, lm_loss, n)  # lm_loss stays the mean
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", lm_loss.detach(), prog_bar=True, batch_size=bs)
        if getattr(self.model, "n_experts", 0) and self.moe_aux_coef:
            self.log("train/aux_loss", (loss - lm_loss).detach() / self.moe_aux_coef, batch_size=bs)
        self.log("train/tokens_seen", float(self.tokens_seen), batch_size=bs)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=True, batch_size=bs)
        return loss

    # ----------------------------------------------------------------- token normalisation
    def _start_micro_batch(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Resets the step's counts at its first micro-batch; notes whether this one is its last."""
        k = self.trainer.accumulate_grad_batches
        if batch_idx % k == 0 or self._step_tokens is None:
            self._step_tokens = torch.zeros((), device=self.device, dtype=torch.float64)
            self._step_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        # Lightning steps the optimizer after every k-th batch of an epoch and after its last one.
        self._last_micro_batch = (batch_idx + 1) % k == 0 or bool(self.trainer.is_last_batch)
        if self._grad_divisor is None:
            # Any constant works (the rescale undoes it); tokens per micro-batch keep the summed
            # loss's gradients at the size of a mean's (fp16 loss scaling). Same on every rank.
            d = torch.tensor(float(batch["labels"].numel()), device=self.device)
            if self.trainer.world_size > 1:
                d = self.trainer.strategy.reduce(d, reduce_op="max")
            self._grad_divisor = float(d)

    def _token_normalized(self, loss: torch.Tensor, lm_mean: torch.Tensor, n: torch.Tensor):
        """``(loss to backpropagate, per-token mean for logging)`` of a micro-batch.

        The returned loss has the value of the micro-batch's per-token mean (what Lightning and
        callbacks report) and the gradient of ``sum / divisor``; the MoE aux term (a per-batch
        mean) is weighted by the micro-batch's tokens, i.e. averaged per token over the step.
        """
        lm_sum = lm_mean * n  # the sum of the token losses (n carries no gradient)
        self._step_tokens += n.detach().double()
        self._step_loss_sum += lm_sum.detach().double()
        mean = lm_mean
        aux = loss - lm_mean  # moe_aux_coef * aux_loss (0 without experts)
        grad_loss = (lm_sum + aux * n) / self._grad_divisor
        value = mean + aux
        return grad_loss + (value - grad_loss).detach(), mean

    def on_after_backward(self) -> None:
        """At the last backward of an optimizer step: gradients ``*= K * W * divisor / N``."""
        if self.loss_normalization != "step" or not self._last_micro_batch or self._step_tokens is None:
            return
        stats = torch.stack([self._step_tokens, self._step_loss_sum])
        if self.trainer.world_size > 1:
            # Tensor-parallel ranks of a DP group read the same batch: count each batch once.
            stats = self.trainer.strategy.reduce(stats, reduce_op="sum")
            stats = stats * (self.data_parallel_size / self.trainer.world_size)
        n_total, loss_sum = float(stats[0]), float(stats[1])
        scale = self.trainer.accumulate_grad_batches * self.data_parallel_size * self._grad_divisor \
            / max(n_total, 1.0)
        with torch.no_grad():
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.log("train/step_loss", loss_sum / max(n_total, 1.0), batch_size=1)
        self.log("train/step_supervised_tokens", n_total, batch_size=1)
        self._last_micro_batch = False

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different batches (tensor-parallel ranks share theirs); the same
        helper shards the kit's datamodules, so ``tokens_seen`` counts what was really read."""
        return data_parallel_rank(self._trainer)[1]

    def _all_finite(self, loss: torch.Tensor) -> bool:
        # Every rank must take the same branch, or collectives would hang.
        ok = torch.isfinite(loss.detach()).float()
        if self.trainer.world_size > 1:
            ok = self.trainer.strategy.reduce(ok, reduce_op="min")
        return bool(ok > 0)

    def handle_nonfinite(self, loss: torch.Tensor):
        """Applies ``nan_policy`` to a non-finite loss; returning None skips the optimizer step."""
        step = self.trainer.global_step
        self._consecutive_nan += 1
        self.nan_skips += 1
        if self.nan_policy == "stop" or self._consecutive_nan > self.max_nan_skips:
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at step {step} "
                f"({self._consecutive_nan} in a row, nan_policy={self.nan_policy!r}). Lower the "
                "learning rate, check the data, or use precision=bf16-mixed instead of 16-mixed.")
        self.print(f"[mmllm] non-finite loss at step {step}: batch skipped ({self.nan_skips} so far)")
        self.log("train/nan_skips", float(self.nan_skips))
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        if any(p.grad is not None for p in self.parameters()):
            # Works for DTensors on several meshes (FSDP2 + TP), unlike torch's get_total_norm.
            self.log("train/grad_norm", grad_norm(self.parameters()).detach().float())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None) -> None:
        """Clips by global norm with :func:`mmllm.distributed.clip_grad_norm_` under FSDP2/TP."""
        sharded = any(isinstance(p, DTensor) for p in self.parameters())
        if gradient_clip_val and sharded and gradient_clip_algorithm in (None, "norm"):
            clip_grad_norm_(self.parameters(), float(gradient_clip_val))
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ----------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, lm_loss, n = self.forward_loss(batch)
        self._val_sum += lm_loss.double() * n
        self._val_count += n

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = float(total / count.clamp(min=1))
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", math.exp(min(loss, 50.0)), prog_bar=True, sync_dist=False)

    # ------------------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict]:
        """AdamW groups: decay on matrices of linear layers; none on norms, biases, embeddings."""
        decay, no_decay, seen = [], [], set()
        for mod_name, module in self.model.named_modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                is_matrix = (isinstance(module, nn.Linear) and name == "weight") or \
                    (isinstance(module, GroupedExperts) and name.endswith("_proj"))
                tied = isinstance(module, nn.Linear) and p is getattr(getattr(self.model, "embed_tokens", None), "weight", None)
                (decay if is_matrix and not tied else no_decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("CausalLMModule needs an optimizer config to train (module.optimizer)")
        optimizer = self.optimizer_factory(self.param_groups())
        sharded = any(isinstance(p, DTensor) for p in self.parameters())
        if sharded and type(optimizer).__module__.startswith("bitsandbytes"):
            raise ValueError(
                f"{type(optimizer).__name__} (bitsandbytes) updates plain tensors and cannot step the "
                "DTensor shards of FSDP2/TP: use module/optimizer=adamw8bit with strategy=single or "
                "ddp, or module/optimizer=adamw with fsdp2/fsdp2_tp")
        return lightning_optimizers(self, optimizer, self.scheduler_factory)

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmllm"] = {
            "model_class": model_class_path(self.model),
            "model_config": getattr(self.model, "config", None),
            "run_config": self.run_config,
            "tokenizer": self.tokenizer_path,
            "tokens_seen": self.tokens_seen,
            "nan_skips": self.nan_skips,
            "lora": self.lora,  # load_model rebuilds the adapters and merges them
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("mmllm", {})
        self.tokens_seen = int(meta.get("tokens_seen", 0))
        self.nan_skips = int(meta.get("nan_skips", 0))
