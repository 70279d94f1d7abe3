"""LLaVA export: a tiny open_clip ViT + MLP/linear connector + DecoderLM saved as transformers'
LlavaForConditionalGeneration reloads with the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import VLMCollator, add_vlm_tokens, vlm_token_ids
from mmllm.models import DecoderLM
from mmllm.models.hf_llava import export_llava
from mmllm.models.vlm import build_vlm
from mmllm.nn.connectors import LinearConnector, MLPConnector, QFormer
from mmllm.nn.vision import TINY_VIT, VisionEncoder


@pytest.fixture(scope="module")
def tok():
    t = train_bpe_tokenizer(["a photo of a cat on a mat. describe the image. " * 30], vocab_size=300,
                            show_progress=False)
    add_vlm_tokens(t)
    return t


@pytest.mark.parametrize("connector,feature_layer,keep_cls,tie", [
    ("mlp", -2, False, True), ("linear", -1, True, False)])
def test_llava_export_logits_match(tok, tmp_path, connector, feature_layer, keep_cls, tie):
    from transformers import LlavaForConditionalGeneration

    enc = VisionEncoder(model_cfg=TINY_VIT, feature_layer=feature_layer, keep_cls=keep_cls)
    with torch.no_grad():  # non-trivial LayerNorm/bias values, so a missed mapping shows
        for n, p in enc.named_parameters():
            if n.endswith("bias") or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    lm = DecoderLM(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                   max_seq_len=128, tie_embeddings=tie)
    conn = MLPConnector(in_dim=32, out_dim=32) if connector == "mlp" else LinearConnector(in_dim=32, out_dim=32)
    vlm = build_vlm(connector=conn, image_token_id=vlm_token_ids(tok)[1], vocab_size=len(tok),
                    lm=lm, vision=enc).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((36, 40, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    col = VLMCollator(tok, num_image_tokens=vlm.num_image_tokens, image_transform=enc.preprocess)
    batch = col([{"images": images, "messages": [
        {"role": "user", "content": "<image> and <image>: describe the image."},
        {"role": "assistant", "content": "a cat on a mat"}]}])
    with torch.no_grad():
        ours = vlm(batch["input_ids"], images=batch["images"]).logits
    out = export_llava(vlm, tmp_path / "llava", tokenizer=tok)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out)).eval()
    assert hf.config.image_token_id == vlm_token_ids(tok)[1]
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], pixel_values=batch["images"]).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_llava_export_refuses_qformer(tok, tmp_path):
    enc = VisionEncoder(model_cfg=TINY_VIT)
    lm = DecoderLM(vocab_size=300, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=128)
    vlm = build_vlm(connector=QFormer(in_dim=32, out_dim=32, num_queries=4, dim=32, n_layers=1, n_heads=2),
                    image_token_id=vlm_token_ids(tok)[1], vocab_size=len(tok), lm=lm, vision=enc)
    with pytest.raises(ValueError, match="cannot be exported"):
        export_llava(vlm, tmp_path / "x")
