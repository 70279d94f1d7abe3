"""The pipeline's stage trainer: logs of every stage under one run, one wandb group, the GPU preset."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from mmllm.config import compose_config
from mmllm.errors import ConfigError
from mmllm.stages.base import StageContext
from mmllm.stages.trainer import run_group, stage_log_dir, stage_trainer


class _Regression(L.LightningModule):
    """y = 3x fitted by one weight: the logged loss must fall step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = ((self.w * x - y) ** 2).mean()
        self.log("train/loss", loss, on_step=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    x = torch.linspace(-1, 1, 32)
    return DataLoader(TensorDataset(x, 3 * x), batch_size=8)


def _ctx(tmp_path, cfg: dict | None = None, name: str = "sft") -> StageContext:
    run = tmp_path / "2026-01-01_00-00-00"
    return StageContext(name=name, run_dir=run, cfg=OmegaConf.create(cfg or {}), markers={})


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_csv_logs_of_a_stage_land_in_the_run(tmp_path):
    ctx = _ctx(tmp_path, {"stage_trainer": {"accelerator": "cpu", "log_every_n_steps": 1,
                                            "loggers": [{"_target_": "mmllm.loggers.CSVLogger"}]}})
    trainer = stage_trainer(ctx, max_steps=6)
    trainer.fit(_Regression(), train_dataloaders=_loader())
    rows = _rows(ctx.run_dir / "logs" / "sft" / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))
    losses = [float(r["train/loss"]) for r in rows]
    assert losses[-1] < losses[0] / 2  # the metrics are the run's own, not placeholders
    assert trainer.default_root_dir == str(ctx.dir) and trainer.checkpoint_callback is None

    # A rerun of the stage starts its log afresh; a second phase gets a directory of its own.
    stage_trainer(ctx, max_steps=2).fit(_Regression(), train_dataloaders=_loader())
    assert len(_rows(ctx.run_dir / "logs" / "sft" / "metrics.csv")) == 2
    stage_trainer(ctx, max_steps=3, phase="pmp").fit(_Regression(), train_dataloaders=_loader())
    assert len(_rows(stage_log_dir(ctx, "pmp") / "metrics.csv")) == 3


def test_section_defaults_overrides_and_bad_keys(tmp_path):
    # No section (a bare StageContext): one device, CSV logs, clipping at 1.
    trainer = stage_trainer(_ctx(tmp_path), max_steps=1)
    assert trainer.gradient_clip_val == 1.0 and trainer.num_devices == 1
    assert [type(lg).__name__ for lg in trainer.loggers] == ["CSVLogger"]
    # The caller's structural settings win over the section; its callbacks are kept.
    extra = L.Callback()
    ctx = _ctx(tmp_path, {"stage_trainer": {"gradient_clip_val": 0.5, "loggers": None,
                                            "callbacks": [{"_target_": "lightning.pytorch.callbacks.Timer"}]}})
    trainer = stage_trainer(ctx, max_steps=1, gradient_clip_val=None, callbacks=[extra])
    assert trainer.gradient_clip_val is None and trainer.loggers == []
    assert extra in trainer.callbacks and any(type(c).__name__ == "Timer" for c in trainer.callbacks)
    with pytest.raises(ConfigError, match="stage_trainer.max_stepz: not an argument of lightning.Trainer"):
        stage_trainer(_ctx(tmp_path, {"stage_trainer": {"max_stepz": 3}}), max_steps=1)


def test_the_bar_counts_steps_of_an_open_ended_run(tmp_path):
    from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

    from mmllm.callbacks.progress import StepRichProgressBar

    ctx = _ctx(tmp_path, {"stage_trainer": {"enable_progress_bar": True, "loggers": None}})
    trainer = stage_trainer(ctx, max_steps=6)
    (bar,) = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    trainer.fit(_Regression(), train_dataloaders=_loader())
    if isinstance(bar, StepRichProgressBar):  # Lightning's own says "Epoch 1/-2" here (max_epochs -1)
        assert bar._get_train_description(1).strip() == "Epoch 1 · step 6/6"
        bounded = stage_trainer(ctx, max_steps=-1, max_epochs=3)
        bounded.fit(_Regression(), train_dataloaders=_loader())
        assert bounded.progress_bar_callback._get_train_description(0).strip() == "Epoch 0/2"
    # Off: no bar at all (a bar callback with enable_progress_bar=False is Lightning's error);
    # the section's own bar is kept, not doubled.
    assert stage_trainer(_ctx(tmp_path), max_steps=1).progress_bar_callback is None
    own = {"_target_": "lightning.pytorch.callbacks.TQDMProgressBar"}
    mine = stage_trainer(_ctx(tmp_path, {"stage_trainer": {"enable_progress_bar": True, "callbacks": [own]}}),
                         max_steps=1)
    assert [type(c) for c in mine.callbacks if isinstance(c, ProgressBar)] == [TQDMProgressBar]


