"""LoRA / QLoRA (mmllm.modules.lora): only adapters train, checkpoints load back merged, export is plain."""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmllm.checkpoint import load_model
from mmllm.models import DecoderLM
from mmllm.modules import CausalLMModule
from mmllm.modules.lora import LLAMA_TARGETS, apply_lora, linear_names, merged_model, trainable_parameters

MODEL = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=32,
             max_seq_len=32, tie_embeddings=True)


def _batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (2, 16), generator=g)
        out.append({"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)})
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One short LoRA and one QLoRA run (module, trainer, weights before, checkpoint), shared."""
    return {q: _train({"r": 4, "alpha": 8, "quantize": q}, tmp_path_factory.mktemp(f"lora_{q}"))
            for q in (None, "nf4")}


def _train(lora: dict, tmp_path, steps: int = 4):
    torch.manual_seed(0)
    base = DecoderLM(**MODEL)
    module = CausalLMModule(model=base, lora=lora, fused_loss=False,
                            optimizer=partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.0))
    before = {k: v.clone() for k, v in module.model.state_dict().items()}  # plain model, pre-LoRA
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(_batches(), batch_size=None))
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, trainer, before, ckpt


def _base_weight(module: nn.Module, name: str) -> torch.Tensor:
    layer = module.get_submodule(name).base_layer
    return layer.weight.data.clone()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_only_adapters_train_and_the_checkpoint_loads_merged(quantize, runs):
    module, trainer, before, ckpt = runs[quantize]
    model = module.model
    assert isinstance(model, DecoderLM)
    # The optimizer holds exactly the adapter parameters.
    opt_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    lora_params = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert opt_ids == lora_params and len(lora_params) == 2 * len(LLAMA_TARGETS) * MODEL["n_layers"]
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < 0.2 * total
    # Base weights are untouched; the adapters moved (B starts at 0 and must have learnt).
    state = model.state_dict()
    assert torch.equal(state["embed_tokens.weight"], before["embed_tokens.weight"])
    assert torch.equal(state["norm.weight"], before["norm.weight"])
    if quantize is None:
        assert torch.equal(state["layers.0.attn.q_proj.base_layer.weight"], before["layers.0.attn.q_proj.weight"])
    else:
        assert type(model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert state["layers.1.mlp.down_proj.lora_B.default.weight"].abs().sum() > 0
    # load_model (what export/eval/generate use) gives a plain model computing the same logits.
    plain, _ = load_model(ckpt)
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    assert all(type(m) is nn.Linear for m in plain.modules() if isinstance(m, nn.Linear))
    x = torch.randint(0, 64, (2, 16))
    model.train()  # (bitsandbytes' CPU inference kernel repacks 4-bit weights in eval mode)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_resume_loads_the_adapter_state(runs):
    """A LoRA checkpoint loads back into a LoRA module (Lightning resume), 4-bit weights included."""
    module, _, _, ckpt = runs["nf4"]
    again = CausalLMModule(model=DecoderLM(**MODEL), lora={"r": 4, "alpha": 8, "quantize": "nf4"})
    again.configure_model()
    again.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"], strict=True)
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.model(x).logits, module.model.train()(x).logits)


def test_export_writes_the_merged_model(runs, tmp_path):
    from mmllm.export import export
    from mmllm.models.hf import load_hf_checkpoint

    module, _, _, ckpt = runs[None]
    out = export(str(ckpt), str(tmp_path / "hf"))
    hf_model, _ = load_hf_checkpoint(out)
    x = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(x).logits, module.model.eval()(x).logits, atol=1e-5, rtol=1e-5)


def test_unmatched_targets_and_bad_options_fail_clearly():
    model = DecoderLM(**MODEL)
    assert set(LLAMA_TARGETS) <= linear_names(model)
    with pytest.raises(ValueError, match="matched no Linear"):
        apply_lora(model, target_modules=["query"])
    with pytest.raises(ValueError, match="unknown module.lora keys"):
        CausalLMModule(model=DecoderLM(**MODEL), lora={"rank": 4})
    with pytest.raises(ValueError, match="quantize"):
        CausalLMModule(model=DecoderLM(**MODEL), lora={"quantize": "int3"})


def test_merged_model_of_a_fresh_adapter_is_the_base_model():
    torch.manual_seed(0)
    model = DecoderLM(**MODEL)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_model(apply_lora(model, r=2))  # B = 0: the update is zero
    assert merged.state_dict().keys() == ref.keys()
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in ref.items())
