"""Vision-language pipeline stages: vision_pretrain -> vlm_stage1 -> vlm_stage2.

* ``vision_pretrain``: a CLIP (tiny ViT + text tower) trained from scratch with open_clip's
  ClipLoss on scikit-image's bundled image-caption pairs; writes an open_clip checkpoint.
* ``vlm_stage1``: feature alignment: the ViT (vision_pretrain's, else ``vision``) and the LM
  (the sft stage's checkpoint when the pipeline has one, else pretrain's) frozen, the connector
  trained from a feature cache; writes the connector and the tokenizer with the image tokens.
* ``vlm_stage2``: visual instruction tuning: encoder frozen, connector + LM (or LoRA) trained on
  conversations (hand-written, plus visual instructions a teacher generates); writes the VLM
  checkpoint, greedy captions of a few images (BLEU / CIDEr), the judge's relative score on
  held-out generated questions, and the LLaVA export when the connector is linear/MLP.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import torch
from hydra.utils import instantiate
from tqdm.auto import tqdm

from mmllm.stages.base import Stage, StageContext
from mmllm.stages.trainer import CONFIG_IGNORE as STAGE_TRAINER_IGNORE
from mmllm.stages.vlm_instruct import (
    answer_items,
    caption_scores,
    generate_instructions,
    judge_items,
)

LM_STAGES = ("sft", "pretrain")


def _lm_checkpoint(ctx: StageContext) -> Path:
    """The LM checkpoint of the sft stage (else pretrain)."""
    for stage in LM_STAGES:
        if ctx.has(stage):
            outputs = ctx.markers[stage].output_paths(ctx.run_dir)
            ckpt = outputs.get("checkpoint") or next(
                (p for p in outputs.values() if str(p).endswith(".ckpt")), None)
            if ckpt is not None:
                return ckpt
    raise KeyError(f"stage {ctx.name!r} needs a finished sft or pretrain stage (an LM checkpoint)")


def _lm_and_tokenizer(ctx: StageContext):
    """The LM of the sft stage (else pretrain) and its tokenizer (the tokenize stage's if any)."""
    from mmllm.checkpoint import load_model, load_tokenizer_from

    ckpt = _lm_checkpoint(ctx)
    model, tok = load_model(ckpt)
    if ctx.has("tokenize") and "tokenizer" in ctx.markers["tokenize"].outputs:
        tok = load_tokenizer_from(ctx.output("tokenize", "tokenizer"))
    if tok is None:
        raise FileNotFoundError(f"no tokenizer for {ckpt}")
    return model, tok


def _encoder(ctx: StageContext, vision: dict):
    from mmllm.nn.vision import VisionEncoder

    kwargs = dict(vision)
    if ctx.has("vision_pretrain"):
        meta = json.loads(ctx.output("vision_pretrain", "config").read_text())
        kwargs.update(model_cfg=meta["model_cfg"], pretrained=str(ctx.output("vision_pretrain", "checkpoint")))
    return VisionEncoder(**kwargs)


def _built(node):
    """The object of a ``_target_`` node; an object already built (Hydra instantiates the nodes
    nested in a stage's options, ``_recursive_`` being on by default) as it is."""
    from collections.abc import Mapping

    from omegaconf import DictConfig

    return instantiate(node) if isinstance(node, (Mapping, DictConfig)) else node


def _plain(node):
    """A config node (DictConfig / dict / None) as plain JSON-able Python."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _source_records(source: dict | None, default) -> tuple:
    """``(records, read)``: the records of a :mod:`mmllm.data.vlm_data` source node (lazily, bad
    samples counted), else ``default()``; ``read()`` describes what was read, for the record."""
    if source is None:
        return default(), lambda: "scikit-image"
    from mmllm.data.vlm_data import ReadStats, iter_records

    stats = ReadStats()
    src = _built(source)
    name = f"{type(src).__module__}.{type(src).__name__}"
    return iter_records(src, stats), lambda: {"source": name, **stats.counts,
                                              "first_skipped": [list(e) for e in stats.examples[:5]]}


def _train(ctx: StageContext, module, loader, steps: int, lr: float, *, phase: str | None = None) -> dict:
    """Fits ``module`` for ``steps`` optimizer steps (the pipeline's ``stage_trainer``: device,
    precision, loggers under ``<run>/logs/<stage>``); first/last losses, time, samples/s."""
    import lightning as L

    from mmllm.stages.trainer import stage_trainer

    losses: list[float] = []

    class _Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module.optimizer_factory = lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    # No gradient clipping: the stages were tuned without it.
    trainer = stage_trainer(ctx, max_steps=steps, phase=phase, callbacks=[_Losses()], limit_val_batches=0,
                            gradient_clip_val=None)
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - t0
    k = max(1, len(losses) // 5)
    return {"steps": trainer.global_step, "first_loss": round(sum(losses[:k]) / k, 4),
            "final_loss": round(sum(losses[-k:]) / k, 4), "seconds": round(seconds, 1),
            "samples_per_s": round(module.samples_seen / seconds, 1), "trainer": trainer}


class VisionPretrainStage(Stage):
    """Trains a CLIP ViT from scratch with the contrastive ClipLoss on image-caption pairs.

    Args:
        model_cfg: open_clip architecture (None: :data:`mmllm.nn.vision.TINY_VIT`).
        steps: optimizer steps.
        batch_size: pairs per step (all pairs when there are fewer).
        lr: AdamW learning rate.
    """

    def __init__(self, *, model_cfg: dict | None = None, steps: int = 60, batch_size: int = 32,
                 lr: float = 1e-3) -> None:
        from mmllm.nn.vision import TINY_VIT

        self.model_cfg, self.steps = dict(model_cfg or TINY_VIT), steps
        self.batch_size, self.lr = batch_size, lr

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"checkpoint": ctx.dir / "clip.pt", "config": ctx.dir / "clip.json"}

    def run(self, ctx: StageContext) -> None:
        import open_clip
        from open_clip.loss import ClipLoss

        from mmllm.data.vlm_collate import skimage_records
        from mmllm.nn.vision import create_clip

        seed = ctx.cfg.get("seed") or 0
        torch.manual_seed(seed)
        model, train_tf, val_tf, name = create_clip(model_cfg=self.model_cfg)
        tokenize = open_clip.get_tokenizer(name)
        pairs = skimage_records()  # augmented copies (flips, crops) share their caption
        captions = sorted({r["caption"] for r in pairs})
        texts = tokenize(captions)  # (C, L), one row per distinct caption
        target = torch.tensor([captions.index(r["caption"]) for r in pairs])
        eval_images = torch.stack([val_tf(r["images"][0]) for r in pairs])
        before = _retrieval_top1(model, eval_images, texts, target)
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.1)
        loss_fn, gen = ClipLoss(), torch.Generator().manual_seed(seed)
        losses, t0 = [], time.perf_counter()
        model.train()
        bar = tqdm(range(self.steps), desc="vision pretrain", unit="step", leave=False)
        for _ in bar:
            idx = _distinct_captions(torch.randperm(len(pairs), generator=gen), target, self.batch_size)
            images = torch.stack([train_tf(pairs[i]["images"][0]) for i in idx])  # augmented
            img_f, txt_f, scale = model(images, texts[target[idx]])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
        after = _retrieval_top1(model, eval_images, texts, target)
        paths = self.outputs(ctx)
        paths["checkpoint"].parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), paths["checkpoint"])
        paths["config"].write_text(json.dumps({"model_cfg": self.model_cfg, "open_clip_name": name}))
        ctx.record["vision_pretrain"] = {
            "pairs": len(pairs), "captions": len(captions), "steps": self.steps, "first_loss": round(losses[0], 4),
            "final_loss": round(losses[-1], 4), "retrieval_top1_before": before,
            "retrieval_top1_after": after, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"vision_pretrain: ClipLoss {losses[0]:.3f} -> {losses[-1]:.3f}, image->text top-1 "
              f"{before:.2f} -> {after:.2f} on {len(pairs)} pairs")


def _distinct_captions(order: torch.Tensor, target: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` pairs of ``order`` with distinct captions: ClipLoss's positives are the
    diagonal, so two images of one caption in a batch would be pushed apart."""
    seen, out = set(), []
    for i in order.tolist():
        if int(target[i]) not in seen:
            seen.add(int(target[i]))
            out.append(i)
            if len(out) == n:
                break
    return torch.tensor(out)


@torch.no_grad()
def _retrieval_top1(model, images: torch.Tensor, texts: torch.Tensor, target: torch.Tensor) -> float:
    """Image->text top-1 accuracy: image i's caption is row ``target[i]`` of ``texts``."""
    model.eval()
    img_f, txt_f, _ = model(images, texts)
    hits = (img_f @ txt_f.T).argmax(dim=1) == target
    return round(float(hits.float().mean()), 4)


class VLMStage1Stage(Stage):
    """VLM stage 1: connector alignment on captions with the encoder and LM frozen (feature cache).

    Args:
        connector: a connector node (``_target_`` + options, as mmllm/conf/model/connector/*);
            in_dim/out_dim are filled in.
        vision: VisionEncoder options (architecture/weights come from vision_pretrain when run).
        steps, batch_size, lr: training.
        instruction_prob: share of captions preceded by a sampled instruction.
        source: image-caption records of your own instead of scikit-image's: a source node of
            :mod:`mmllm.data.vlm_data` (``WebDatasetSource`` for LAION/CC-style shards,
            ``CocoCaptionsSource``, ...), read once into the feature cache (bad samples counted).
    """

    optional_inputs = ("vision_pretrain", "sft", "pretrain", "tokenize")
    config_keys = ("seed", "stage_trainer")
    config_ignore = STAGE_TRAINER_IGNORE

    def __init__(self, *, connector: dict | None = None, vision: dict | None = None, steps: int = 40,
                 batch_size: int = 8, lr: float = 2e-3, instruction_prob: float = 0.5,
                 source: dict | None = None) -> None:
        self.source = source
        self.connector = dict(connector or {"_target_": "mmllm.nn.connectors.MLPConnector"})
        self.vision = dict(vision or {"feature_layer": -2, "keep_cls": False})
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.instruction_prob = instruction_prob

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"connector": ctx.dir / "connector.safetensors", "tokenizer": ctx.dir / "tokenizer",
                "feature_cache": ctx.dir / "feature_cache"}

    def run(self, ctx: StageContext) -> None:
        from torch.utils.data import DataLoader

        from mmllm.data.feature_cache import FeatureCache, build_feature_cache
        from mmllm.data.vlm_collate import (
            VLMCollator,
            add_vlm_tokens,
            skimage_records,
            vlm_token_ids,
        )
        from mmllm.models.vlm import build_vlm
        from mmllm.modules.vlm import VisionLanguageModule

        torch.manual_seed(ctx.cfg.get("seed") or 0)
        paths = self.outputs(ctx)
        lm, tok = _lm_and_tokenizer(ctx)
        add_vlm_tokens(tok)
        encoder = _encoder(ctx, self.vision)
        connector = instantiate(self.connector, in_dim=encoder.width, out_dim=lm.dim)
        vlm = build_vlm(connector=connector, image_token_id=vlm_token_ids(tok)[1],
                        vocab_size=len(tok), lm=lm, vision=encoder)
        records, read = _source_records(self.source, skimage_records)
        # A cache of the same encoder is reused (a rerun after a crash) only if it holds the same records.
        stamp, source = paths["feature_cache"] / "source.json", json.dumps(_plain(self.source), sort_keys=True)
        same = stamp.is_file() and stamp.read_text() == source
        build_feature_cache(encoder, records, paths["feature_cache"], overwrite=not same)
        stamp.write_text(source)
        cache = FeatureCache(paths["feature_cache"], encoder_fingerprint=encoder.fingerprint())
        collate = VLMCollator(tok, num_image_tokens=vlm.num_image_tokens,
                              instruction_prob=self.instruction_prob, seed=ctx.cfg.get("seed") or 0)
        loader = DataLoader(cache, batch_size=self.batch_size, shuffle=True, collate_fn=collate)
        module = VisionLanguageModule(model=vlm, train_llm=False)
        result = _train(ctx, module, loader, self.steps, self.lr)
        result.pop("trainer")
        connector.save(paths["connector"])
        tok.save_pretrained(str(paths["tokenizer"]))
        ctx.record["vlm_stage1"] = {**result, "connector": type(connector).__name__,
                                    "image_tokens": vlm.num_image_tokens, "records": len(cache),
                                    "source": read(),
                                    "trainable_params": sum(p.numel() for p in module.trainable_parameters().values())}
        print(f"vlm_stage1 ({type(connector).__name__}): loss {result['first_loss']} -> "
              f"{result['final_loss']} in {result['steps']} steps")


