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

TEXTS = [("The river runs through the old town and past the stone bridge near the market square today. "
         "A second sentence that is long enough to give a prompt and a continuation of eight words here.")]


def test_derived_sets_prefer_the_reference(tmp_path):
    pmp, comp = write_preference_sets(TEXTS * 3, tmp_path, pmp_prompts=1, rm_prompts=1, seed=0)
    row = json.loads(pmp.read_text().splitlines()[0])
    assert row["question"].startswith("Continue the text: ") and len(row["answers"]) == 3
    pair = json.loads(comp.read_text().splitlines()[0])
    assert pair["prompt"] != row["question"]  # disjoint prompts
    ref = next(a["text"] for a in row["answers"])
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
    """The stage's mechanics on a random-init backbone (accuracy needs a pretrained one: it is
    recorded, not asserted here; learning itself is tested in test_reward.py)."""
    from mmllm.data.preference import PreferenceDataModule
    from mmllm.modules.reward import load_reward_model

    run, markers = pretrain_run
    ctx = StageContext(name="reward_model", run_dir=run, cfg=OmegaConf.create({"seed": 0}), markers=markers)
    stage = RewardModelStage(pmp_steps=4, rm_steps=8, pmp_prompts=40, rm_prompts=80)
    stage.run(ctx)
    rec = ctx.record["reward_model"]
    assert ctx.record["backbone"].endswith("final.ckpt")
    assert ctx.record["pmp"]["steps"] == 4 and rec["steps"] == 8 and rec["val_prompts"] > 5
    for key in ("val_reward_acc", "val_reward_acc_before", "val_margin"):
        assert rec[key] is not None and (0.0 <= rec[key] <= 1.0 or key == "val_margin")
    for path in stage.outputs(ctx).values():
        assert path.exists(), path
    # The RM started from the PMP model (its head kept) and was normalised on the held-out pairs.
    scorer = load_reward_model(stage.outputs(ctx)["checkpoint"])
    assert scorer.reward_offset == pytest.approx(rec["reward_offset"])
    dm = PreferenceDataModule(sources=[{"name": "comparisons", "path": str(stage.outputs(ctx)["comparisons"])}],
                              tokenizer=str(run / "tokenizer"), cache_dir=str(run / "check"), val_fraction=0.2)
    dm.examples = dm.read_sources()
    refs = dm.val_responses()
    assert len(refs) == 2 * rec["val_prompts"]
    assert abs(scorer([p for p, _ in refs], [r for _, r in refs]).mean().item()) < 1e-4
