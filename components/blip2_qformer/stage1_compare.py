"""Stage-1 captioning loss from a BLIP-2-pretrained vs a random-init Q-Former (README "Measured").

Tiny and CPU-sized: scikit-image pairs, tiny random ViT (features cached), a 60-step Q-Former
pretraining, a tiny LM trained on the captions alone and then frozen, and 60 stage-1 steps (only
the connector trains) from each Q-Former; prints the stage-1 loss on every pair before and after.

    PYTHONPATH=. python -m components.blip2_qformer.stage1_compare [cache_dir]
"""

from __future__ import annotations

import copy
import sys

import lightning as L
import torch
import torch.nn.functional as F

from components.blip2_qformer.data import CaptionDataModule
from components.blip2_qformer.module import QFormerPretrainModule
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import VLMCollator, add_vlm_tokens, vlm_token_ids
from mmllm.losses import causal_lm_loss
from mmllm.models import DecoderLM
from mmllm.models.vlm import build_vlm
from mmllm.nn.connectors import QFormer
from mmllm.nn.vision import TINY_VIT


def _caption_lm(tok, captions: list[str], steps: int = 150) -> DecoderLM:
    """A tiny LM that knows the captions' language (stage 1 freezes it)."""
    torch.manual_seed(1)
    lm = DecoderLM(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                   max_seq_len=256, tie_embeddings=True)
    ids = [torch.tensor(tok.encode(c) + [tok.eos_token_id or 0]) for c in captions]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(steps):
        b = torch.nn.utils.rnn.pad_sequence([ids[i] for i in torch.randint(len(ids), (8,))],
                                            batch_first=True, padding_value=-100)  # (8, T)
        logits = lm(b.clamp(min=0)).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), b[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm.requires_grad_(False)


def _stage1_loss(vlm, batch) -> torch.Tensor:
    out = vlm(batch["input_ids"], image_features=batch["image_features"])
    return causal_lm_loss(out.logits, batch["labels"])[0]


def main(cache_dir: str = "/tmp/blip2_stage1_compare_cache", steps: int = 60) -> dict[str, tuple[float, float]]:
    L.seed_everything(0, verbose=False)
    dm = CaptionDataModule(vision={"model_cfg": TINY_VIT}, feature_cache=cache_dir, batch_size=16, max_len=48)
    dm.setup("fit")
    connector = QFormer(in_dim=dm.encoder.width, out_dim=32, num_queries=8, dim=64, n_layers=2, n_heads=4)
    random_init = copy.deepcopy(connector)
    m = QFormerPretrainModule(connector=connector, vision=dm.encoder, tokenizer=dm.tokenizer, embed_dim=32,
                              max_text_len=48, optimizer=lambda g: torch.optim.AdamW(g, lr=2e-3, weight_decay=0.05))
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(m, datamodule=dm)
    tok = train_bpe_tokenizer([" ".join(r["caption"] for r in dm.train_set)] * 20, vocab_size=400,
                              show_progress=False)
    add_vlm_tokens(tok)
    lm0 = _caption_lm(tok, [r["caption"] for r in dm.train_set])
    col = VLMCollator(tok, num_image_tokens=8, instruction_prob=0.0)
    full, results = col(list(dm.train_set)), {}
    for name, q in (("random-init Q-Former", random_init), ("BLIP-2-pretrained Q-Former", m.qformer)):
        vlm = build_vlm(connector=copy.deepcopy(q), image_token_id=vlm_token_ids(tok)[1],
                        vocab_size=len(tok), lm=copy.deepcopy(lm0))
        vlm.decoder.requires_grad_(False)
        opt = torch.optim.AdamW(vlm.connector.parameters(), lr=2e-3, weight_decay=0.0)

        with torch.no_grad():
            start = float(_stage1_loss(vlm, full))
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            idx = torch.randperm(len(dm.train_set), generator=g)[:8].tolist()
            step_loss = _stage1_loss(vlm, col([dm.train_set[i] for i in idx]))
            opt.zero_grad()
            step_loss.backward()
            opt.step()
        with torch.no_grad():
            results[name] = (start, float(_stage1_loss(vlm, full)))
        print(f"{name}: stage-1 loss {results[name][0]:.3f} -> {results[name][1]:.3f} after {steps} steps")
    return results


if __name__ == "__main__":
    main(*sys.argv[1:2])