class VLMStage2Stage(Stage):
    """VLM stage 2: instruction tuning of connector + LM (full or LoRA) on image conversations.

    Trains on the hand-written conversations about the bundled images and, with
    ``instructions``, on visual instructions a teacher generates for them (LLaVA's recipe, see
    :mod:`mmllm.stages.vlm_instruct`); a few generated questions are held out, answered by the
    trained model and scored against their reference answers by a judge teacher (LLaVA-Bench's
    relative score). The greedy captions are scored with BLEU / CIDEr.

    Args:
        steps, batch_size, lr: training.
        lora: peft LoraConfig options (None: full fine-tuning of the LM).
        chat_template: None (the tokenizer's, LLaVA multi-turn) or "minigpt4".
        num_captions: images captioned greedily after training (recorded, BLEU / CIDEr).
        export_llava: also write the HF LLaVA directory (linear/MLP connectors).
        instructions: None (hand-written conversations only, no judge) or generation options:
            ``teacher`` (a teacher node; None: the offline
            :class:`~mmllm.data.visual_template_teacher.VisualTemplateTeacher`), ``kinds``
            (default all three), ``eval_items`` (generated entries held out for the judge, 6).
        judge: the judge's teacher node (None: a :class:`~mmllm.teacher.LocalTeacher` over the
            pipeline's latest LM checkpoint, sft's else pretrain's, failed requests counted).
        judge_options: :class:`~mmllm.eval.vlm_judge.VLMJudge` kwargs (the default judge gets
            ``sampling: {temperature: 0, max_tokens: 24}`` unless given: a score line is short).
        answer_tokens: most new tokens of the model's answers to the held-out questions.
        caption_tokenizer: :func:`~mmllm.eval.vlm_judge.caption_metrics` tokenizer ("simple",
            "ptb" needs Java, "auto").
        source: conversation records of your own instead of the hand-written ones: a source node
            of :mod:`mmllm.data.vlm_data` (``LlavaInstructSource`` for LLaVA-Instruct JSON, or a
            caption source), read into memory (bad samples counted). For LLaVA-665K scale use
            ``mmllm train experiment=vlm_stage2``, which streams.
    """

    inputs = ("vlm_stage1",)
    optional_inputs = ("vision_pretrain", "sft", "pretrain", "tokenize")
    config_keys = ("seed", "stage_trainer")
    config_ignore = STAGE_TRAINER_IGNORE
    INSTRUCTION_KEYS = ("teacher", "kinds", "eval_items")

    def __init__(self, *, steps: int = 40, batch_size: int = 4, lr: float = 1e-3,
                 lora: dict | None = None, chat_template: str | None = None,
                 num_captions: int = 3, export_llava: bool = True, instructions: dict | None = None,
                 judge: dict | None = None, judge_options: dict | None = None,
                 answer_tokens: int = 32, caption_tokenizer: str = "simple",
                 source: dict | None = None) -> None:
        self.source = source
        self.steps, self.batch_size, self.lr, self.lora = steps, batch_size, lr, lora
        self.chat_template, self.num_captions, self.export = chat_template, num_captions, export_llava
        if instructions is not None:
            unknown = sorted(set(instructions) - set(self.INSTRUCTION_KEYS))
            if unknown:
                raise ValueError(f"unknown instructions options {unknown}; expected some of "
                                 f"{self.INSTRUCTION_KEYS}")
            instructions = dict(instructions)
        self.instructions, self.judge = instructions, judge
        self.judge_options = dict(judge_options or {})
        self.answer_tokens, self.caption_tokenizer = answer_tokens, caption_tokenizer

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        out = {"connector": ctx.dir / "connector.safetensors", "checkpoint": ctx.dir / "vlm.pt"}
        if self.instructions is not None:
            out.update(instructions=ctx.dir / "instructions.json", heldout=ctx.dir / "heldout.json",
                       images=ctx.dir / "images", judged=ctx.dir / "judged.json")
        return {**out, "llava": ctx.dir / "llava"} if self.export else out

    def run(self, ctx: StageContext) -> None:
        from torch.utils.data import DataLoader

        from mmllm.checkpoint import load_tokenizer_from
        from mmllm.data.vlm_collate import VLMCollator, skimage_records, vlm_token_ids
        from mmllm.models.vlm import build_vlm
        from mmllm.modules.vlm import VisionLanguageModule
        from mmllm.nn.connectors import load_connector

        torch.manual_seed(ctx.cfg.get("seed") or 0)
        paths = self.outputs(ctx)
        lm, _ = _lm_and_tokenizer(ctx)
        tok = load_tokenizer_from(ctx.output("vlm_stage1", "tokenizer"))
        stage1 = ctx.markers["vlm_stage1"]
        encoder = _encoder(ctx, {"feature_layer": -2, "keep_cls": False})
        connector = load_connector(ctx.output("vlm_stage1", "connector"))
        vlm = build_vlm(connector=connector, image_token_id=vlm_token_ids(tok)[1],
                        vocab_size=len(tok), lm=lm, vision=encoder)
        records, read = _source_records(self.source, partial(skimage_records, chat=True))
        records = list(records)
        generated, items, gen_record = self._generated(ctx)
        collate = VLMCollator(tok, num_image_tokens=vlm.num_image_tokens,
                              image_transform=encoder.preprocess, chat_template=self.chat_template)
        loader = DataLoader(records + generated, batch_size=self.batch_size, shuffle=True,
                            collate_fn=collate)
        module = VisionLanguageModule(model=vlm, train_llm=True, lora=self.lora)
        result = _train(ctx, module, loader, self.steps, self.lr)
        result.pop("trainer")
        module.merge_lora()
        vlm = module.model.eval()
        connector.save(paths["connector"])
        # The layout load_vlm reads, plus the kit metadata load_model / `mmllm chat` / `mmllm serve`
        # read (the tokenizer with the image tokens is vlm_stage1's, recorded relative to this file).
        torch.save({"model_config": vlm.config, "state_dict": vlm.state_dict(),
                    "mmllm": {"model_class": "mmllm.models.vlm.VisionLanguageModel",
                              "model_config": vlm.config, "tokenizer": "../vlm_stage1/tokenizer"}},
                   paths["checkpoint"])
        captions = self._captions(vlm, tok, collate, encoder, ctx.dir)
        rec = ctx.record["vlm_stage2"] = {
            **result, "conversations": len(records) + len(generated), "handwritten": len(records),
            "source": read(),
            "lora": bool(self.lora), "captions": captions,
            "stage1_loss": stage1.record.get("vlm_stage1", {}).get("final_loss"),
            "caption_metrics": caption_scores(captions, tokenizer=self.caption_tokenizer)}
        if self.instructions is not None:
            rec["instructions"] = gen_record
            rec["judge"] = self._judge(ctx, vlm, tok, collate, encoder, items)
        if self.export:
            from mmllm.models.hf_llava import export_llava

            ctx.record["llava_export"] = str(export_llava(vlm, paths["llava"], tokenizer=tok))
        print(f"vlm_stage2: loss {result['first_loss']} -> {result['final_loss']}; captions: "
              f"{captions}; judge: {rec.get('judge', {}).get('relative')}")

    def _generated(self, ctx: StageContext) -> tuple[list[dict], list[dict], dict]:
        """Training records and held-out items of the generated instructions (none without them)."""
        if self.instructions is None:
            return [], [], {}
        from mmllm.data.visual_instruct import KINDS
        from mmllm.data.visual_template_teacher import VisualTemplateTeacher

        node = self.instructions.get("teacher")
        teacher = _built(node) if node is not None else VisualTemplateTeacher()
        try:
            records, items, record = generate_instructions(
                ctx.dir, teacher=teacher, kinds=list(self.instructions.get("kinds") or KINDS),
                eval_items=int(self.instructions.get("eval_items", 6)), seed=ctx.cfg.get("seed") or 0)
        finally:
            teacher.close()
        record["teacher"] = teacher.model
        return records, items, record

    def _judge(self, ctx: StageContext, vlm, tok, collate, encoder, items: list[dict]) -> dict:
        """The judge's scores of the model's answers to the held-out questions."""
        from mmllm.teacher import LocalTeacher

        options = dict(self.judge_options)
        if self.judge is None:
            teacher = LocalTeacher(checkpoint=str(_lm_checkpoint(ctx)), on_error="skip")
            options.setdefault("sampling", {"temperature": 0.0, "max_tokens": 24})
        else:
            teacher = _built(self.judge)
        answered = answer_items(vlm, tok, collate, encoder, items, stop=_stop_ids(tok),
                                max_new_tokens=self.answer_tokens)
        try:
            out = judge_items(answered, teacher=teacher, judge_options=options,
                              out_path=self.outputs(ctx)["judged"])
        finally:
            teacher.close()
        return {"teacher": teacher.model, **out}

    def _captions(self, vlm, tok, collate, encoder, out_dir: Path) -> list[dict]:
        from mmllm.data.vlm_collate import IMAGE_PLACEHOLDER, skimage_records

        question = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\nDescribe the picture."}]
        prompt = collate.prompt_ids(question, 1)
        picked, seen = [], set()
        for rec in skimage_records():  # distinct images (the records also hold flips and crops)
            if len(picked) >= self.num_captions:
                break
            if rec["caption"] not in seen:
                seen.add(rec["caption"])
                picked.append(rec)
        if not picked:
            return []
        new = vlm.generate([prompt] * len(picked), [encoder.preprocess_images(r["images"]) for r in picked],
                           max_new_tokens=16, eos_token_id=_stop_ids(tok), pad_token_id=collate.pad_id,
                           progress="captions")
        out = []
        for k, (rec, ids) in enumerate(zip(picked, new)):
            image = out_dir / f"sample{k}.png"  # shown beside its caption in the report
            rec["images"][0].convert("RGB").save(image)
            out.append({"image": str(image), "reference": rec["caption"],
                        "generated": tok.decode(ids, skip_special_tokens=True)})
        return out


def _stop_ids(tok) -> list[int]:
    """A turn ends at eos or the template's end-of-turn token (ChatML's <|im_end|>)."""
    from mmllm.data.special_tokens import SPECIAL_TOKENS

    end = tok.get_vocab().get(SPECIAL_TOKENS.chat_end)
    return [tok.eos_token_id] + ([end] if end is not None else [])
