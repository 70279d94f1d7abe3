"""RewardModelModule: a decoder + scalar head trained with the K-wise ranking loss.

The backbone comes from an SFT (or pretrained) model (``init_from``: a kit checkpoint, an HF dir,
``smollm2``); its LM head is dropped (an untied head is deleted; a tied one is the embedding) and a
:class:`~mmllm.nn.heads.ScalarHead` reads the final hidden state of the end-of-context token the
data appends after every response (Anthropic, Bai et al. 2022). One prompt's K responses are
scored in the same forward and every pair of different rank enters the loss
(:func:`mmllm.losses.ranking.ranking_loss`, each prompt weighted once).

After training, rewards are normalised: the mean score of a reference set of responses
(the held-out responses, or samples of the SFT policy) is subtracted from the head's bias, so
those responses score 0 on average; the offset is recorded in the checkpoint and the last
checkpoint is rewritten. :func:`load_reward_model` returns a scorer
``score(prompts, responses) -> (n,) tensor`` of a saved reward model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FSDPModule

from mmllm.distributed import parallelize
from mmllm.distributed.parallelize import model_class_path
from mmllm.losses.ranking import pair_accuracy, ranking_loss
from mmllm.models.heads import DecoderWithScalarHead
from mmllm.modules.causal_lm import CausalLMModule
from mmllm.nn.heads import ScalarHead

NORMALIZE = (None, "data", "policy")


class RewardModelModule(CausalLMModule):
    """Trains a reward model on ranked responses (batches of :class:`~mmllm.data.preference.PreferenceDataModule`).

    Args:
        model: the decoder, or a zero-argument factory of it (``model/lm``); ignored for the
            architecture when ``init_from`` is given (the backbone is the source's model).
        head: the scalar head, a factory called with ``dim=`` (Hydra ``_partial_``); default
            ``ScalarHead(pool="last")``.
        optimizer, scheduler, nan_policy, max_nan_skips, parallelism, compile: see
            :class:`~mmllm.modules.causal_lm.CausalLMModule`.
        init_from: the SFT model to start from (see :func:`mmllm.checkpoint.load_model`).
        margin: subtracted from every pair's reward difference.
        label_smoothing: probability that a comparison is mislabelled (robust loss).
        center_coef: weight of ``mean(r^2)``, keeping rewards near 0 during training.
        normalize: reference responses whose mean reward becomes 0 after training: "data" (the
            held-out responses of the datamodule), "policy" (samples of the ``init_from`` policy
            for the held-out prompts) or None.
        normalize_samples: at most this many reference responses (policy: prompts).
        normalize_max_new_tokens, normalize_temperature: sampling of the policy's responses.
        normalize_policy: the policy sampled for "policy" (default ``init_from``; set it when
            ``init_from`` is a PMP reward model).
    """

    def __init__(self, *, model: nn.Module | Callable[[], nn.Module] | None = None,
                 head: nn.Module | Callable[..., nn.Module] | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, init_from: str | None = None,
                 margin: float = 0.0, label_smoothing: float = 0.0, center_coef: float = 0.0,
                 normalize: str | None = "data", normalize_samples: int = 256,
                 normalize_max_new_tokens: int = 64, normalize_temperature: float = 1.0,
                 normalize_policy: str | None = None, nan_policy: str = "skip", max_nan_skips: int = 20,
                 parallelism: dict | None = None, compile: bool = False) -> None:
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if normalize == "policy" and not (normalize_policy or init_from):
            raise ValueError("normalize='policy' samples the SFT policy: set normalize_policy or init_from")
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler, document_masking=False,
                         nan_policy=nan_policy, max_nan_skips=max_nan_skips, init_from=init_from,
                         parallelism=parallelism, compile=compile, fused_loss=False)
        self.head_factory = head
        self.margin, self.label_smoothing, self.center_coef = margin, label_smoothing, center_coef
        self.normalize, self.normalize_samples = normalize, normalize_samples
        self.normalize_max_new_tokens, self.normalize_temperature = normalize_max_new_tokens, normalize_temperature
        self.normalize_policy = normalize_policy
        self.reward_offset = 0.0  # subtracted from the head's bias by normalisation (cumulative)
        self.lm_head_removed = False
        self.encoding: dict | None = None  # how the data renders responses (saved for the scorer)
        self._val: dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------------------- model setup
    def build_reward_model(self) -> DecoderWithScalarHead:
        """The backbone (``init_from``'s model, else the factory's) with the scalar head."""
        if isinstance(self.model, DecoderWithScalarHead):
            return self.model
        if self.init_from:
            backbone = load_backbone(self.init_from)
            if isinstance(backbone, DecoderWithScalarHead):  # a PMP / earlier reward model
                return backbone.train()
            decoder = backbone.train()
        else:
            if self.model is None and self._model_factory is None:
                raise ValueError("RewardModelModule needs a model (model/lm) or init_from")
            decoder = self.model if self.model is not None else self._model_factory()
        head = self.head_factory or ScalarHead(dim=decoder.dim, pool="last")
        rm = DecoderWithScalarHead(decoder=decoder, head=head)
        if getattr(rm.head, "pool", "last") != "last":
            raise ValueError("a reward model scores whole sequences: its head needs pool='last'")
        return rm

    def configure_model(self) -> None:
        """Builds the reward model, drops an untied LM head, parallelises (FSDP2 / TP)."""
        if self._configured:
            return
        self.model = self.build_reward_model()
        kwargs = dict(self.parallelism)
        kwargs.pop("meta_init", None)  # the backbone is loaded in full (init_from) or small
        mesh = getattr(self, "device_mesh", None)
        tp = mesh["tensor_parallel"].size() if mesh is not None and "tensor_parallel" in \
            (mesh.mesh_dim_names or ()) else 1
        decoder = self.model.decoder
        if not decoder.tie_embeddings and decoder.lm_head is not None:
            if tp == 1:
                decoder.lm_head = None  # never used (no logits); TP plans name it, so TP keeps it
            else:
                decoder.lm_head.requires_grad_(False)
        self.lm_head_removed = decoder.lm_head is None
        if self.parallelism or self.compile:
            self.model = parallelize(self.model, mesh, compile=self.compile, **kwargs)
        self._configured = True

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = getattr(self.trainer, "datamodule", None)
        enc = getattr(dm, "encoder", None)
        if enc is not None:
            self.encoding = {"chat": enc.chat, "chat_template": getattr(dm, "chat_template", None),
                             "end_token": dm.end_token, "seq_len": enc.seq_len}

    # --------------------------------------------------------------------------------- loss
    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) fp32 rewards of a batch's right-padded responses (causal: no padding mask needed)."""
        return self.model(batch["input_ids"], lengths=batch["lengths"]).scores

    def forward_loss(self, batch: dict[str, torch.Tensor]):
        """``(loss, ranking loss, pairs, scores)`` of one batch."""
        scores = self.scores(batch)
        rank_loss, pairs = ranking_loss(scores, batch["group"], batch["rank"], margin=self.margin,
                                        label_smoothing=self.label_smoothing)
        loss = rank_loss + self.center_coef * scores.pow(2).mean() if self.center_coef else rank_loss
        return loss, rank_loss, pairs, scores

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss, rank_loss, pairs, scores = self.forward_loss(batch)
        self.tokens_seen += int(batch["lengths"].sum()) * self.data_parallel_size
        if not self._all_finite(loss):
            return self.handle_nonfinite(loss)
        self._consecutive_nan = 0
        n = max(pairs.num_prompts, 1)
        correct, total = pair_accuracy(scores.detach(), pairs)
        margin = (scores[pairs.better] - scores[pairs.worse]).detach().mean() if len(pairs) else scores.new_zeros(())
        self.log("train/loss", rank_loss.detach(), prog_bar=True, batch_size=n)
        self.log("train/reward_acc", correct.float() / total.clamp(min=1), batch_size=n)
        self.log("train/margin", margin, batch_size=n)
        self.log("train/reward_mean", scores.detach().mean(), batch_size=n)
        self.log("train/reward_std", scores.detach().std() if scores.numel() > 1 else scores.new_zeros(()),
                 batch_size=n)
        self.log("train/tokens_seen", float(self.tokens_seen), batch_size=n)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=n)
        return loss

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        keys = ("loss", "prompts", "correct", "pairs", "margin", "reward", "responses")
        self._val = {k: torch.zeros((), device=self.device, dtype=torch.float64) for k in keys}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        _, rank_loss, pairs, scores = self.forward_loss(batch)
        correct, total = pair_accuracy(scores, pairs)
        v = self._val
        v["loss"] += rank_loss.double() * pairs.num_prompts
        v["prompts"] += pairs.num_prompts
        v["correct"] += correct
        v["pairs"] += total
        v["margin"] += (scores[pairs.better] - scores[pairs.worse]).double().sum()
        v["reward"] += scores.double().sum()
        v["responses"] += scores.numel()

    def on_validation_epoch_end(self) -> None:
        """Pairwise accuracy over all held-out pairs (summed over batches and ranks)."""
        v = {k: self.trainer.strategy.reduce(t, reduce_op="sum") for k, t in self._val.items()}
        self.log("val/loss", float(v["loss"] / v["prompts"].clamp(min=1)), prog_bar=True, sync_dist=False)
        self.log("val/reward_acc", float(v["correct"] / v["pairs"].clamp(min=1)), prog_bar=True, sync_dist=False)
        self.log("val/margin", float(v["margin"] / v["pairs"].clamp(min=1)), sync_dist=False)
        self.log("val/reward_mean", float(v["reward"] / v["responses"].clamp(min=1)), sync_dist=False)

    # ------------------------------------------------------------------------- normalisation
    def on_train_end(self) -> None:
        if self.normalize is None:
            return
        dm = getattr(self.trainer, "datamodule", None)
        offset = self.normalize_rewards(dm)
        rank_zero_info(f"reward normalisation ({self.normalize}): offset {offset:.4f} subtracted")
        for cb in self.trainer.checkpoint_callbacks:  # rewrite last.ckpt with the normalised head
            path = getattr(cb, "last_model_path", "")
            if path:
                save = getattr(cb, "_save_checkpoint", None)
                save(self.trainer, path) if save is not None else self.trainer.save_checkpoint(path)

    def reference_sequences(self, dm) -> list[list[int]]:
        """Token ids of the reference responses (see ``normalize``), the same on every rank."""
        refs = dm.val_responses() or [(ex.prompt, r) for rows in dm.examples.values() for ex in rows
                                      for r in ex.responses]
        if self.normalize == "data":
            return [dm.encoder.encode(p, r)[0][-dm.encoder.seq_len:] for p, r in refs[:self.normalize_samples]]
        from mmllm.checkpoint import load_model
        from mmllm.generation import generate_ids

        prompts = list({str(p): p for p, _ in refs}.values())[:self.normalize_samples]
        policy = load_model(self.normalize_policy or self.init_from)[0].to(self.device).eval()
        tok = dm.tokenizer
        ids = [dm.encoder.renderer.prompt(p) for p in prompts]
        gen = torch.Generator(device=self.device).manual_seed(0)
        new = generate_ids(policy, ids, max_new_tokens=self.normalize_max_new_tokens,
                           temperature=self.normalize_temperature, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id or 0, generator=gen, tokenizer=tok)
        del policy
        texts = [tok.decode(n, skip_special_tokens=True).split("<|im_end|>")[0].strip() for n in new]
        return [dm.encoder.encode(p, t)[0][-dm.encoder.seq_len:] for p, t in zip(prompts, texts) if t]

    @torch.no_grad()
    def normalize_rewards(self, dm, sequences: Sequence[Sequence[int]] | None = None,
                          batch_size: int = 16) -> float:
        """Subtracts the mean reward of ``sequences`` (default: :meth:`reference_sequences`) from
        the head's bias so they average 0; returns the offset (also added to ``reward_offset``)."""
        seqs = list(sequences) if sequences is not None else self.reference_sequences(dm)
        if not seqs:
            raise ValueError("reward normalisation has no reference responses")
        if self.model.head.proj.bias is None:
            raise ValueError("reward normalisation needs a head with a bias (ScalarHead(bias=True))")
        was_training = self.model.training
        self.model.eval()
        total = float(score_sequences(self.model, seqs, batch_size=batch_size).double().sum())
        self.model.train(was_training)
        offset = total / len(seqs)
        if self._trainer is not None and self.trainer.world_size > 1:
            offset = float(self.trainer.strategy.broadcast(offset, src=0))  # one offset everywhere
        for m in self.model.modules():  # FSDP2 keeps the root unsharded after forward: reshard so
            if isinstance(m, FSDPModule):  # the update lands in the sharded parameter it owns
                m.reshard()
        self.model.head.proj.bias.sub_(offset)  # a DTensor under FSDP2: each rank its shard
        self.reward_offset += offset
        return offset

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        head = self.model.head
        checkpoint["mmllm"]["reward_model"] = {
            "decoder_class": model_class_path(self.model.decoder),
            "decoder_config": dict(self.model.decoder.config),
            "head": {"dim": head.proj.in_features, "pool": head.pool, "bias": head.proj.bias is not None,
                     "init_std": head.init_std},
            "lm_head_removed": self.lm_head_removed,
            "reward_offset": self.reward_offset,
            "normalize": self.normalize,
            "encoding": self.encoding,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.reward_offset = float(checkpoint.get("mmllm", {}).get("reward_model", {}).get("reward_offset", 0.0))


# ---------------------------------------------------------------------------------- scoring
def reward_checkpoint_meta(source) -> dict | None:
    """The ``reward_model`` metadata of a kit checkpoint, or None (not a reward model / not a
    kit checkpoint: an HF dir, a .gguf, ``smollm2``)."""
    from pathlib import Path

    from mmllm.checkpoint import resolve_ckpt
    from mmllm.distributed.checkpoint import is_distributed_checkpoint, read_metadata

    path = Path(str(source))
    if not path.exists() or path.suffix == ".gguf" or (path / "config.json").is_file():
        return None
    file = resolve_ckpt(path)
    ckpt = read_metadata(file) if is_distributed_checkpoint(file) else \
        torch.load(file, map_location="cpu", weights_only=False, mmap=True)
    return ckpt.get("mmllm", {}).get("reward_model")


def load_backbone(source) -> nn.Module:
    """The model to start a reward model from: a reward model (PMP) whole, else the LM."""
    if reward_checkpoint_meta(source) is not None:
        return load_reward_model(source).model
    from mmllm.checkpoint import load_model

    return load_model(source)[0]


def score_sequences(model: nn.Module, sequences: Sequence[Sequence[int]], *,
                    batch_size: int = 16) -> torch.Tensor:
    """(n,) fp32 rewards of token sequences (each ending with the end-of-context token), batched
    and right-padded; the model's own device."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        ids = torch.zeros(len(chunk), max(len(s) for s in chunk), dtype=torch.long)
        for n, s in enumerate(chunk):
            ids[n, :len(s)] = torch.as_tensor(list(s))
        lengths = torch.tensor([len(s) for s in chunk])
        out.append(model(ids.to(device), lengths=lengths.to(device)).scores.float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


class RewardScorer:
    """Scores responses with a trained reward model: ``scorer(prompts, responses) -> (n,) tensor``.

    Responses are rendered exactly as in training (chat template, end token, ``seq_len``).

    Args:
        model: the :class:`~mmllm.models.heads.DecoderWithScalarHead`.
        tokenizer: its tokenizer.
        encoding: the rendering options recorded at training (``chat``, ``chat_template``,
            ``end_token``, ``seq_len``).
        batch_size: responses per forward.
    """

    def __init__(self, model: DecoderWithScalarHead, tokenizer, *, encoding: dict | None = None,
                 batch_size: int = 16) -> None:
        from mmllm.data.preference import PreferenceEncoder

        enc = dict(encoding or {})
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.encoder = PreferenceEncoder(tokenizer, chat=enc.get("chat", True),
                                         chat_template=enc.get("chat_template"),
                                         end_token=enc.get("end_token", "eos"),
                                         seq_len=enc.get("seq_len") or 512)

    @torch.no_grad()
    def score(self, prompts: Sequence[str | list[dict]], responses: Sequence[str]) -> torch.Tensor:
        """Rewards of ``responses[i]`` to ``prompts[i]`` (a string: one user turn; or messages)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        seqs = []
        for p, r in zip(prompts, responses):
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            seqs.append(self.encoder.encode(messages, r)[0][-self.encoder.seq_len:])
        return score_sequences(self.model, seqs, batch_size=self.batch_size)

    __call__ = score


def load_reward_model(source, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | None = None, batch_size: int = 16) -> RewardScorer:
    """The scorer of a reward-model checkpoint written by :class:`RewardModelModule`.

    Args:
        source: a .ckpt file, a DCP directory (FSDP2 runs) or a run directory (its last.ckpt).
        device, dtype: where / in which dtype to run the model.

    Returns:
        :class:`RewardScorer` (``.model`` is the DecoderWithScalarHead, ``.tokenizer`` its tokenizer).
    """
    import importlib

    from transformers import AutoTokenizer

    from mmllm.checkpoint import checkpoint_tokenizer_dir, resolve_ckpt
    from mmllm.distributed.checkpoint import (
        is_distributed_checkpoint,
        model_state_dict,
        read_metadata,
    )
    from mmllm.errors import CheckpointError

    file = resolve_ckpt(source)
    distributed = is_distributed_checkpoint(file)
    ckpt = read_metadata(file) if distributed else torch.load(file, map_location="cpu", weights_only=False)
    meta = ckpt.get("mmllm", {})
    rm = meta.get("reward_model")
    if not rm:
        raise CheckpointError(f"{source} is not a reward-model checkpoint (no 'reward_model' metadata)",
                              fix="pass a checkpoint of `mmllm train experiment=reward_model`")
    mod, _, cls = rm["decoder_class"].rpartition(".")
    decoder = getattr(importlib.import_module(mod), cls)(**rm["decoder_config"])
    if rm.get("lm_head_removed"):
        decoder.lm_head = None
    model = DecoderWithScalarHead(decoder=decoder, head=ScalarHead(**rm["head"]))
    state = model_state_dict(file) if distributed else \
        {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    tok_dir = checkpoint_tokenizer_dir(file, meta)
    if tok_dir is None:
        raise CheckpointError(f"{source} records no tokenizer", fix="train with a datamodule that has one")
    scorer = RewardScorer(model, AutoTokenizer.from_pretrained(str(tok_dir)), encoding=rm.get("encoding"),
                          batch_size=batch_size)
    scorer.reward_offset = float(rm.get("reward_offset", 0.0))
    return scorer
