"""VisionLanguageModule: the two LLaVA/MiniGPT-4 training stages of a VisionLanguageModel.

* Stage 1 (alignment, ``train_llm=False``): the vision encoder and the LLM are frozen
  (``requires_grad=False`` and absent from the optimizer); only the connector learns, usually
  from a feature cache (:mod:`mmllm.data.feature_cache`) so the encoder never runs.
* Stage 2 (instruction tuning, ``train_llm=True``): the encoder stays frozen; the connector and
  the LLM train, fully or through LoRA adapters (``lora``, peft).

The model is assembled in :meth:`configure_model` from the LM (a factory, as ``mmllm train``
passes ``model.lm``, or ``lm_init_from``), the connector factory and what the datamodule shares
(:class:`mmllm.data.vlm_collate.VLMDataModule`: tokenizer with the image tokens, encoder), or
given whole as ``model``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from mmllm.losses import causal_lm_loss
from mmllm.models.vlm import VisionLanguageModel, build_vlm
from mmllm.modules.schedules import decay_groups, lightning_optimizers


class VisionLanguageModule(L.LightningModule):
    """Trains a :class:`VisionLanguageModel` with the causal LM loss on the supervised tokens.

    Args:
        model: a built VisionLanguageModel, or a zero-argument LM factory (``model.lm``).
        connector: partial ``connector(in_dim=Dv, out_dim=D)`` (mmllm/conf/model/connector).
        optimizer: partial ``optimizer(param_groups)``.
        scheduler: partial ``scheduler(optimizer, total_steps)``.
        lm_init_from: LM weights to start from (any mmllm.checkpoint.load_model source).
        connector_init_from: a connector file saved by ``Connector.save`` (e.g. stage 1's).
        train_llm: train the LLM too (stage 2); False freezes it (stage 1).
        train_connector: train the connector.
        lora: peft ``LoraConfig`` keyword arguments (r, lora_alpha, target_modules, ...): with
            ``train_llm``, only the adapters of the LLM train.
    """

    def __init__(self, *, model: VisionLanguageModel | Callable[[], nn.Module],
                 connector: Callable[..., nn.Module] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, lm_init_from: str | None = None,
                 connector_init_from: str | None = None, train_llm: bool = False,
                 train_connector: bool = True, lora: dict | None = None) -> None:
        super().__init__()
        if lora and not train_llm:
            raise ValueError("lora adapters train the LLM: set train_llm=true with lora")
        self.model = model if isinstance(model, VisionLanguageModel) else None
        self._lm_factory = None if self.model is not None else model
        self.connector_factory, self.optimizer_factory = connector, optimizer
        self.scheduler_factory, self.lm_init_from = scheduler, lm_init_from
        self.connector_init_from, self.train_llm = connector_init_from, train_llm
        self.train_connector, self.lora = train_connector, dict(lora) if lora else None
        self.tokenizer_path: str | None = None
        self.run_config: dict | None = None
        self.samples_seen = 0
        self._configured = False
        self._val_sum = self._val_count = None

    # --------------------------------------------------------------------------- model setup
    def configure_model(self) -> None:
        if self._configured:
            return
        if self.model is None:
            self.model = self._assemble()
        if self.connector_init_from:
            self.model.connector.load(self.connector_init_from)
        self.apply_freezing()
        self._configured = True

    def _assemble(self) -> VisionLanguageModel:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is None or self.connector_factory is None:
            raise ValueError("VisionLanguageModule needs a built model, or a datamodule with a "
                             "tokenizer (VLMDataModule) and a connector config")
        from mmllm.data.vlm_collate import vlm_token_ids

        if self.lm_init_from:
            from mmllm.checkpoint import load_model

            lm = load_model(self.lm_init_from)[0]
        else:
            lm = self._lm_factory()
        encoder = getattr(dm, "encoder", None)
        in_dim = encoder.width if encoder is not None else dm.feature_shape[1]
        dim = lm.dim
        return build_vlm(connector=self.connector_factory(in_dim=in_dim, out_dim=dim),
                         image_token_id=vlm_token_ids(tok)[1], vocab_size=len(tok), lm=lm,
                         vision=encoder)

    def apply_freezing(self) -> None:
        """Encoder frozen; LLM frozen unless ``train_llm`` (then all of it, or LoRA adapters)."""
        m = self.model
        if m.vision is not None:
            m.vision.requires_grad_(False)
            m.vision.frozen = True
        m.connector.requires_grad_(self.train_connector)
        m.decoder.requires_grad_(self.train_llm and not self.lora)
        if self.lora:
            from peft import LoraConfig, get_peft_model

            cfg = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **self.lora}
            m.decoder = get_peft_model(m.decoder, LoraConfig(**cfg))  # only lora_* train

    def merge_lora(self) -> None:
        """Folds LoRA adapters into the LLM weights (before export or a plain checkpoint)."""
        if hasattr(self.model.decoder, "merge_and_unload"):
            self.model.decoder = self.model.decoder.merge_and_unload()

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------------------ steps
    def forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, n_supervised_tokens)`` of one batch.

        Right padding needs no attention mask: causal attention never lets a real token see the
        pads after it, and their labels are ignored.
        """
        out = self.model(batch["input_ids"], images=batch.get("images"),
                         image_features=batch.get("image_features"))
        return causal_lm_loss(out.logits, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss, n = self.forward_loss(batch)
        bs = batch["input_ids"].shape[0]
        self.samples_seen += bs
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/supervised_tokens", n.float(), batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_count = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, n = self.forward_loss(batch)
        self._val_sum += loss.double() * n
        self._val_count += n

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        count = self.trainer.strategy.reduce(self._val_count, reduce_op="sum")
        loss = float(total / count.clamp(min=1))
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", math.exp(min(loss, 50.0)))

    # -------------------------------------------------------------------------- optimizer
    def param_groups(self) -> list[dict]:
        """Trainable parameters only: decay on matrices, none on norms, biases, embeddings, queries."""
        trainable = self.trainable_parameters()
        if not trainable:
            raise ValueError("nothing to train: the connector and the LLM are both frozen")
        return decay_groups(trainable.items())

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("VisionLanguageModule needs an optimizer config (module.optimizer)")
        optimizer = self.optimizer_factory(self.param_groups())
        return lightning_optimizers(self, optimizer, self.scheduler_factory)

    # -------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # With LoRA the decoder is a PeftModel: its state dict is not a DecoderLM's, so the model
        # config is recorded only without adapters (merge_lora first for a loadable checkpoint).
        plain = not hasattr(self.model.decoder, "peft_config")
        checkpoint["mmllm"] = {
            "model_class": "mmllm.models.vlm.VisionLanguageModel",
            "model_config": self.model.config if plain else None,
            "run_config": self.run_config, "tokenizer": self.tokenizer_path,
            "samples_seen": self.samples_seen}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.samples_seen = int(checkpoint.get("mmllm", {}).get("samples_seen", 0))
