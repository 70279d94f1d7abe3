"""BLIP-2 stage-1 Q-Former pretraining: masks, losses by hand, mining, gradients, a measured run."""

from __future__ import annotations

import math

import pytest
import torch

from components.blip2_qformer.data import ByteCaptionTokenizer, CaptionCollator
from components.blip2_qformer.losses import (
    itc_loss,
    itc_similarity,
    itg_loss,
    itm_loss,
    mine_hard_negatives,
)
from components.blip2_qformer.masks import bidirectional_mask, multimodal_causal_mask, unimodal_mask
from components.blip2_qformer.model import QFormerWithText
from components.blip2_qformer.module import QFormerPretrainModule
from mmllm.nn.connectors import QFormer, load_connector

TM = torch.tensor([[True, True, False]])  # one text of 2 real tokens + 1 pad; M = 2 queries


def test_unimodal_mask_by_hand():
    expect = torch.tensor([[1, 1, 0, 0, 0],   # queries: only queries
                           [1, 1, 0, 0, 0],
                           [0, 0, 1, 1, 0],   # text: only real text
                           [0, 0, 1, 1, 0],
                           [1, 1, 1, 1, 0]],  # the pad row sees queries + text (never empty)
                          dtype=torch.bool)
    assert torch.equal(unimodal_mask(TM, 2)[0, 0], expect)


def test_bidirectional_mask_by_hand():
    expect = torch.tensor([[1, 1, 1, 1, 0]] * 5, dtype=torch.bool)  # all but the pad key
    assert torch.equal(bidirectional_mask(TM, 2)[0, 0], expect)


def test_multimodal_causal_mask_by_hand():
    expect = torch.tensor([[1, 1, 0, 0, 0],   # queries never see the text they help generate
                           [1, 1, 0, 0, 0],
                           [1, 1, 1, 0, 0],   # text: all queries + itself and earlier text
                           [1, 1, 1, 1, 0],
                           [1, 1, 1, 1, 0]], dtype=torch.bool)
    m = multimodal_causal_mask(TM, 2)
    assert m.shape == (1, 1, 5, 5) and torch.equal(m[0, 0], expect)


def test_itc_similarity_is_max_over_queries():
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])  # (B=2, M=2, E=2)
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(itc_similarity(img, txt), torch.tensor([[1.0, 1.0], [0.6, 0.8]]))


def test_itc_loss_by_hand_on_2x2():
    sim, t = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64), 0.1
    i2t = [-math.log(math.exp(9) / (math.exp(9) + math.exp(1))),
           -math.log(math.exp(8) / (math.exp(2) + math.exp(8)))]
    t2i = [-math.log(math.exp(9) / (math.exp(9) + math.exp(2))),
           -math.log(math.exp(8) / (math.exp(1) + math.exp(8)))]
    expect = (sum(i2t) / 2 + sum(t2i) / 2) / 2
    assert itc_loss(sim, torch.tensor(t, dtype=torch.float64)).item() == pytest.approx(expect, rel=1e-5)
    # two images of one caption: each row's target is split over both; loss = ln 2 at equal sims
    assert itc_loss(torch.zeros(2, 2), 1.0, torch.ones(2, 2, dtype=torch.bool)).item() == \
        pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="diagonal"):
        itc_loss(sim, 1.0, torch.zeros(2, 2, dtype=torch.bool))


def test_itm_and_itg_loss_by_hand():
    logits, labels = torch.tensor([[0.0, 2.0], [1.0, -1.0]]), torch.tensor([1, 0])
    expect = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-2))) / 2
    assert itm_loss(logits, labels).item() == pytest.approx(expect, rel=1e-6)
    # ITG: V = 2, ids [DEC=0, 1, 0, pad]; positions 0 and 1 predict 1 and 0, position 2 predicts a pad
    lg = torch.tensor([[[0.0, 1.0], [3.0, 0.0], [9.0, -9.0], [0.0, 0.0]]])
    ids, mask = torch.tensor([[0, 1, 0, 1]]), torch.tensor([[True, True, True, False]])
    expect = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
    assert itg_loss(lg, ids, mask).item() == pytest.approx(expect, rel=1e-6)


