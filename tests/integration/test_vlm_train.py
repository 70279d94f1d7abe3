"""VLM training at tiny scale: stage 1 from a feature cache for every connector (loss falls, the
encoder and LLM stay bit-identical and outside the optimizer), stage 2 on conversations (full and
LoRA), and the feature cache itself."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmllm.data.feature_cache import FeatureCache, build_feature_cache
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import VLMCollator, add_vlm_tokens, vlm_token_ids
from mmllm.models import DecoderLM
from mmllm.models.vlm import build_vlm
from mmllm.modules.vlm import VisionLanguageModule
from mmllm.nn.connectors import LinearConnector, MLPConnector, QFormer, VisualAbstractor
from mmllm.nn.vision import TINY_VIT, VisionEncoder

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "stripe")


def _image(color: str, shape: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random((32, 32, 3)) * 40).astype(np.uint8)
    c = np.array(COLORS[color], np.uint8)
    if shape == "square":
        arr[8:24, 8:24] = c
    else:
        arr[:, 12:20] = c
    return Image.fromarray(arr)


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        color, shape = list(COLORS)[i % 4], SHAPES[(i // 4) % 2]
        out.append({"images": [_image(color, shape, i)], "caption": f"a {color} {shape}"})
    return out


@pytest.fixture(scope="module")
def tok():
    text = " ".join(f"a {c} {s}. what color is it? describe the image." for c in COLORS for s in SHAPES)
    t = train_bpe_tokenizer([text] * 30, vocab_size=300, show_progress=False)
    add_vlm_tokens(t)
    return t


@pytest.fixture(scope="module")
def encoder():
    return VisionEncoder(model_cfg=TINY_VIT)


@pytest.fixture(scope="module")
def cache(tmp_path_factory, encoder):
    path = tmp_path_factory.mktemp("features")
    records = _records(16)
    records.insert(3, {"images": [_BrokenImage()], "caption": "never seen"})
    build_feature_cache(encoder, records, path, batch_size=5, shard_images=6)
    return FeatureCache(path, encoder_fingerprint=encoder.fingerprint())


class _BrokenImage:
    """Stands for a truncated file: decoding fails."""

    def convert(self, mode):
        raise OSError("image file is truncated")


def test_feature_cache_matches_encoder(cache, encoder):
    assert len(cache) == 16 and cache.index["skipped"] == 1
    assert len(cache.index["shards"]) == 3  # 16 images, 6 per shard, records never split
    rec = cache[9]
    assert rec["caption"] == _records(16)[9]["caption"] and rec["features"].shape == (1, 16, 32)
    ref = encoder(encoder.preprocess_images(_records(16)[9]["images"]))
    torch.testing.assert_close(rec["features"].float(), ref, atol=2e-3, rtol=2e-3)  # float16 storage
    # Reused for the same encoder; refused for another one.
    assert build_feature_cache(encoder, [], cache.path) == cache.path
    other = VisionEncoder(model_cfg=TINY_VIT)
    with pytest.raises(ValueError, match="another encoder"):
        build_feature_cache(other, [], cache.path)
    with pytest.raises(ValueError, match="rebuild the cache"):
        FeatureCache(cache.path, encoder_fingerprint=other.fingerprint())


@pytest.fixture(scope="module")
def lm_state(tok):
    """A tiny LM pretrained on the caption text alone: it knows the words but cannot tell the
    colour or shape, which only the image gives (stage 1's loss can fall only through it)."""
    torch.manual_seed(0)
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=128)
    batch = VLMCollator(tok, num_image_tokens=0, instruction_prob=0.0)(
        [{"images": [], "caption": r["caption"]} for r in _records(8)])
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    for _ in range(30):
        logits = lm(batch["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.state_dict()


@pytest.fixture
def lm(lm_state):
    model = DecoderLM(vocab_size=lm_state["embed_tokens.weight"].shape[0], dim=32, n_layers=1, n_heads=4,
                      hidden_dim=64, max_seq_len=128)
    model.load_state_dict(lm_state)
    return model


def _fit(module, loader, steps: int, lr: float):
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    module.optimizer_factory = lambda groups: torch.optim.AdamW(groups, lr=lr)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Rec()],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return losses, trainer


CONNECTORS = {
    "linear": lambda: LinearConnector(in_dim=32, out_dim=32),
    "mlp": lambda: MLPConnector(in_dim=32, out_dim=32),
    "qformer": lambda: QFormer(in_dim=32, out_dim=32, num_queries=4, dim=32, n_layers=2, n_heads=2),
    "abstractor": lambda: VisualAbstractor(in_dim=32, out_dim=32, num_queries=4, dim=32,
                                           n_layers=1, n_heads=2),
}


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_stage1_from_cache_trains_only_the_connector(name, tok, encoder, cache, lm):
    conn = CONNECTORS[name]()
    vlm = build_vlm(connector=conn, image_token_id=vlm_token_ids(tok)[1], vocab_size=len(tok),
                    lm=lm, vision=encoder)
    module = VisionLanguageModule(model=vlm, train_llm=False)
    col = VLMCollator(tok, num_image_tokens=conn.num_output_tokens(16), instruction_prob=0.0)
    loader = DataLoader(cache, batch_size=8, shuffle=True, collate_fn=col,
                        generator=torch.Generator().manual_seed(0))
    frozen = {n: p.detach().clone() for n, p in vlm.named_parameters() if not n.startswith("connector.")}
    losses, trainer = _fit(module, loader, steps=12, lr=1e-2)
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
    opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for n, p in vlm.named_parameters():
        trainable = n.startswith("connector.")
        assert p.requires_grad == trainable, n
        assert (id(p) in opt_params) == trainable, n
        if not trainable:
            assert torch.equal(p, frozen[n]), f"{n} changed"
    assert len(opt_params) == len(list(conn.parameters()))


CHATS = [
    [{"role": "user", "content": "<image>\nwhat color is it?"}, {"role": "assistant", "content": "{c}"},
     {"role": "user", "content": "describe the image."}, {"role": "assistant", "content": "a {c} {s}"}],
    [{"role": "user", "content": "describe the image. <image>"}, {"role": "assistant", "content": "a {c} {s}"}],
]


def _chat_records(n: int) -> list[dict]:
    out = []
    for i, r in enumerate(_records(n)):
        c, s = r["caption"].split()[1:]
        msgs = [{**m, "content": m["content"].format(c=c, s=s)} for m in CHATS[i % 2]]
        out.append({"images": r["images"], "messages": msgs})
    return out


@pytest.mark.parametrize("lora", [None, {"r": 4, "lora_alpha": 8}], ids=["full", "lora"])
def test_stage2_instruction_tuning(lora, tok, encoder, tmp_path, lm):
    conn = MLPConnector(in_dim=32, out_dim=32)
    conn.save(tmp_path / "connector.safetensors")
    vlm = build_vlm(connector=MLPConnector(in_dim=32, out_dim=32), image_token_id=vlm_token_ids(tok)[1],
                    vocab_size=len(tok), lm=lm, vision=encoder)
    module = VisionLanguageModule(model=vlm, train_llm=True, lora=lora,
                                  connector_init_from=str(tmp_path / "connector.safetensors"))
    col = VLMCollator(tok, num_image_tokens=16, image_transform=encoder.preprocess)
    loader = DataLoader(_chat_records(8), batch_size=4, shuffle=False, collate_fn=col)
    enc_before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    base_before = vlm.decoder.layers[0].attn.q_proj.weight.detach().clone()
    losses, _ = _fit(module, loader, steps=8, lr=4e-3)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    names = set(module.trainable_parameters())
    assert not any(n.startswith("vision.") for n in names)
    assert any(n.startswith("connector.") for n in names)
    for n, p in encoder.named_parameters():
        assert torch.equal(p, enc_before[n])
    if lora:
        assert names - {n for n in names if n.startswith("connector.")} and \
            all("lora_" in n for n in names if n.startswith("decoder."))
        q = vlm.decoder.base_model.model.layers[0].attn.q_proj.base_layer.weight
        assert torch.equal(q, base_before)  # base weights frozen under LoRA
        module.merge_lora()
        assert isinstance(module.model.decoder, DecoderLM)
    else:
        assert "decoder.embed_tokens.weight" in names
        assert not torch.equal(vlm.decoder.layers[0].attn.q_proj.weight, base_before)


def test_train_entry_with_vlm_stage1_experiment(tok, tmp_path):
    """`mmllm train experiment=vlm_stage1` at tiny scale: the config composes, the datamodule
    builds the feature cache, the module assembles the VLM, trains and writes a checkpoint that
    mmllm.checkpoint rebuilds."""
    from mmllm.checkpoint import load_lightning_checkpoint
    from mmllm.config import compose_config
    from mmllm.train import build

    tok.save_pretrained(str(tmp_path / "tok"))
    vit = TINY_VIT["vision_cfg"]
    cfg = compose_config("train", [
        "experiment=vlm_stage1", "model/lm=tiny", "model.lm.dim=32", "model.lm.n_layers=1",
        "model.lm.vocab_size=300", f"data.tokenizer={tmp_path / 'tok'}", "module.lm_init_from=null",
        "data.vision.pretrained=null", f"+data.vision.model_cfg={json_dict(TINY_VIT)}",
        "data.val_every=4", "trainer.max_steps=3", "trainer.val_check_interval=3",
        "trainer.limit_val_batches=1", "logger=[]", "callbacks.model_checkpoint.every_n_train_steps=3",
        "data.batch_size=4", "model/connector=qformer", "model.connector.dim=32",
        "model.connector.n_layers=1", "model.connector.n_heads=2", "model.connector.num_queries=4",
    ], output_dir=tmp_path / "out")
    assert cfg.data.num_image_tokens == 4 and vit["patch_size"] == 8
    module, dm, trainer = build(cfg)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and "val/loss" in trainer.callback_metrics
    assert (tmp_path / "out" / "feature_cache" / "index.json").is_file()
    assert not any(p.requires_grad for p in module.model.decoder.parameters())
    model, saved_tok, _ = load_lightning_checkpoint(tmp_path / "out" / "checkpoints" / "last.ckpt")
    torch.testing.assert_close(model.connector.queries, module.model.connector.queries)
    assert saved_tok.convert_tokens_to_ids("<ImageFeature>") == model.image_token_id


def json_dict(d: dict) -> str:
    """A Hydra override value for a nested dict."""
    import json

    return json.dumps(d).replace('"', "")
