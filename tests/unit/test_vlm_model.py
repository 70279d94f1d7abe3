"""Vision-language model: encoder features, connectors, placeholders (0/1/3 images), loss masks,
connector save/load, generation with images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmllm.data.chat import MaskError
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import (
    IGNORE_INDEX,
    IMG_END,
    IMG_START,
    VLMCollator,
    add_vlm_tokens,
    vlm_token_ids,
)
from mmllm.models import DecoderLM
from mmllm.models.vlm import build_vlm
from mmllm.nn.connectors import (
    LinearConnector,
    MLPConnector,
    QFormer,
    VisualAbstractor,
    load_connector,
)
from mmllm.nn.vision import TINY_VIT, VisionEncoder

TEXT = "a photo of a cat. a red square on a blue background. describe the image. what is this? " * 40


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer([TEXT], vocab_size=320, show_progress=False)
    assert add_vlm_tokens(t) == 3
    assert add_vlm_tokens(t) == 0  # idempotent
    return t


@pytest.fixture(scope="module")
def encoder():
    return VisionEncoder(model_cfg=TINY_VIT)


def _img(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))


CONNECTORS = {
    "linear": lambda: LinearConnector(in_dim=32, out_dim=32),
    "mlp": lambda: MLPConnector(in_dim=32, out_dim=32, hidden_dim=48),
    "qformer": lambda: QFormer(in_dim=32, out_dim=32, num_queries=4, dim=32, n_layers=3, n_heads=2,
                               cross_attention_every=2),
    "abstractor": lambda: VisualAbstractor(in_dim=32, out_dim=32, num_queries=5, dim=24,
                                           n_layers=2, n_heads=2),
}


def _vlm(tok, encoder, connector):
    lm = DecoderLM(vocab_size=320, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=256)
    return build_vlm(connector=connector, image_token_id=vlm_token_ids(tok)[1], vocab_size=len(tok),
                     lm=lm, vision=encoder)


def test_encoder_layer_and_cls(encoder):
    x = torch.randn(2, 3, 32, 32)
    assert encoder(x).shape == (2, 16, 32) and encoder.num_tokens == 16
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training  # a frozen encoder stays in eval mode
    # Feature layer -2 = output of block 0 of 2: recompute by hand from open_clip's modules.
    v = encoder.visual
    h = v._embeds(x)
    h = v.transformer.resblocks[0](h)
    torch.testing.assert_close(encoder(x), h[:, 1:])
    with_cls = VisionEncoder(model_cfg=TINY_VIT, keep_cls=True, feature_layer=-1)
    with_cls.load_state_dict(encoder.state_dict())
    full = v.transformer.resblocks[1](h)
    torch.testing.assert_close(with_cls(x), full)  # CLS first, then the 16 patches
    with pytest.raises(ValueError, match="feature_layer"):
        VisionEncoder(model_cfg=TINY_VIT, feature_layer=2)
    with pytest.raises(ValueError, match="QuickGELU"):  # checked before any download
        VisionEncoder(model_name="ViT-L-14", pretrained="openai")
    with pytest.raises(FileNotFoundError, match="neither a file nor"):
        VisionEncoder(model_cfg=TINY_VIT, pretrained="/no/such/weights.pt")


@pytest.mark.parametrize("name", list(CONNECTORS))
def test_connector_shapes_and_grads(name):
    conn = CONNECTORS[name]()
    feats = torch.randn(3, 16, 32, requires_grad=True)
    out = conn(feats)
    m = conn.num_output_tokens(16)
    assert out.shape == (3, m, 32)
    out.square().mean().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for n, p in conn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    if name in ("qformer", "abstractor"):  # queries: M is fixed whatever N
        assert conn(torch.randn(2, 7, 32)).shape == (2, m, 32)


def test_qformer_cross_attention_every_k_and_bert_init():
    from transformers import BertConfig, BertModel

    q = QFormer(in_dim=32, out_dim=16, num_queries=4, dim=32, n_layers=4, n_heads=2,
                cross_attention_every=2, hidden_dim=64)
    assert [layer.cross_attn is not None for layer in q.layers] == [True, False, True, False]
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64, vocab_size=50))
    q.init_from_bert(bert)
    torch.testing.assert_close(q.layers[3].self_attn.key.weight, bert.encoder.layer[3].attention.self.key.weight)
    torch.testing.assert_close(q.layers[1].fc2.bias, bert.encoder.layer[1].output.dense.bias)
    with pytest.raises(ValueError, match="does not fit"):
        QFormer(in_dim=32, out_dim=16, num_queries=4, dim=32, n_layers=5, n_heads=2,
                hidden_dim=64).init_from_bert(bert)


def test_connector_save_load(tmp_path):
    a = CONNECTORS["qformer"]()
    path = a.save(tmp_path / "connector.safetensors")
    b = load_connector(path)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(a(x), b(x))
    c = CONNECTORS["qformer"]()
    c.load(path)  # onto another run with the same shapes
    torch.testing.assert_close(a(x), c(x))
    with pytest.raises(ValueError, match="shape mismatch"):
        QFormer(in_dim=32, out_dim=32, num_queries=8, dim=32, n_layers=3, n_heads=2).load(path)
    with pytest.raises(ValueError, match="does not fit"):
        MLPConnector(in_dim=32, out_dim=32).load(path)


@pytest.mark.parametrize("counts", [(0, 1, 3)])
def test_placeholders_and_loss_mask(tok, encoder, counts):
    """0, 1 and 3 images in one batch land at their placeholders; they are never targets."""
    vlm = _vlm(tok, encoder, CONNECTORS["mlp"]()).eval()
    M = vlm.num_image_tokens
    col = VLMCollator(tok, num_image_tokens=M, image_transform=encoder.preprocess, instruction_prob=0.0)
    records = [{"images": [], "caption": "a red square"},
               {"images": [_img(1)], "caption": "a photo of a cat"},
               {"images": [_img(2), _img(3), _img(4)], "messages": [
                   {"role": "user", "content": "<image> and <image>\nwhat is this? <image>"},
                   {"role": "assistant", "content": "a cat"}]}]
    batch = col(records)
    start, feat, end = vlm_token_ids(tok)
    ids, labels = batch["input_ids"], batch["labels"]
    assert batch["images"].shape == (4, 3, 32, 32)
    assert [int((row == feat).sum()) for row in ids] == [n * M for n in counts]
    assert [int((row == start).sum()) for row in ids] == list(counts)
    for tid in (start, feat, end):
        assert not (labels == tid).any()  # image tokens are never predicted
    # Caption rows: only the caption + eos are targets.
    sup = [tok.decode([t for t in row if t != IGNORE_INDEX]) for row in labels]
    assert sup[0] == " a red square</s>" and sup[1] == " a photo of a cat</s>"
    assert sup[2] == "a cat<|im_end|>"
    # The features of image k sit at the k-th span, in order.
    emb = vlm.embed(ids, images=batch["images"])
    proj = vlm.connector(encoder(batch["images"]))
    spans = torch.nonzero(ids == feat)
    torch.testing.assert_close(emb[spans[:, 0], spans[:, 1]], proj.reshape(-1, 32))
    text_pos = ids != feat
    torch.testing.assert_close(emb[text_pos], vlm.decoder.embed_tokens(ids)[text_pos])
    # Row 1's logits do not depend on row 2's images (per-sample placement).
    out = vlm(ids, images=batch["images"]).logits
    other = batch["images"].clone()
    other[1:] = torch.randn_like(other[1:])
    out2 = vlm(ids, images=other).logits
    torch.testing.assert_close(out[:2], out2[:2])
    assert not torch.allclose(out[2], out2[2])


def test_mismatches_are_errors(tok, encoder):
    vlm = _vlm(tok, encoder, CONNECTORS["linear"]())
    col = VLMCollator(tok, num_image_tokens=vlm.num_image_tokens, image_transform=encoder.preprocess)
    batch = col([{"images": [_img(0)], "caption": "a cat"}])
    with pytest.raises(ValueError, match="image positions"):
        vlm(batch["input_ids"], images=batch["images"][:0])
    with pytest.raises(ValueError, match="image positions"):
        vlm(batch["input_ids"], images=torch.cat([batch["images"]] * 2))
    with pytest.raises(ValueError, match="placeholders"):
        col([{"images": [_img(0)], "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "a cat"}]}])
    with pytest.raises(ValueError, match="assistant turn"):
        col([{"images": [_img(0)], "messages": [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "<image>"}]}])
    with pytest.raises(ValueError, match="inside an image span"):
        VLMCollator(tok, num_image_tokens=16, image_transform=encoder.preprocess, max_len=10)(
            [{"images": [_img(0)], "caption": "a cat"}])
    with pytest.raises(MaskError):  # nothing left to supervise after truncation
        VLMCollator(tok, num_image_tokens=1, image_transform=encoder.preprocess, max_len=4,
                    instruction_prob=1.0, instructions=["describe the image describe the image"])(
            [{"images": [_img(0)], "caption": "a cat"}])


def test_minigpt4_format(tok, encoder):
    col = VLMCollator(tok, num_image_tokens=2, image_transform=encoder.preprocess, chat_template="minigpt4")
    r = col.encode_messages([{"role": "user", "content": "<image> Describe the image."},
                             {"role": "assistant", "content": "a cat"}], 1)
    text = tok.decode(r.input_ids)
    assert text == (f"###Human: {IMG_START}<ImageFeature><ImageFeature>{IMG_END} Describe the image. "
                    "###Assistant: a cat</s>\n")
    assert tok.decode([t for t, m in zip(r.input_ids, r.loss_mask) if m]) == "a cat</s>"


def test_generate_with_images_matches_forward(tok, encoder):
    vlm = _vlm(tok, encoder, CONNECTORS["abstractor"]()).eval()
    col = VLMCollator(tok, num_image_tokens=vlm.num_image_tokens, image_transform=encoder.preprocess)
    prompt = col.image_ids + tok(" a photo", add_special_tokens=False)["input_ids"]
    images = encoder.preprocess_images([_img(5)])
    new = vlm.generate([prompt], [images], max_new_tokens=4)[0]
    # Greedy decoding by full recomputation (no cache) gives the same tokens.
    ids = list(prompt)
    for _ in range(4):
        logits = vlm(torch.tensor([ids]), images=images).logits[0, -1]
        ids.append(int(logits.argmax()))
    assert new == ids[len(prompt):]


def test_batched_generate_with_a_bar_equals_one_image_at_a_time(tok, encoder, capsys):
    # The VLM stage captions its images in one batch (with a bar): same tokens as one by one.
    vlm = _vlm(tok, encoder, CONNECTORS["mlp"]()).eval()
    col = VLMCollator(tok, num_image_tokens=vlm.num_image_tokens, image_transform=encoder.preprocess)
    prompt = col.image_ids + tok(" a photo", add_special_tokens=False)["input_ids"]
    images = [encoder.preprocess_images([_img(k)]) for k in (1, 2, 3)]
    alone = [vlm.generate([prompt], [im], max_new_tokens=5)[0] for im in images]
    batched = vlm.generate([prompt] * 3, images, max_new_tokens=5, progress="captions")
    assert batched == alone
    assert "captions" in capsys.readouterr().err
