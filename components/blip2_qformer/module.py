"""QFormerPretrainModule: BLIP-2 stage-1 representation learning of the kit's Q-Former connector.

The frozen vision encoder's features (from the feature cache where possible) feed the Q-Former;
three objectives train its queries and layers jointly with a text branch (``model.py``), each
under its own attention mask (``masks.py``) — ITC, ITM with hard negatives, ITG (``losses.py``).
After training, :meth:`QFormerPretrainModule.save_connector` (and ``save_connector_to`` at the end
of ``fit``) writes the connector alone with its own ``Connector.save``; ``vlm_stage1`` starts from
it with ``module.connector_init_from=<file>`` (``mmllm.modules.vlm.VisionLanguageModule``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from components.blip2_qformer.losses import (
    itc_loss,
    itc_similarity,
    itg_loss,
    itm_loss,
    mine_hard_negatives,
)
from components.blip2_qformer.masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask
from components.blip2_qformer.model import QFormerWithText
from mmllm.modules.schedules import decay_groups, lightning_optimizers
from mmllm.nn.connectors import QFormer


class QFormerPretrainModule(L.LightningModule):
    """Trains a Q-Former connector with ITC + ITM + ITG (BLIP-2 section 3.2).

    Args:
        connector: a built :class:`QFormer`, or a partial ``connector(in_dim=Dv, out_dim=D)``
            (mmllm/conf/model/connector/qformer.yaml).
        out_dim: D, the width of the LLM the connector will feed (its ``proj``, untrained here).
        model: ignored; ``mmllm train`` passes its LM factory to every module, and no LM takes
            part in stage-1 pretraining.
        vision: the frozen encoder for batches of ``images`` (None: the datamodule's ``encoder``;
            batches of cached ``image_features`` need none).
        tokenizer: a caption tokenizer (``components.blip2_qformer.data``; None: the datamodule's).
        max_text_len: text position table size.
        embed_dim: ITC embedding width (BLIP-2: 256).
        temperature: initial ITC temperature (learnable).
        loss_weights: weights of ``itc``, ``itm``, ``itg`` in the total loss (0 switches one off).
        optimizer: partial ``optimizer(param_groups)``.
        scheduler: partial ``scheduler(optimizer, total_steps)``.
        connector_init_from: a connector file (``Connector.save``) to start from.
        save_connector_to: where ``fit`` ends by saving the connector (None: not saved).
    """

    def __init__(self, *, connector: QFormer | Callable[..., QFormer], out_dim: int | None = None,
                 model: Any = None, vision: nn.Module | None = None, tokenizer: Any = None,
                 max_text_len: int = 64, embed_dim: int = 256, temperature: float = 0.07,
                 loss_weights: Mapping[str, float] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, connector_init_from: str | None = None,
                 save_connector_to: str | None = None) -> None:
        super().__init__()
        weights = {"itc": 1.0, "itm": 1.0, "itg": 1.0, **(loss_weights or {})}
        if set(weights) != {"itc", "itm", "itg"} or not any(weights.values()):
            raise ValueError(f"loss_weights must weigh itc/itm/itg (not all 0), got {dict(weights)}")
        self.connector_factory, self.out_dim = connector, out_dim
        self.vision, self.tokenizer = vision, tokenizer
        self.net_kwargs = {"max_text_len": max_text_len, "embed_dim": embed_dim, "temperature": temperature}
        self.loss_weights = {k: float(v) for k, v in weights.items()}
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.connector_init_from, self.save_connector_to = connector_init_from, save_connector_to
        self.net: QFormerWithText | None = None
        self.samples_seen = 0

    # --------------------------------------------------------------------------- model setup
    def configure_model(self) -> None:
        if self.net is not None:
            return
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        self.vision = self.vision if self.vision is not None else getattr(dm, "encoder", None)
        self.tokenizer = self.tokenizer if self.tokenizer is not None else getattr(dm, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("QFormerPretrainModule needs a caption tokenizer (tokenizer=, or a "
                             "CaptionDataModule)")
        qformer = self.connector_factory
        if not isinstance(qformer, nn.Module):
            if self.vision is None or self.out_dim is None:
                raise ValueError("building the connector needs the encoder (its width) and out_dim")
            qformer = qformer(in_dim=self.vision.width, out_dim=self.out_dim)
        if self.connector_init_from:
            qformer.load(self.connector_init_from)
        self.net = QFormerWithText(qformer=qformer, vocab_size=len(self.tokenizer), **self.net_kwargs)
        if self.vision is not None:
            self.vision.requires_grad_(False)
            self.vision.frozen = True
            self.vision.eval()

    @property
    def qformer(self) -> QFormer:
        return self.net.qformer

    def save_connector(self, path: str | Path) -> Path:
        """Writes the Q-Former connector alone (``vlm_stage1``: ``module.connector_init_from``)."""
        return self.net.qformer.save(path)

    def on_train_end(self) -> None:
        if self.save_connector_to and self.trainer.is_global_zero:
            self.save_connector(self.save_connector_to)

    # ------------------------------------------------------------------------------ losses
    def image_features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if batch.get("image_features") is not None:
            return batch["image_features"]
        if self.vision is None:
            raise ValueError("batch has images but the module has no vision encoder")
        with torch.no_grad():
            return self.vision(batch["images"])  # (B, N, Dv), frozen

    def itc_embeddings(self, feats: torch.Tensor, ids: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image (B, M, E), text (B, E))`` L2-normalised ITC embeddings (uni-modal mask)."""
        q_out, t_out = self.net.encode(feats, ids, unimodal_mask(mask, self.net.num_queries))
        img = F.normalize(self.net.vision_proj(q_out), dim=-1)
        return img, F.normalize(self.net.text_proj(t_out[:, 0]), dim=-1)  # [CLS]

    def forward_losses(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{"loss", "itc", "itm", "itg", "itc_r1"}`` of one batch (module docstring)."""
        feats, ids, mask = self.image_features(batch), batch["text_ids"], batch["text_mask"].bool()
        cap = batch.get("caption_ids")
        cap = torch.arange(ids.shape[0], device=ids.device) if cap is None else cap
        pos = cap[:, None] == cap[None, :]  # (B, B) matching pairs
        img, txt = self.itc_embeddings(feats, ids, mask)
        sim, temp = itc_similarity(img, txt), self.net.clamped_temp()
        out = {"itc": itc_loss(sim, temp, pos),
               "itc_r1": pos[torch.arange(len(pos)), sim.argmax(dim=1)].float().mean()}
        out["itm"] = self._itm(feats, ids, mask, sim.detach() / temp.detach(), pos) \
            if self.loss_weights["itm"] else sim.new_zeros(())
        out["itg"] = self._itg(feats, ids, mask) if self.loss_weights["itg"] else sim.new_zeros(())
        out["loss"] = sum(self.loss_weights[k] * out[k] for k in ("itc", "itm", "itg"))
        return out

    def _itm(self, feats, ids, mask, logits, pos) -> torch.Tensor:
        B = ids.shape[0]
        neg_text, neg_image = mine_hard_negatives(logits, pos)
        r = torch.arange(B, device=ids.device)
        has_t, has_i = neg_text >= 0, neg_image >= 0
        img_idx = torch.cat([r, r[has_t], neg_image[has_i]])  # positives, then the two negative sets
        txt_idx = torch.cat([r, neg_text[has_t], r[has_i]])
        labels = torch.cat([torch.ones(B, device=ids.device),
                            torch.zeros(len(img_idx) - B, device=ids.device)])
        q_out, _ = self.net.encode(feats[img_idx], ids[txt_idx],
                                   bidirectional_mask(mask[txt_idx], self.net.num_queries))
        return itm_loss(self.net.itm_head(q_out.mean(dim=1)), labels)  # mean query output

    def _itg(self, feats, ids, mask) -> torch.Tensor:
        dec = ids.clone()
        dec[:, 0] = self.tokenizer.dec_token_id  # [DEC] starts generation in place of [CLS]
        _, t_out = self.net.encode(feats, dec, multimodal_causal_mask(mask, self.net.num_queries))
        return itg_loss(self.net.lm_logits(t_out), dec, mask)

    # ------------------------------------------------------------------------------- steps
    def training_step(self, batch, batch_idx: int):
        out = self.forward_losses(batch)
        bs = batch["text_ids"].shape[0]
        self.samples_seen += bs
        self.log("train/loss", out["loss"].detach(), prog_bar=True, batch_size=bs)
        for k in ("itc", "itm", "itg", "itc_r1"):
            self.log(f"train/{k}", out[k].detach(), batch_size=bs)
        self.log("train/temperature", self.net.clamped_temp().detach(), batch_size=bs)
        return out["loss"]

    def validation_step(self, batch, batch_idx: int) -> None:
        out = self.forward_losses(batch)
        bs = batch["text_ids"].shape[0]
        for k in ("loss", "itc", "itm", "itg", "itc_r1"):
            self.log(f"val/{k}", out[k], batch_size=bs, sync_dist=True, prog_bar=k == "loss")

    @torch.no_grad()
    def recall_at_1(self, batch: Mapping[str, torch.Tensor]) -> float:
        """Image -> text ITC recall@1 within ``batch`` (a hit: the top text has the image's caption)."""
        feats = self.image_features(batch)
        img, txt = self.itc_embeddings(feats, batch["text_ids"], batch["text_mask"].bool())
        cap = batch["caption_ids"]
        top = itc_similarity(img, txt).argmax(dim=1)
        return float((cap[top] == cap).float().mean())

    # ---------------------------------------------------------------------------- optimizer
    def param_groups(self) -> list[dict]:
        """Q-Former + text branch + heads (never the encoder): decay on matrices only."""
        return decay_groups(self.net.named_parameters())

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("QFormerPretrainModule needs an optimizer config (module.optimizer)")
        optimizer = self.optimizer_factory(self.param_groups())
        return lightning_optimizers(self, optimizer, self.scheduler_factory)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["blip2_qformer"] = {"connector_config": self.net.qformer.config,
                                       "samples_seen": self.samples_seen}
