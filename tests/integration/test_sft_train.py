"""`experiment=sft_*` end to end at tiny scale: a kit checkpoint fine-tuned on the demo set with
LoRA / QLoRA / full FT, the regression check before/after, merged checkpoints, grad accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from mmllm.checkpoint import load_model
from mmllm.config import ASSETS_DIR, compose_config
from mmllm.modules import CausalLMModule
from mmllm.eval.regression import compare, format_diff, lower_is_better
from mmllm.train import build

DEMO = ASSETS_DIR / "sft_demo.jsonl"


def _texts() -> list[str]:
    rows = [json.loads(line) for line in DEMO.read_text().splitlines()]
    return [m["content"] for r in rows for m in r["messages"]] * 3


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny kit 'pretrained' run directory: checkpoints/last.ckpt + tokenizer/ (ChatML BPE)."""
    from mmllm.data.tokenizer import train_bpe_tokenizer
    from mmllm.distributed.parallelize import model_class_path

    run = tmp_path_factory.mktemp("base_run")
    tok = train_bpe_tokenizer(_texts(), vocab_size=512, show_progress=False)
    tok.save_pretrained(run / "tokenizer")
    cfg = compose_config("train", ["debug=tiny"], output_dir=run)
    torch.manual_seed(0)
    model = instantiate(cfg.model.lm)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "mmllm": {"model_class": model_class_path(model), "model_config": model.config,
                          "tokenizer": "../tokenizer"}}, run / "checkpoints" / "last.ckpt")
    return run


def _cfg(experiment: str, base_run: Path, out: Path, *extra: str):
    return compose_config("train", [f"experiment={experiment}", "debug=tiny", f"module.init_from={base_run}",
                                    "trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
                                    "trainer.val_check_interval=3", "callbacks.regression.limit=4",
                                    "logger=csv", *extra], output_dir=out)


def _fit(cfg):
    module, dm, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)
    return module, trainer


@pytest.mark.parametrize("experiment", ["sft_lora", "sft_qlora"])
def test_sft_lora_experiments_train_adapters_and_check_regressions(experiment, base_run, tmp_path):
    out = tmp_path / "run"
    # No adapter dropout, so the train-mode forward (see test_lora) is deterministic.
    cfg = _cfg(experiment, base_run, out, "module.lora.dropout=0.0")
    module, trainer = _fit(cfg)
    assert trainer.global_step == 3
    base, _ = load_model(base_run)
    # The frozen weights are the base checkpoint's; the adapters learnt.
    state = module.model.state_dict()
    assert torch.equal(state["embed_tokens.weight"], base.state_dict()["embed_tokens.weight"])
    if experiment == "sft_lora":
        assert torch.equal(state["layers.0.attn.q_proj.base_layer.weight"],
                           base.state_dict()["layers.0.attn.q_proj.weight"])
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)
    # Regression check: before/after numbers per task, as JSON and a table.
    diff = json.loads((out / "regression.json").read_text())
    assert set(diff["tasks"]) == {"capitals", "capitals_text"}
    assert diff["tasks"]["capitals"]["acc"]["before"] is not None
    assert "| capitals_text | token_perplexity |" in (out / "regression.md").read_text()
    # The run's checkpoint loads (eval/export/generate) as the merged plain model, computing what
    # the adapted model of that checkpoint computes. (The adapted model is rebuilt from the file:
    # after an eval-mode forward, bitsandbytes' CPU inference kernel holds the 4-bit weights of
    # the trained one in a repacked layout whose matmul rounds differently.)
    merged, tok = load_model(out)
    assert tok is not None and not any("lora" in k for k in merged.state_dict())
    adapted = CausalLMModule(model=instantiate(cfg.model.lm), lora=dict(cfg.module.lora))
    adapted.configure_model()
    adapted.load_state_dict(torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted.model.train()(x).logits, atol=1e-5, rtol=1e-5)
        if experiment == "sft_lora":
            torch.testing.assert_close(merged(x).logits, module.model.eval()(x).logits, atol=1e-5, rtol=1e-5)


