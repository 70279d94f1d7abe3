"""Training end to end: CLI, resume after a crash, NaN policy, precisions, multirun, export."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mmllm.config import compose_config
from mmllm.train import build, resolve_ckpt_arg

TINY = ["debug=tiny"]


def _mmllm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmllm", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs is not None:
            self.losses[trainer.global_step] = float(outputs["loss"])


class CrashAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class ParamSnapshots(L.Callback):
    """A weight before and after every training batch."""

    def __init__(self):
        self.around: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _w(self, pl_module):
        return pl_module.model.layers[0].attn.q_proj.weight.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = self._w(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.around[batch_idx] = (self._before, self._w(pl_module))


def _fit(cfg, *extra_callbacks, ckpt_path=None):
    module, dm, trainer = build(cfg)
    trainer.callbacks.extend(extra_callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.slow
def test_cli_debug_tiny_writes_metrics_config_and_checkpoint(tmp_path, shared_data_dir):
    run = tmp_path / "run"
    res = _mmllm("train", *TINY, f"hydra.run.dir={run}", f"paths.data_dir={shared_data_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 10 and all(l == l for l in losses)
    assert any(r.get("val/ppl") for r in rows)
    assert "vocab_size: 512" in (run / "config.yaml").read_text()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["mmllm"]["run_config"]["model"]["lm"]["n_layers"] == 2
    assert ckpt["global_step"] == 10

    # Export to HF and generate from it with the CLI tools.
    res = _mmllm("export", f"checkpoint={run}", f"output_dir={tmp_path / 'hf'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import LlamaForCausalLM

    from mmllm.checkpoint import load_model

    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ours, _ = load_model(run)
    x = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x).logits, atol=1e-5, rtol=0)
    res = _mmllm("generate", f"checkpoint={tmp_path / 'hf'}", "prompts=[The history of,Anarchism]",
                 "max_new_tokens=5", f"output={tmp_path / 'gen.jsonl'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 2


def test_cli_unknown_key_fails_clearly(tmp_path):
    res = _mmllm("train", *TINY, "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert res.returncode != 0
    assert "Key 'max_stepz' is not in struct" in res.stderr


@pytest.mark.slow
def test_resume_after_crash_reproduces_losses(tmp_path, shared_data_dir):
    over = TINY + ["trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=2",
                   "trainer.val_check_interval=4"]
    full = LossRecorder()
    _fit(compose_config("train", over, output_dir=tmp_path / "a", data_dir=shared_data_dir), full)
    assert sorted(full.losses) == list(range(1, 9))

    cfg = compose_config("train", over, output_dir=tmp_path / "b", data_dir=shared_data_dir)
    first = LossRecorder()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(cfg, first, CrashAt(5))
    second = LossRecorder()
    cfg = compose_config("train", over + ["ckpt_path=last"], output_dir=tmp_path / "b", data_dir=shared_data_dir)
    # The CLI's resolution of ckpt_path=last inside the old run directory.
    ckpt = resolve_ckpt_arg(cfg.ckpt_path, tmp_path / "b")
    assert ckpt == str(tmp_path / "b" / "checkpoints" / "last.ckpt")
    _, trainer = _fit(cfg, second, ckpt_path=ckpt)
    assert trainer.global_step == 8
    assert sorted(second.losses) == [5, 6, 7, 8]  # resumed from the step-4 checkpoint
    resumed = {**{s: first.losses[s] for s in range(1, 5)}, **second.losses}
    assert resumed == pytest.approx(full.losses, abs=1e-6)
    # Nothing logged before the crash is lost: the first segment's CSV is kept beside the new one.
    old = list(csv.DictReader(open(tmp_path / "b" / "csv" / "metrics.part0.csv")))
    new = list(csv.DictReader(open(tmp_path / "b" / "csv" / "metrics.csv")))
    assert [int(r["step"]) for r in old if r.get("train/loss")][:4] == [0, 1, 2, 3]
    assert [int(r["step"]) for r in new if r.get("train/loss")] == [4, 5, 6, 7]


def test_nan_loss_skip_and_stop(tmp_path, shared_data_dir, monkeypatch):
    cfg = compose_config("train", TINY + ["trainer.max_steps=4", "trainer.val_check_interval=100"],
                         output_dir=tmp_path / "skip", data_dir=shared_data_dir)
    module, dm, trainer = build(cfg)
    real = module.forward_loss
    calls = {"n": 0}

    def sometimes_nan(batch):
        calls["n"] += 1
        loss, lm, n = real(batch)
        return (loss * float("nan"), lm, n) if calls["n"] == 2 else (loss, lm, n)

    monkeypatch.setattr(module, "forward_loss", sometimes_nan)
    snapshots = ParamSnapshots()
    trainer.callbacks.append(snapshots)
    trainer.fit(module, datamodule=dm)
    # The step still counts, but the NaN batch changed no weight; the others did.
    assert module.nan_skips == 1 and trainer.global_step == 4 and calls["n"] == 4
    assert torch.equal(*snapshots.around[1]) and not torch.equal(*snapshots.around[2])
    assert all(torch.isfinite(p).all() for p in module.parameters())

    cfg = compose_config("train", TINY + ["module.nan_policy=stop", "trainer.val_check_interval=100"],
                         output_dir=tmp_path / "stop", data_dir=shared_data_dir)
    module, dm, trainer = build(cfg)
    calls["n"] = 0
    real = module.forward_loss
    monkeypatch.setattr(module, "forward_loss", sometimes_nan)
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        trainer.fit(module, datamodule=dm)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_precisions_train_on_cpu(tmp_path, shared_data_dir, precision):
    cfg = compose_config("train", TINY + [f"trainer.precision={precision}", "trainer.max_steps=3",
                                          "trainer.val_check_interval=3"],
                         output_dir=tmp_path / "run", data_dir=shared_data_dir)
    rec = LossRecorder()
    _fit(cfg, rec)
    assert len(rec.losses) == 3 and all(torch.isfinite(torch.tensor(list(rec.losses.values()))))


@pytest.mark.slow
def test_loss_decreases_when_overfitting(tmp_path, shared_data_dir):
    cfg = compose_config("train", ["debug=overfit", "trainer.max_steps=60", "trainer.val_check_interval=60"],
                         output_dir=tmp_path / "run", data_dir=shared_data_dir)
    rec = LossRecorder()
    _fit(cfg, rec)
    assert rec.losses[60] < 0.5 * rec.losses[1]


@pytest.mark.slow
def test_multirun_sweeps_into_one_dir_per_job(tmp_path, shared_data_dir):
    res = _mmllm("train", "--multirun", *TINY, "model.lm.n_layers=1,2", "trainer.max_steps=2",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.data_dir={shared_data_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for job, layers in ((0, 1), (1, 2)):
        assert (tmp_path / "sweep" / str(job) / "csv" / "metrics.csv").is_file()
        assert f"n_layers: {layers}" in (tmp_path / "sweep" / str(job) / "config.yaml").read_text()
