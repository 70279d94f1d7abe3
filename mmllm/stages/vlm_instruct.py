"""Stage 2's generated visual instructions and its evaluation (LLaVA's data recipe, LLaVA-Bench).

* :func:`generate_instructions`: image contexts of the bundled images -> a teacher writes
  conversations / detailed descriptions / reasoning questions
  (:class:`~mmllm.data.visual_instruct.VisualInstructGenerator`, failed generations filtered) ->
  LLaVA JSON in the stage directory, read back with
  :class:`~mmllm.data.vlm_data.LlavaInstructSource` for training; a few generated questions per
  kind are held out for evaluation.
* :func:`answer_items`: the trained VLM answers the held-out questions (greedy, short).
* :func:`judge_items`: a judge teacher scores model answer vs reference answer 1-10
  (:class:`~mmllm.eval.vlm_judge.VLMJudge`); the relative score per kind and overall is recorded
  with the counts of failed requests and unparseable replies (counted, never scored).
* :func:`caption_scores`: BLEU / CIDEr of the stage's greedy captions.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch


def _kept_by_kind(entries: Sequence[dict]) -> dict[str, list[dict]]:
    by_kind: dict[str, list[dict]] = {}
    for e in entries:
        by_kind.setdefault(e["id"].rsplit("-", 1)[1], []).append(e)
    return by_kind


def hold_out(entries: Sequence[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: ``n`` entries held out, spread over the kinds in turn (seeded)."""
    by_kind = _kept_by_kind(entries)
    rng = random.Random(seed)
    pools = {k: rng.sample(v, len(v)) for k, v in sorted(by_kind.items())}
    held: list[dict] = []
    while len(held) < n and any(pools.values()):
        for pool in pools.values():
            if pool and len(held) < n:
                held.append(pool.pop())
    ids = {e["id"] for e in held}
    return [e for e in entries if e["id"] not in ids], held


def generate_instructions(out_dir: Path, *, teacher, kinds: Sequence[str], eval_items: int,
                          seed: int) -> tuple[list[dict], list[dict], dict]:
    """Generates, filters and writes visual instructions about the bundled images.

    Args:
        out_dir: the stage directory (``images/``, ``instructions.json``, ``heldout.json``).
        teacher: the :class:`~mmllm.teacher.Teacher` that writes them.
        kinds: of "conversation", "detail", "complex".
        eval_items: generated entries held out (their first question and answer) for the judge.
        seed: generator and hold-out seed.

    Returns:
        ``(train records, eval items, record)``: training records as the LLaVA reader yields
        them; eval items ``{"id", "category", "image", "question", "reference", "context"}``;
        the record of generated / kept / filtered counts per kind and the filter reasons.
    """
    from mmllm.data.visual_instruct import VisualInstructGenerator, write_llava_json
    from mmllm.data.visual_template_teacher import skimage_contexts
    from mmllm.data.vlm_data import LlavaInstructSource, ReadStats

    image_dir = out_dir / "images"
    contexts = skimage_contexts(image_dir)
    gen = VisualInstructGenerator(teacher=teacher, kinds=kinds, seed=seed)
    entries = gen.generate(contexts)
    train, held = hold_out(entries, eval_items, seed)
    path = write_llava_json(train, out_dir / "instructions.json")
    write_llava_json(held, out_dir / "heldout.json")
    source, stats = LlavaInstructSource(path=str(path), image_dir=str(image_dir)), ReadStats()
    records = [r for u in source.units() for r in source.read_unit(u, stats=stats) if r]
    text = {c.id or c.image: c.text() for c in contexts}
    items = [{"id": e["id"], "category": e["id"].rsplit("-", 1)[1], "image": str(image_dir / e["image"]),
              "question": e["conversations"][0]["value"], "reference": e["conversations"][1]["value"],
              "context": text[e["id"].rsplit("-", 1)[0]]} for e in held]
    kept = Counter(e["id"].rsplit("-", 1)[1] for e in entries)
    record = {"images": len(contexts), "generated": {k: len(contexts) for k in gen.kinds},
              "kept": {k: kept[k] for k in gen.kinds},
              "filtered": {k: len(contexts) - kept[k] for k in gen.kinds},
              "filter_reasons": {k: v for k, v in sorted(gen.stats.items()) if not k.startswith("kept_")},
              "train_entries": len(records), "read_skipped": stats.skipped, "held_out": len(items)}
    return records, items, record


