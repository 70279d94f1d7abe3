"""The vision_pretrain -> vlm_stage1 -> vlm_stage2 pipeline stages, each on its own StageContext,
on a tiny LM checkpoint standing for the pretrain stage's (scikit-image pairs, tiny ViT)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import skimage_records
from mmllm.models import DecoderLM
from mmllm.stages import Marker, StageContext
from mmllm.stages.vlm import VisionPretrainStage, VLMStage1Stage, VLMStage2Stage


def _marker(name: str, outputs: dict, record: dict | None = None) -> Marker:
    return Marker(stage=name, target="test", fingerprint="f", run_id=name, started_at="0",
                  finished_at="1", seconds=0.0, outputs={k: str(v) for k, v in outputs.items()},
                  record=record or {}, config_updates={}, config={})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory with a 'pretrain' marker: a kit-format checkpoint of a tiny LM + tokenizer."""
    run = tmp_path_factory.mktemp("run")
    captions = " ".join(r["caption"] for r in skimage_records()) + " Describe the picture. What is this?"
    tok = train_bpe_tokenizer([captions] * 20, vocab_size=400, show_progress=False)
    tok.save_pretrained(str(run / "tokenizer"))
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                   max_seq_len=256, tie_embeddings=True)
    ckpt = run / "checkpoints" / "final.ckpt"
    ckpt.parent.mkdir()
    torch.save({"mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": lm.config,
                          "tokenizer": "../tokenizer"},
                "state_dict": {f"model.{k}": v for k, v in lm.state_dict().items()}}, ckpt)
    return run, {"pretrain": _marker("pretrain", {"checkpoint": ckpt})}


def _ctx(run_dir, name, markers):
    return StageContext(name=name, run_dir=run_dir, cfg=OmegaConf.create({"seed": 0}), markers=dict(markers))


def test_vision_language_stages(run):
    run_dir, markers = run
    vp = VisionPretrainStage(steps=15, batch_size=16, lr=3e-3)
    vp.name = "vision_pretrain"
    ctx = _ctx(run_dir, "vision_pretrain", markers)
    vp.run(ctx)
    rec = ctx.record["vision_pretrain"]
    assert rec["final_loss"] < rec["first_loss"]
    assert rec["retrieval_top1_after"] > rec["retrieval_top1_before"]
    assert all(p.exists() for p in vp.outputs(ctx).values())
    markers["vision_pretrain"] = _marker("vision_pretrain", vp.outputs(ctx))

    s1 = VLMStage1Stage(connector={"_target_": "mmllm.nn.connectors.MLPConnector"}, steps=12,
                        batch_size=8, lr=5e-3)
    s1.name = "vlm_stage1"
    ctx1 = _ctx(run_dir, "vlm_stage1", markers)
    s1.run(ctx1)
    r1 = ctx1.record["vlm_stage1"]
    assert r1["final_loss"] < r1["first_loss"], r1
    assert r1["image_tokens"] == 16 and r1["trainable_params"] == 32 * 32 + 32 + 32 * 32 + 32
    index = json.loads((s1.outputs(ctx1)["feature_cache"] / "index.json").read_text())
    assert index["num_images"] == r1["records"] and index["feature_shape"] == [16, 32]
    markers["vlm_stage1"] = _marker("vlm_stage1", s1.outputs(ctx1), ctx1.record)

    s2 = VLMStage2Stage(steps=8, batch_size=4, lr=5e-3, num_captions=2)
    s2.name = "vlm_stage2"
    ctx2 = _ctx(run_dir, "vlm_stage2", markers)
    s2.run(ctx2)
    r2 = ctx2.record["vlm_stage2"]
    assert r2["final_loss"] < r2["first_loss"] - 0.3, r2
    assert len(r2["captions"]) == 2 and all(isinstance(c["generated"], str) for c in r2["captions"])
    assert (s2.outputs(ctx2)["llava"] / "config.json").is_file()