def test_sft_full_updates_every_weight_and_logs_step_loss(base_run, tmp_path):
    out = tmp_path / "run"
    _, trainer = _fit(_cfg("sft_full", base_run, out, "~callbacks.regression", "module.optimizer.lr=1e-3"))
    tuned, _ = load_model(out)
    base, _ = load_model(base_run)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert "layers.0.attn.q_proj.weight" in changed and "embed_tokens.weight" in changed
    rows = (out / "csv" / "metrics.csv").read_text()
    assert "train/step_loss" in rows and "train/step_supervised_tokens" in rows
    assert float(trainer.callback_metrics["train/step_supervised_tokens"]) > 0


def test_compare_knows_metric_directions():
    before = {"t": {"acc": 0.5, "token_perplexity": 10.0}}
    after = {"t": {"acc": 0.4, "token_perplexity": 8.0}}
    diff = compare(before, after)
    assert diff["regressed"] == ["t/acc"]
    assert diff["tasks"]["t"]["token_perplexity"]["delta"] == pytest.approx(-2.0)
    assert lower_is_better("bits_per_byte") and not lower_is_better("acc_norm")
    assert compare(before, after, tolerance=0.2)["regressed"] == []
    assert "REGRESSED" in format_diff(diff)


@pytest.mark.parametrize("experiment", ["sft_full", "sft_lora", "sft_qlora", "sft_smollm2_lora"])
def test_sft_experiments_compose_and_validate(experiment, tmp_path):
    from mmllm.config import check_config

    cfg = compose_config("train", [f"experiment={experiment}", "module.init_from=smollm2"], output_dir=tmp_path)
    check_config(cfg)
    assert cfg.data.tokenizer == "smollm2" and cfg.data.sources[0].path == str(DEMO)
    assert cfg.module.loss_normalization == "step"
    assert (cfg.module.get("lora") or {}).get("quantize") == ("nf4" if experiment == "sft_qlora" else None)
    if experiment == "sft_smollm2_lora":
        assert cfg.model.lm.dim == 576 and cfg.data.vocab_size == 49152


def _marker(name: str, outputs: dict) -> "Marker":
    from mmllm.stages.base import Marker

    return Marker(stage=name, target="test", fingerprint="f", run_id=name, started_at="", finished_at="",
                  seconds=0.0, outputs={k: str(v) for k, v in outputs.items()}, record={},
                  config_updates={}, config={})


def test_sft_stage_fine_tunes_the_pretrained_checkpoint(base_run, tmp_path):
    from omegaconf import OmegaConf

    from mmllm.checkpoint import load_lightning_checkpoint
    from mmllm.stages.base import StageContext, stage_dir
    from mmllm.stages.sft import SFTStage

    run = tmp_path / "pipeline"
    si = stage_dir(run, "self_instruct")
    si.mkdir(parents=True)
    rows = [{"messages": [{"role": "user", "content": f"Repeat the number {i}."},
                          {"role": "assistant", "content": f"{i}"}]} for i in range(12)]
    (si / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    markers = {"pretrain": _marker("pretrain", {"checkpoint": base_run / "checkpoints" / "last.ckpt"}),
               "tokenize": _marker("tokenize", {"tokenizer": base_run / "tokenizer"}),
               "self_instruct": _marker("self_instruct", {})}
    cfg = OmegaConf.create({"seed": 0, "data": {"seq_len": 64},
                            "trainer": {"accelerator": "cpu", "precision": "32-true"}})
    ctx = StageContext(name="sft", run_dir=run, cfg=cfg, markers=markers)
    stage = SFTStage(max_steps=8, lr=3e-3, batch_size=4, eval_limit=4)
    stage.name = "sft"
    stage.run(ctx)
    rec = ctx.record["sft"]
    assert set(rec["train"]["sources"]) == {"demo", "self_instruct"}
    assert rec["train"]["steps"] == 8 and rec["train"]["mode"] == "full"
    assert rec["val_loss_after"] < rec["val_loss_before"]  # it learnt the instruction format
    assert set(rec["regression"]) == {"capitals", "capitals_text"}
    assert (ctx.dir / "regression.json").is_file() and (ctx.dir / "regression.md").is_file()
    # Later stages load the checkpoint with its tokenizer, whatever the working directory.
    model, tok, meta = load_lightning_checkpoint(stage.outputs(ctx)["checkpoint"])
    assert tok is not None and len(tok) == 512 and meta["lora"] is None
    base, _ = load_model(base_run)
    assert not torch.equal(model.state_dict()["layers.0.attn.q_proj.weight"],
                           base.state_dict()["layers.0.attn.q_proj.weight"])
