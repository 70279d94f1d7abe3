"""VLM stage 1: training samples/s with and without the frozen-encoder feature cache, one run.

Stage 1 trains only the connector; the vision encoder is frozen, so its features can be computed
once (:func:`mmllm.data.feature_cache.build_feature_cache`) and read from disk. Both modes run the
same VisionLanguageModule step (connector + frozen LM forward/backward, AdamW on the connector)
on the same caption records and batches:

* images: collate preprocesses the PIL images (open_clip's transform) and the encoder runs;
* cache: collate reads (k, N, Dv) features from the safetensors shards, the encoder never runs.

Timed per batch: collate + forward + backward + optimizer step. The modes alternate in
``--rounds`` chunks so machine load drifts hit both; on CPU the time is process CPU time with one
thread (a shared machine's wall clock drifts), on CUDA wall-clock with synchronisation. The
one-off cache build time is reported separately. The last line is JSON.

    python benchmarks/vlm_stage1.py                   # CPU: ViT-S/16-like 224 px, 4-layer LM
    python benchmarks/vlm_stage1.py --device cuda     # GPU: ViT-L/14 224 px, SmolLM2-135M shapes, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from mmllm.data.feature_cache import FeatureCache, build_feature_cache
from mmllm.data.tokenizer import train_bpe_tokenizer
from mmllm.data.vlm_collate import VLMCollator, add_vlm_tokens, vlm_token_ids
from mmllm.models import DecoderLM
from mmllm.models.vlm import build_vlm
from mmllm.nn.connectors import MLPConnector
from mmllm.nn.vision import VisionEncoder

VIT_S16 = {"embed_dim": 384, "vision_cfg": {"image_size": 224, "layers": 12, "width": 384,
                                            "head_width": 64, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 384, "heads": 6, "layers": 1}}
PRESETS = {
    "cpu": {"vision": {"model_cfg": VIT_S16}, "lm": dict(dim=256, n_layers=4, n_heads=4, hidden_dim=768)},
    "cuda": {"vision": {"model_name": "ViT-L-14"},
             "lm": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536)},
}


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = ["a", "red", "blue", "cat", "dog", "on", "the", "mat", "photo", "of", "tree", "car"]
    return [{"images": [Image.fromarray((rng.random((256, 320, 3)) * 255).astype(np.uint8))],
             "caption": " ".join(rng.choice(words, size=12))} for _ in range(n)]


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--records", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="batches per mode per round")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    preset = PRESETS["cuda" if device.type == "cuda" else "cpu"]
    torch.manual_seed(0)
    records = _records(args.records)
    tok = train_bpe_tokenizer([r["caption"] for r in records] * 4, vocab_size=400, show_progress=False)
    add_vlm_tokens(tok)
    encoder = VisionEncoder(**preset["vision"]).to(device)
    lm = DecoderLM(vocab_size=len(tok), max_seq_len=1024, **preset["lm"])
    vlm = build_vlm(connector=MLPConnector(in_dim=encoder.width, out_dim=lm.dim),
                    image_token_id=vlm_token_ids(tok)[1], vocab_size=len(tok), lm=lm, vision=encoder)
    vlm.decoder.requires_grad_(False)
    vlm = vlm.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opt = torch.optim.AdamW(vlm.connector.parameters(), lr=1e-4)
    collate = VLMCollator(tok, num_image_tokens=encoder.num_tokens, image_transform=encoder.preprocess,
                          instruction_prob=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_feature_cache(encoder, records, tmp, batch_size=args.batch)
        build_s = time.perf_counter() - t0
        cache = FeatureCache(tmp)
        sources = {"images": records, "cache": cache}
        times: dict[str, list[float]] = {"images": [], "cache": []}
        losses: dict[str, list[float]] = {"images": [], "cache": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for mode, data in sources.items():
                for s in range(args.steps):
                    i = (r * args.steps + s) * args.batch % len(records)
                    t = _clock(device)
                    batch = collate([data[j % len(records)] for j in range(i, i + args.batch)])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                        out = vlm(batch["input_ids"], images=batch.get("images"),
                                  image_features=batch.get("image_features"))
                        loss = torch.nn.functional.cross_entropy(
                            out.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    if r:
                        times[mode].append(_clock(device) - t)
                        losses[mode].append(loss.item())
    res = {"device": str(device), "encoder": encoder.clip_name, "image_tokens": encoder.num_tokens,
           "lm_params": lm.num_params(), "batch": args.batch, "cache_build_s": round(build_s, 2)}
    for mode in sources:
        res[f"{mode}_samples_per_s"] = round(args.batch / statistics.median(times[mode]), 2)
    res["speedup"] = round(res["cache_samples_per_s"] / res["images_samples_per_s"], 2)
    print(f"stage 1 on {device}: {encoder.clip_name} ({encoder.num_tokens} tokens/image), "
          f"LM {lm.num_params() / 1e6:.1f} M params, batch {args.batch}")
    print(f"  images: {res['images_samples_per_s']} samples/s   cache: {res['cache_samples_per_s']} "
          f"samples/s   speedup {res['speedup']}x   (cache built once in {build_s:.1f} s)")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