def test_hard_negative_mining_never_picks_a_positive():
    g = torch.Generator().manual_seed(0)
    cap = torch.tensor([0, 0, 1, 2, 2, 3])  # duplicates: images 0/1 and 3/4 share a caption
    pos = cap[:, None] == cap[None, :]
    sim = torch.randn(6, 6, generator=g) * 5 + pos * 20.0  # positives are by far the most similar
    for _ in range(40):
        neg_t, neg_i = mine_hard_negatives(sim, pos, generator=g)
        assert not pos[torch.arange(6), neg_t].any() and not pos[neg_i, torch.arange(6)].any()
    # hard: the most similar negative is drawn most often
    sim = torch.tensor([[9.0, 5.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    draws = torch.stack([mine_hard_negatives(sim, generator=g)[0][0] for _ in range(100)])
    assert (draws == 1).float().mean() > 0.9
    # a batch of one caption has no negative: -1 (ITM skips the row)
    neg_t, _ = mine_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert neg_t.tolist() == [-1, -1]


# ----------------------------------------------------------------------- model and module
def _qformer(in_dim: int = 32, seed: int = 0) -> QFormer:
    torch.manual_seed(seed)
    return QFormer(in_dim=in_dim, out_dim=48, num_queries=4, dim=32, n_layers=2, n_heads=2,
                   cross_attention_every=2)


def _module(seed: int = 0, **kw) -> QFormerPretrainModule:
    m = QFormerPretrainModule(connector=_qformer(seed=seed), tokenizer=ByteCaptionTokenizer(),
                              embed_dim=16, max_text_len=64, **kw)
    m.configure_model()
    return m


def _batch(captions, n_tokens: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    recs = [{"caption": c, "features": torch.randn(1, n_tokens, 32, generator=g)} for c in captions]
    return CaptionCollator(ByteCaptionTokenizer(), max_len=24)(recs)


def test_collator_tokens_and_caption_ids():
    b = _batch(["a cat", "a dog", "a cat"])
    tok = ByteCaptionTokenizer()
    assert b["text_ids"][0, :7].tolist() == [tok.cls_token_id, *b"a cat", tok.eos_token_id]
    assert b["text_mask"].sum(1).tolist() == [7, 7, 7] and b["caption_ids"].tolist() == [0, 1, 0]
    assert b["image_features"].shape == (3, 16, 32)


def test_query_branch_is_the_connector_and_text_reaches_the_image_only_through_queries():
    net = QFormerWithText(qformer=_qformer(), vocab_size=260, max_text_len=32)
    b = _batch(["a red rocket", "a grey cat"])
    feats, ids, tm = b["image_features"], b["text_ids"], b["text_mask"]
    q, t = net.encode(feats, ids, unimodal_mask(tm, 4))
    # uni-modal: the queries are exactly the connector's forward (before its LLM projection)
    assert torch.allclose(net.qformer.proj(q), net.qformer(feats), atol=1e-5)
    _, t2 = net.encode(torch.randn_like(feats), ids, unimodal_mask(tm, 4))
    assert torch.allclose(t[tm], t2[tm], atol=1e-6)  # text alone never sees the image
    # multimodal causal: a later token changes neither the queries nor the earlier text
    ids2 = ids.clone()
    ids2[:, 5] = 7
    mc = multimodal_causal_mask(tm, 4)
    (qa, ta), (qb, tb) = net.encode(feats, ids, mc), net.encode(feats, ids2, mc)
    assert torch.allclose(qa, qb, atol=1e-6) and torch.allclose(ta[:, :5], tb[:, :5], atol=1e-6)
    assert not torch.allclose(ta[:, 5:], tb[:, 5:])
    # bidirectional: the queries do read the text
    qa, _ = net.encode(feats, ids, bidirectional_mask(tm, 4))
    qb, _ = net.encode(feats, ids2, bidirectional_mask(tm, 4))
    assert not torch.allclose(qa, qb)


def test_gradients_reach_queries_and_text_branch():
    m = _module()
    out = m.forward_losses(_batch(["a cat", "a dog", "the moon", "a cat"]))
    assert all(torch.isfinite(out[k]) for k in ("itc", "itm", "itg"))
    out["loss"].backward()
    net = m.net
    for name, p in [("queries", net.qformer.queries), ("word_embed", net.word_embed.weight),
                    ("pos_embed", net.pos_embed.weight), ("self_attn", net.qformer.layers[1].self_attn.key.weight),
                    ("cross_attn", net.qformer.layers[0].cross_attn.value.weight),
                    ("text_ffn", net.text_ffn[0].fc1.weight), ("itm_head", net.itm_head.weight),
                    ("temperature", net.temp)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert net.qformer.proj.weight.grad is None  # the LLM projection is stage 1's to train


def test_pretrained_connector_saves_and_loads_for_stage1(tmp_path):
    m = _module(seed=3)
    path = m.save_connector(tmp_path / "connector.safetensors")
    back = load_connector(path)
    feats = torch.randn(2, 16, 32)
    assert isinstance(back, QFormer) and torch.allclose(back(feats), m.qformer(feats))
    fresh = _qformer(seed=9)
    fresh.load(path)  # what VisionLanguageModule(connector_init_from=path) does
    assert torch.allclose(fresh(feats), m.qformer(feats))


# ------------------------------------------------------------------------ the measured run
STEPS = 60


def test_measured_itc_recall_on_skimage_pairs(tmp_path):
    """Lightning fit on the scikit-image caption pairs (features cached once from a frozen tiny
    ViT): ITC image->text recall@1 over every pair, before and after, and the saved connector."""
    import lightning as L

    from components.blip2_qformer.data import CaptionDataModule
    from mmllm.nn.vision import TINY_VIT

    L.seed_everything(0, verbose=False)
    dm = CaptionDataModule(vision={"model_cfg": TINY_VIT}, feature_cache=str(tmp_path / "cache"),
                           batch_size=16, max_len=48)
    dm.setup("fit")
    assert "features" in dm.train_set[0]  # trained from the cache: the encoder never runs
    connector = QFormer(in_dim=dm.encoder.width, out_dim=32, num_queries=8, dim=64, n_layers=2,
                        n_heads=4)
    out_file = tmp_path / "connector.safetensors"
    m = QFormerPretrainModule(connector=connector, vision=dm.encoder, tokenizer=dm.tokenizer,
                              embed_dim=32, max_text_len=48, save_connector_to=str(out_file),
                              optimizer=lambda groups: torch.optim.AdamW(groups, lr=2e-3, weight_decay=0.05))
    m.configure_model()
    full = dm.collator(dm.train_set)  # every pair: retrieval among all captions
    n_captions = len(set(full["caption_ids"].tolist()))
    before = m.recall_at_1(full)
    torch.manual_seed(0)  # the ITM negatives are drawn
    first = {k: float(v) for k, v in m.forward_losses(full).items()}
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(m, datamodule=dm)
    after = m.recall_at_1(full)
    torch.manual_seed(0)
    last = {k: float(v) for k, v in m.forward_losses(full).items()}
    print(f"\nBLIP-2 stage 1, {len(dm.train_set)} pairs / {n_captions} captions, {STEPS} steps: "
          f"ITC i2t R@1 {before:.3f} -> {after:.3f} (chance {1 / n_captions:.3f}); "
          + "; ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in ("itc", "itm", "itg")))
    assert after >= 5 / n_captions and after >= before + 0.2  # 0.29-0.66 on 58 pairs (thread count)
    assert last["itg"] < first["itg"] - 0.5 and last["itc"] < first["itc"] - 0.5
    assert torch.allclose(load_connector(out_file)(full["image_features"]), m.qformer(full["image_features"]))




@pytest.mark.parametrize("override", ["module=blip2_qformer", "experiment=blip2_qformer"])
def test_config_composes_and_instantiates(override, tmp_path):
    from hydra.utils import instantiate

    from components.blip2_qformer.data import CaptionDataModule
    from mmllm.config import compose_config

    cfg = compose_config("train", [override, "module.connector.dim=32",
                                   "module.connector.n_heads=2"], output_dir=tmp_path)
    assert cfg.module._target_ == "components.blip2_qformer.module.QFormerPretrainModule"
    assert cfg.module.optimizer.weight_decay == 0.05 and cfg.module.out_dim == cfg.model.lm.dim
    module = instantiate(cfg.module, model=None)
    assert isinstance(module, QFormerPretrainModule)
    q = module.connector_factory(in_dim=16, out_dim=cfg.module.out_dim)
    assert isinstance(q, QFormer) and q.num_queries == 32
    if override.startswith("experiment"):
        assert isinstance(instantiate(cfg.data), CaptionDataModule)
        assert cfg.data.max_len == cfg.module.max_text_len
