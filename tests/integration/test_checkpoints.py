"""Checkpoints: reload after a vocabulary change, the tokenizer travels with the run, init_from,
crash-safe saves (a save killed half-way resumes to the same losses)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import LossRecorder  # the same per-step loss recorder

from mmllm.checkpoint import (
    checkpoint_problem,
    load_lightning_checkpoint,
    load_model,
)
from mmllm.config import compose_config
from mmllm.data.special_tokens import SpecialTokens, add_special_tokens
from mmllm.distributed.checkpoint import (
    COMPLETE_MARKER,
    commit_checkpoint,
    partial_path,
    remove_partials,
)
from mmllm.errors import CheckpointError, MissingFileError
from mmllm.models import DecoderLM
from mmllm.modules.causal_lm import CausalLMModule
from mmllm.train import build, resolve_ckpt_arg

TINY = ["debug=tiny"]


def _fit(cfg, *callbacks, ckpt_path=None):
    module, dm, trainer = build(cfg)
    trainer.callbacks.extend(callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer


def _save_kit_checkpoint(model: DecoderLM, path: Path) -> Path:
    """A checkpoint as CausalLMModule writes it (state_dict under model., the mmllm metadata)."""
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mmllm": {"model_class": "mmllm.models.decoder_lm.DecoderLM",
                          "model_config": model.config}}, path)
    return path


# ------------------------------------------------------------------ vocabulary growth + tokenizer
@pytest.mark.slow
def test_grown_vocabulary_reloads_and_generates_from_elsewhere(tmp_path, shared_data_dir):
    run = tmp_path / "run"
    cfg = compose_config("train", TINY + ["trainer.max_steps=1", "trainer.val_check_interval=1",
                                          "callbacks.model_checkpoint.every_n_train_steps=1"],
                         output_dir=run, data_dir=shared_data_dir)
    module, dm, trainer = build(cfg)
    dm.prepare_data()
    tokenizer = dm.tokenizer
    # The SFT special-token path, with turn markers the pretraining tokenizer does not have.
    sft_tokens = SpecialTokens(chat_start="<|sft_turn|>", chat_end="<|sft_end|>")
    added = add_special_tokens(tokenizer, ("chat",), tokens=sft_tokens)
    assert added == 2
    extended = tmp_path / "tokenizer_sft"
    tokenizer.save_pretrained(extended)
    dm.tokenizer_dir = str(extended)  # the run's tokenizer (copied into the run at fit start)
    module.configure_model()
    module.model.resize_token_embeddings(len(tokenizer))
    trainer.fit(module, datamodule=dm)

    model, tok, meta = load_lightning_checkpoint(run)
    assert meta["tokenizer"] == "../tokenizer" and (run / "tokenizer" / "tokenizer.json").is_file()
    assert model.vocab_size == len(tok) == 512 + 2
    ids = torch.tensor([tok.encode("<|sft_turn|>user hello<|sft_end|>")])
    assert ids.max() >= 512  # the new tokens are used
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, module.model.eval()(ids).logits, rtol=0, atol=0)

    # The run directory is self-contained: move it, generate from another working directory.
    moved = tmp_path / "elsewhere" / "moved_run"
    moved.parent.mkdir()
    shutil.move(str(run), moved)
    shutil.rmtree(extended)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    res = subprocess.run([sys.executable, "-m", "mmllm", "generate", f"checkpoint={moved}",
                          "prompts=['<|sft_turn|>user hello']", "max_new_tokens=4",
                          f"output={cwd / 'gen.jsonl'}"], cwd=cwd, check=False,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len((cwd / "gen.jsonl").read_text().splitlines()) == 1

    shutil.rmtree(moved / "tokenizer")
    with pytest.raises(MissingFileError, match="tokenizer recorded in .* is missing"):
        load_model(moved)


# ------------------------------------------------------------------------------------ init_from
def test_init_from_applies_to_a_built_model(tmp_path, tiny_lm_kwargs):
    source = DecoderLM(**tiny_lm_kwargs)
    ckpt = _save_kit_checkpoint(source, tmp_path / "source.ckpt")
    torch.manual_seed(1)  # the built model starts from other weights
    module = CausalLMModule(model=DecoderLM(**tiny_lm_kwargs), init_from=str(ckpt))
    assert not torch.equal(module.model.lm_head.weight, source.lm_head.weight)
    module.configure_model()
    for (name, got), want in zip(module.model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(got, want), name
    # The factory path agrees.
    module = CausalLMModule(model=lambda: DecoderLM(**tiny_lm_kwargs), init_from=str(ckpt))
    module.configure_model()
    assert torch.equal(module.model.lm_head.weight, source.lm_head.weight)


# ------------------------------------------------------------------------------ crash safety
def test_commit_replaces_files_and_directories_atomically(tmp_path):
    final = tmp_path / "last.ckpt"
    torch.save({"step": 1}, final)
    tmp = partial_path(final)
    assert tmp.name == "last.ckpt.partial"
    torch.save({"step": 2}, tmp)
    commit_checkpoint(tmp, final)
    assert not tmp.exists() and torch.load(final)["step"] == 2

    # A DCP-style directory: the completion marker lands last, the old directory is replaced.
    final_dir = tmp_path / "dcp.ckpt"
    for step in (1, 2):
        tmp = partial_path(final_dir)
        tmp.mkdir()
        (tmp / ".metadata").write_bytes(b"m")
        torch.save({"step": step}, tmp / "meta.pt")
        commit_checkpoint(tmp, final_dir)
    assert (final_dir / COMPLETE_MARKER).is_file() and torch.load(final_dir / "meta.pt")["step"] == 2
    assert checkpoint_problem(final_dir) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp.ckpt", "last.ckpt"]

    (tmp_path / "step000003.ckpt.partial").write_bytes(b"half")
    (tmp_path / "x.ckpt.partial").mkdir()
    assert [p.name for p in remove_partials(tmp_path)] == ["step000003.ckpt.partial", "x.ckpt.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp.ckpt", "last.ckpt"]


def test_last_falls_back_to_the_newest_valid_checkpoint(tmp_path, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for i, name in enumerate(("step000002.ckpt", "step000004.ckpt", "last.ckpt")):
        torch.save({"step": i, "blob": torch.zeros(1000)}, ckpts / name)
        os.utime(ckpts / name, (1000 + i, 1000 + i))
    assert resolve_ckpt_arg("last", tmp_path) == str(ckpts / "last.ckpt")
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[:len(data) // 2])  # torn by a crash mid-write
    os.utime(ckpts / "last.ckpt", (1002, 1002))
    assert "not a complete torch.save archive" in checkpoint_problem(ckpts / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="mmllm.checkpoint"):
        assert resolve_ckpt_arg("last", tmp_path) == str(ckpts / "step000004.ckpt")
    assert "skipping" in caplog.text and "last.ckpt" in caplog.text
    (ckpts / "step000004.ckpt").write_bytes(b"garbage")
    (ckpts / "step000002.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        resolve_ckpt_arg("last", tmp_path)
    with pytest.raises(MissingFileError, match="no checkpoint in"):
        resolve_ckpt_arg("last", tmp_path / "empty_run")


def _run_until_stalled(args: list[str], cwd: Path, stall_step: int, log: Path) -> None:
    """Runs ``mmllm train`` until its save at ``stall_step`` blocks half-written, then SIGKILLs it."""
    env = {**os.environ, "MMLLM_TEST_STALL_SAVE": str(stall_step)}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mmllm", "train", *args], cwd=cwd, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        while "checkpoint save stalled" not in log.read_text():
            assert proc.poll() is None, f"training ended before stalling:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_save_killed_half_way_resumes_to_identical_losses(tmp_path, shared_data_dir):
    over = TINY + ["trainer.max_steps=8", "callbacks.model_checkpoint.every_n_train_steps=2",
                   "trainer.val_check_interval=4"]
    full = LossRecorder()
    _fit(compose_config("train", over, output_dir=tmp_path / "a", data_dir=shared_data_dir), full)
    assert sorted(full.losses) == list(range(1, 9))

    run = tmp_path / "b"
    _run_until_stalled([*over, f"hydra.run.dir={run}", f"paths.data_dir={shared_data_dir}"],
                       tmp_path, stall_step=6, log=tmp_path / "b.stderr")
    ckpts = run / "checkpoints"
    half = ckpts / "step000006.ckpt.partial"
    assert half.is_file() and checkpoint_problem(half) is not None  # the save was cut short
    assert not (ckpts / "step000006.ckpt").exists()
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 4
    # Also tear last.ckpt, as a writer that is not crash-safe would: resume falls back further.
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last.ckpt").write_bytes(data[: len(data) // 2])

    cfg = compose_config("train", over + ["ckpt_path=last"], output_dir=run, data_dir=shared_data_dir)
    ckpt = resolve_ckpt_arg(cfg.ckpt_path, run)
    assert ckpt == str(ckpts / "step000004.ckpt")
    second = LossRecorder()
    _, trainer = _fit(cfg, second, ckpt_path=ckpt)
    assert trainer.global_step == 8 and not half.exists()  # the leftover was removed
    assert sorted(second.losses) == [5, 6, 7, 8]
    assert second.losses == pytest.approx({s: full.losses[s] for s in range(5, 9)}, abs=1e-6)
    assert checkpoint_problem(ckpts / "last.ckpt") is None
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 8
