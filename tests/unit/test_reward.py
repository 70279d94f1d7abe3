"""Reward model: learns the synthetic preference (held-out pair accuracy far above chance), the
K-wise batch equals the pairwise computation, rewards are normalised and saved, checkpoints
reload as a scorer, and `mmllm train experiment=reward_model debug=tiny` runs."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from mmllm.data.preference import PreferenceCollate, PreferenceDataModule
from mmllm.losses.ranking import pairwise_ranking_loss, ranking_loss
from mmllm.models import DecoderLM
from mmllm.modules.reward import RewardModelModule, load_reward_model

TINY = {"vocab_size": 512, "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64,
            "max_seq_len": 128, "tie_embeddings": False}


def synthetic_dm(root, k: int = 3, num_prompts: int = 300) -> PreferenceDataModule:
    src = {"name": "synthetic", "path": str(root / f"synthetic_k{k}.jsonl"),
           "synthetic": {"num_prompts": num_prompts, "k": k, "seed": 0}}
    return PreferenceDataModule(sources=[src], vocab_size=512, seq_len=96, batch_size=8,
                                cache_dir=str(root / "cache"), val_fraction=0.15, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    dm = synthetic_dm(root)
    L.seed_everything(0)
    module = RewardModelModule(model=partial(DecoderLM, **TINY),
                               optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", save_last=True,
                                               every_n_train_steps=15)
    trainer = L.Trainer(accelerator="cpu", max_steps=30, logger=False, callbacks=[ckpt],
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=30,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0)
    dm.prepare_data()
    dm.setup("fit")
    module.tokenizer_path = dm.tokenizer_dir
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    return {"dm": dm, "module": module, "trainer": trainer, "before": before, "root": root,
            "after": {k: float(v) for k, v in trainer.callback_metrics.items()}}


def test_learns_the_preference_far_above_chance(trained):
    after, before = trained["after"], trained["before"]
    print("val/reward_acc before", before["val/reward_acc"], "after", after["val/reward_acc"])
    assert after["val/reward_acc"] > 0.75
    assert after["val/reward_acc"] > before["val/reward_acc"] + 0.2
    assert after["val/margin"] > 0.5 and after["val/loss"] < before["val/loss"]
    assert trained["module"].lm_head_removed  # untied head deleted: the model has no logits


def test_kwise_batch_equals_pairwise_forwards(trained):
    """One forward over a prompt's K = 3 responses (padded together) gives the same loss as a
    separate forward for every pair, averaged per prompt."""
    dm, module = trained["dm"], trained["module"]
    module.eval()
    items = dm._val[:2]
    collate = PreferenceCollate(pad_id=dm.tokenizer.pad_token_id)
    with torch.no_grad():
        batch = collate(items)
        loss, pairs = ranking_loss(module.scores(batch), batch["group"], batch["rank"])
        per_prompt = []
        for encoded, ranks in items:
            losses = []
            for i in range(3):
                for j in range(3):
                    if ranks[i] < ranks[j]:
                        b = collate([([encoded[i], encoded[j]], [0, 1])])
                        s = module.scores(b)
                        losses.append(pairwise_ranking_loss(s[:1], s[1:]))
            per_prompt.append(torch.stack(losses).mean())
    assert len(pairs) == 6
    assert loss.item() == pytest.approx(torch.stack(per_prompt).mean().item(), abs=1e-5)


def test_rewards_normalised_and_checkpoint_reloads_as_scorer(trained):
    dm, module = trained["dm"], trained["module"]
    last = trained["root"] / "checkpoints" / "last.ckpt"
    scorer = load_reward_model(last)
    assert scorer.reward_offset == pytest.approx(module.reward_offset) and module.reward_offset != 0.0
    refs = dm.val_responses()
    scores = scorer([p for p, _ in refs], [r for _, r in refs])
    assert abs(scores.mean().item()) < 1e-4  # the reference responses average 0
    # The scorer renders exactly as training did: same scores as the module on the same rows.
    module.eval()
    batch = PreferenceCollate(pad_id=0)(dm._val)
    with torch.no_grad():
        assert torch.allclose(module.scores(batch), scorer.model(batch["input_ids"], lengths=batch["lengths"]).scores,
                              atol=1e-5)
    # More "kind" words score higher: the scorer ranks a fresh triple correctly.
    s = scorer(["Describe the boat and the lamp."] * 3,
               ["kind river kind stone boat kind", "river kind stone boat lamp field", "river stone boat lamp field cloud"])
    assert s[0] > s[2] and s[1] > s[2]


def test_reward_model_experiment_runs(tmp_path):
    from mmllm.config import compose_config
    from mmllm.train import train

    cfg = compose_config("train", ["experiment=reward_model", "debug=tiny",
                                   "data.sources.0.synthetic.num_prompts=64", "trainer.max_steps=4",
                                   "trainer.val_check_interval=4", "model.lm.n_layers=1",
                                   "callbacks.model_checkpoint.every_n_train_steps=4"],
                         output_dir=tmp_path / "run", data_dir=tmp_path / "data")
    metrics = train(cfg)
    assert 0.0 <= metrics["val/reward_acc"] <= 1.0 and "train/margin" in metrics
    scorer = load_reward_model(tmp_path / "run")
    assert scorer(["hi"], ["kind words"]).shape == (1,)


def test_policy_normalisation_centres_the_sft_policys_samples(trained, tmp_path):
    """normalize="policy": the SFT policy (init_from) samples responses to the held-out prompts;
    after training those samples score 0 on average."""
    dm = trained["dm"]
    torch.manual_seed(0)
    policy = DecoderLM(**{**TINY, "tie_embeddings": True})
    ckpt = tmp_path / "sft.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in policy.state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM", "model_config": policy.config,
                          "tokenizer": str(dm.tokenizer_dir)}}, ckpt)
    module = RewardModelModule(init_from=str(ckpt), normalize="policy", normalize_samples=6,
                               normalize_max_new_tokens=6,
                               optimizer=partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.0))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    seqs = module.reference_sequences(dm)  # the same samples again (seeded)
    assert 0 < len(seqs) <= 6 and module.reward_offset != 0.0
    module.eval()
    from mmllm.modules.reward import score_sequences

    with torch.no_grad():
        assert abs(score_sequences(module.model, seqs).mean().item()) < 1e-4