def test_pipeline_section_composes_with_the_run_as_group(tmp_path):
    run = tmp_path / "runs" / "2026-05-04_03-02-01"
    cfg = compose_config("pipeline", ["logger=[csv,tensorboard]"], output_dir=run)
    ctx = StageContext(name="reward_model", run_dir=run, cfg=cfg, markers={})
    assert run_group(ctx) == run.name
    assert OmegaConf.select(cfg, "logger.csv.save_dir") == str(run)  # pretrain keeps <run>/csv
    trainer = stage_trainer(ctx, max_steps=2)
    assert trainer.precision == "32-true" and trainer.gradient_clip_val == 1.0
    assert sorted(type(lg).__name__ for lg in trainer.loggers) == ["CSVLogger", "TensorBoardLogger"]
    trainer.fit(_Regression(), train_dataloaders=_loader())
    log_dir = run / "logs" / "reward_model"
    assert len(_rows(log_dir / "metrics.csv")) == 2 and list(log_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_wandb_runs_of_every_stage_share_the_run_group(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no key
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "runs" / "2026-05-04_03-02-01"
    cfg = compose_config("pipeline", ["logger=wandb"], output_dir=run)
    # Pretrain's logger (the train config's group) joins the same group.
    assert cfg.logger.wandb.group == run.name and cfg.logger.wandb.offline is True
    runs = []
    for stage in ("sft", "ppo"):
        ctx = StageContext(name=stage, run_dir=run, cfg=cfg, markers={})
        trainer = stage_trainer(ctx, max_steps=2)
        (logger,) = trainer.loggers
        trainer.fit(_Regression(), train_dataloaders=_loader())
        runs.append((logger.experiment.id, logger.experiment.group, logger.experiment.name,
                     logger.experiment.job_type))
    try:
        assert [r[1:] for r in runs] == [(run.name, "sft", "sft"), (run.name, "ppo", "ppo")]
        assert runs[0][0] != runs[1][0]  # one wandb run per stage, not the first one reused
        offline = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
        assert offline == {r[0] for r in runs}  # under <run>/wandb, ready for `wandb sync`
    finally:
        import wandb

        wandb.finish()


def test_gpu_preset_composes_and_builds_every_stage():
    from mmllm.stages import build_stages

    cfg = compose_config("pipeline", ["experiment=pipeline_gpu",
                                      "pipeline.stages.curate.sources=[/data/crawl/*.warc.gz]"])
    st = cfg.stage_trainer
    assert (st.accelerator, st.devices, st.precision) == ("gpu", 1, "bf16-mixed")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("gpu", 8, "32-true")
    assert cfg.strategy._target_.endswith("ModelParallelStrategy") and cfg.module.parallelism.fsdp
    assert cfg.module.parallelism.param_dtype == "bfloat16" and cfg.module.fused_loss == "auto"
    # The preset's values win over the tiny pipeline's (the experiment is merged after them).
    lm = cfg.model.lm
    assert (lm.dim, lm.n_layers, lm.max_seq_len, lm.vocab_size) == (2048, 22, 2048, 32000)
    with torch.device("meta"):
        from hydra.utils import instantiate

        assert 1.0e9 < instantiate(lm).num_params() < 1.2e9
    assert lm.attn_backend == "flash_attn" and sorted(cfg.logger) == ["csv", "tensorboard"]
    stages = {p.name: p.stage for p in build_stages(cfg.pipeline.stages)}
    assert "vision_pretrain" not in stages  # a pretrained CLIP ViT-L/14 instead of the tiny ViT
    assert stages["vlm_stage1"].vision == {"model_name": "ViT-L-14-quickgelu", "pretrained": "openai",
                                           "feature_layer": -2, "keep_cls": False}
    assert stages["curate"].sources == ["/data/crawl/*.warc.gz"]
    assert (stages["sft"].max_steps, stages["sft"].lora, stages["ppo"].rollouts) == (2000, None, 500)
    assert stages["tools"].accelerator == "gpu" and stages["reward_model"].rm_steps == 500
    # Without a crawl the demo WARC (105 articles) is curated: min_documents stops the run there
    # rather than pretraining 1 B parameters on 3 M characters.
    cfg = compose_config("pipeline", ["experiment=pipeline_gpu"])
    assert cfg.pipeline.stages.curate.sources is None and cfg.pipeline.stages.curate.min_documents >= 1000


def test_pipeline_has_the_config_groups_of_train():
    # pipeline.yaml lists train.yaml's groups itself (experiment/debug after its own values):
    # a group added to train.yaml must be added there too.
    groups = {}
    for name in ("train", "pipeline"):
        choices = compose_config(name, []).hydra.runtime.choices
        groups[name] = {k: v for k, v in choices.items() if not k.startswith("hydra/")}
    assert groups["pipeline"] == groups["train"]
