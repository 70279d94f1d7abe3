"""DPO: loss log 2 while the policy equals its reference, the implicit reward learns the synthetic
preference, and the component composes with mmllm's configs through one search-path override."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch

from components.dpo.module import DPOModule
from mmllm.data.preference import PreferenceDataModule
from mmllm.models import DecoderLM

TINY = {"vocab_size": 512, "dim": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 64, "max_seq_len": 128}


def synthetic_dm(root) -> PreferenceDataModule:
    src = {"name": "synthetic", "path": str(root / "s.jsonl"), "synthetic": {"num_prompts": 300, "k": 2, "seed": 0}}
    return PreferenceDataModule(sources=[src], vocab_size=512, seq_len=96, batch_size=8, labels=True,
                                end_token=None, cache_dir=str(root / "cache"), val_fraction=0.15)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    dm = synthetic_dm(root)
    L.seed_everything(0)
    module = DPOModule(model=partial(DecoderLM, **TINY), beta=0.5,
                       optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0))
    trainer = L.Trainer(accelerator="cpu", max_steps=30, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=30,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    return dm, module, before, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_policy_equal_to_reference_has_loss_log2(trained):
    _, _, before, _ = trained
    # Before any step the policy is its reference: every implicit reward is 0, loss = log 2.
    assert before["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["val/margin"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_learns_the_preference(trained):
    _, module, _, after = trained
    print("DPO after 30 steps:", {k: round(v, 3) for k, v in after.items() if k.startswith("val/")})
    assert after["val/reward_acc"] > 0.75 and after["val/margin"] > 0.0
    assert after["val/loss"] < math.log(2)
    # The reference stayed frozen and outside the optimizer and the checkpoint.
    assert not any(p.requires_grad for p in module.reference.parameters())
    assert all(not k.startswith("_ref") for k in module.state_dict())


def test_component_composes_with_one_override(tmp_path):
    from hydra.utils import instantiate

    from mmllm.config import check_config, compose_config

    cfg = compose_config("train", ["experiment=dpo", "debug=tiny"], output_dir=tmp_path / "run",
                         data_dir=tmp_path / "data")
    check_config(cfg)
    assert cfg.module._target_ == "components.dpo.module.DPOModule" and cfg.data.labels
    module = instantiate(cfg.module, model=instantiate(cfg.model.lm, _partial_=True))
    assert isinstance(module, DPOModule) and module.beta == 0.1