@torch.no_grad()
def answer_items(vlm, tok, collate, encoder, items: Sequence[dict], *, stop: Sequence[int],
                 max_new_tokens: int = 32) -> list[dict]:
    """Items with the VLM's greedy ``answer`` to each ``question`` about its ``image`` (one batch)."""
    from PIL import Image

    if not items:
        return []
    prompts = [collate.prompt_ids([{"role": "user", "content": it["question"]}], 1) for it in items]
    images = []
    for it in items:
        with Image.open(it["image"]) as im:
            images.append(encoder.preprocess_images([im.convert("RGB")]))
    new = vlm.generate(prompts, images, max_new_tokens=max_new_tokens, eos_token_id=list(stop),
                       pad_token_id=collate.pad_id, progress="VLM answers")
    return [{**it, "answer": tok.decode(ids, skip_special_tokens=True).strip()} for it, ids in zip(items, new)]


def _finite(x):
    """Floats rounded, NaN (nothing scored) as None, counts as they are: a JSON record."""
    if isinstance(x, float):
        return round(x, 2) if math.isfinite(x) else None
    return x


def judge_items(items: Sequence[dict], *, teacher, judge_options: Mapping | None = None,
                out_path: Path | None = None) -> dict:
    """LLaVA-Bench scores of the items' answers (``VLMJudge(teacher=teacher, **judge_options)``).

    The ``<image>`` placeholder is taken out of the question the judge sees (it reads the image
    as its ``context``). An empty model answer is judged like any other (it should score low).

    Returns:
        ``{"requests", "parsed_replies", "failed_requests", "unparsed", "scored", "relative",
        "overall", "by_kind": {kind:
        {"model", "reference", "relative", "n", "unscored"}}}``; a relative score is None when
        no reply could be parsed. ``out_path`` gets every item with its scores and explanations.
    """
    from mmllm.data.vlm_collate import IMAGE_PLACEHOLDER
    from mmllm.eval.vlm_judge import VLMJudge, summarize

    judge = VLMJudge(teacher=teacher, **dict(judge_options or {}))
    clean = [{**it, "question": it["question"].replace(IMAGE_PLACEHOLDER, "").strip()} for it in items]
    failed_before = teacher.stats["failed"]
    judged = judge.judge(clean)
    summary = {k: {m: _finite(v) for m, v in s.items()} for k, s in summarize(judged).items()}
    failed = teacher.stats["failed"] - failed_before
    requests = len(items) * (2 if judge.both_orders else 1)
    failures = sum(j.failures for j in judged)
    if out_path is not None:
        rows = [{**it, "model_score": j.model_score, "reference_score": j.reference_score,
                 "explanations": j.explanations, "failures": j.failures} for it, j in zip(clean, judged)]
        out_path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    overall = summary.pop("all", {"relative": None})
    return {"requests": requests, "parsed_replies": requests - failures, "failed_requests": failed,
            "unparsed": max(0, failures - failed),
            "scored": sum(j.model_score is not None for j in judged), "relative": overall["relative"],
            "overall": overall, "by_kind": summary}


def caption_scores(captions: Sequence[dict], *, tokenizer: str = "simple") -> dict:
    """BLEU-1..4 and CIDEr of ``{"generated", "reference"}`` captions (one reference each)."""
    from mmllm.eval.vlm_judge import caption_metrics

    if not captions:
        return {}
    preds = {str(i): c["generated"] for i, c in enumerate(captions)}
    refs = {str(i): [c["reference"]] for i, c in enumerate(captions)}
    return {k: round(v, 4) for k, v in caption_metrics(preds, refs, tokenizer=tokenizer).items()}
