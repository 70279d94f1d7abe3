"""The reward_model pipeline stage on a tiny pretrain checkpoint: derived PMP + comparison sets,
two training phases, held-out accuracy recorded, a reloadable normalised RM checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from mmllm.stages.base import Marker, StageContext
from mmllm.stages.reward import RewardModelStage, continuation_tasks, corrupt, write_preference_sets

TEXTS = ["The river runs through the old town and past the stone bridge near the market square today. "
         "A second sentence that is long enough to give a prompt and a continuation of eight words here."]


def test_derived_sets_prefer_the_reference(tmp_path):
    pmp, comp = write_preference_sets(TEXTS * 3, tmp_path, pmp_prompts=1, rm_prompts=1, seed=0)
    row = json.loads(pmp.read_text().splitlines()[0])
    assert row["question"].startswith("Continue the text: ") and len(row["answers"]) == 3
    pair = json.loads(comp.read_text().splitlines()[0])
    assert pair["prompt"] != row["question"]  # disjoint prompts
    ref = [a["text"] for a in row["answers"]][0]
    assert sorted(corrupt(ref, "shuffle", random.Random(0)).split()) == sorted(ref.split())
    assert corrupt(ref, "shuffle", random.Random(0)) != ref
    rep = corrupt("a b c d e f g h", "repeat", random.Random(0))
    assert rep == "a b b b b b b b"
    with pytest.raises(ValueError, match="only 2 sentences"):
        continuation_tasks(TEXTS, num=3)


@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A run directory with a tokenize and a pretrain marker (tiny model, kit checkpoint format)."""
    from mmllm.data.corpora import wikipedia_articles
    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.models import DecoderLM

    run = tmp_path_factory.mktemp("pipeline_run")
    texts = [a["text"] for _, a in zip(range(20), wikipedia_articles())]
    tok = train_bpe_tokenizer(texts, vocab_size=512, show_progress=False)
    tok.save_pretrained(str(run / "tokenizer"))
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=len(tok), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      hidden_dim=128, max_seq_len=128, tie_embeddings=True)
    ckpt = run / "checkpoints" / "final.ckpt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": model.config,
                          "tokenizer": "../tokenizer"}}, ckpt)
    markers = {name: Marker(stage=name, target="x", fingerprint="f", run_id=name, started_at="", finished_at="",
                            seconds=0.0, outputs=outputs, record={}, config_updates={}, config={})
               for name, outputs in (("tokenize", {"tokenizer": "tokenizer"}),
                                     ("pretrain", {"checkpoint": "checkpoints/final.ckpt"}))}
    return run, markers


def test_reward_model_stage(pretrain_run):
    from mmllm.modules.reward import load_reward_model

    run, markers = pretrain_run
    ctx = StageContext(name="reward_model", run_dir=run, cfg=OmegaConf.create({"seed": 0}), markers=markers)
    stage = RewardModelStage(pmp_steps=15, rm_steps=30, pmp_prompts=120, rm_prompts=200, lr=3e-3)
    stage.run(ctx)
    rec = ctx.record["reward_model"]
    print(json.dumps(ctx.record, indent=1))
    assert ctx.record["backbone"].endswith("final.ckpt")
    assert ctx.record["pmp"]["val_reward_acc"] is not None and rec["val_prompts"] > 20
    assert rec["val_reward_acc"] > 0.75 and rec["val_reward_acc"] > rec["val_reward_acc_before"]
    for path in stage.outputs(ctx).values():
        assert path.exists(), path
    scorer = load_reward_model(stage.outputs(ctx)["checkpoint"])
    assert scorer.reward_offset == pytest.approx(rec["reward_offset"])
    prompt = "Continue the text: The river runs through the old"
    good, bad = scorer([prompt] * 2, ["town and past the stone bridge near", "town town town town town town town"])
    assert good > bad
