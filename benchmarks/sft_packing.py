"""SFT packing vs padding: padding waste and training tokens/s in one run.

Examples get lognormal token lengths like Alpaca's (median ~150 tokens, long tail; Alpaca's 52k
rows under a LLaMA tokenizer have median ~130-170 and a few above 1k), a prompt of 30-50 % of
each and a supervised response. The same examples are batched two ways:

* padded: random order, ``--padded-batch`` examples per batch, each padded to the batch's
  longest (rounded to 8), as ``SFTDataModule(packing=False)`` does;
* packed: best-fit decreasing into rows of ``--seq`` tokens, ``--packed-batch`` rows per batch,
  with per-document attention (``doc_ids``), as ``SFTDataModule(packing=True)`` does.

Reported per mode: padding fraction of all batch slots, and from timed training steps (forward
+ backward + AdamW on a DecoderLM, the kit's causal LM loss) real tokens/s and supervised
tokens/s. The modes alternate in ``--rounds`` chunks so machine load drifts hit both; on CPU the
time is process CPU time with one thread (a shared machine's wall clock drifts), on CUDA it is
wall-clock with synchronisation. The last line is JSON.

    python benchmarks/sft_packing.py                    # CPU: 5 M-parameter model, seq 1024
    python benchmarks/sft_packing.py --device cuda      # GPU: 125 M-parameter model, seq 2048, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from mmllm.data.packing import collate_packed, collate_padded, fit_examples, pack
from mmllm.losses import IGNORE_INDEX, causal_lm_loss
from mmllm.models import DecoderLM

PRESETS = {
    "cpu": {"model": {"vocab_size": 8192, "dim": 192, "n_layers": 4, "n_heads": 6,
                      "n_kv_heads": 2, "hidden_dim": 512},
            "seq": 1024, "examples": 512, "padded_batch": 8, "packed_batch": 2, "steps": 2,
            "rounds": 5},
    "cuda": {"model": {"vocab_size": 32000, "dim": 768, "n_layers": 12, "n_heads": 12,
                       "n_kv_heads": 4, "hidden_dim": 2048},
             "seq": 2048, "examples": 8192, "padded_batch": 16, "packed_batch": 4, "steps": 10,
             "rounds": 4},
}


def make_examples(n: int, *, seq: int, vocab: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Alpaca-like examples: lognormal lengths, the response after a 30-50 % prompt supervised."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=np.log(150), sigma=0.75, size=n), 16, 4 * seq).astype(int)
    out = []
    for length in lengths:
        ids = rng.integers(8, vocab, size=length)
        labels = np.full(length, IGNORE_INDEX)
        cut = int(length * rng.uniform(0.3, 0.5))
        labels[cut:-1] = ids[cut + 1:]
        out.append((ids, labels))
    return fit_examples(out, seq, overlong="truncate")


def batches(examples, mode: str, cfg: dict, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    if mode == "padded":
        order = rng.permutation(len(examples))
        b = cfg["padded_batch"]
        return [collate_padded([examples[i] for i in order[k:k + b]], pad_id=0)
                for k in range(0, len(order), b)]
    rows = [[examples[i] for i in row] for row in pack(examples, cfg["seq"])]
    order = rng.permutation(len(rows))
    b = cfg["packed_batch"]
    return [collate_packed([rows[i] for i in order[k:k + b]], pad_id=0, length=cfg["seq"])
            for k in range(0, len(order), b)]


def step_fn(model, opt, device, dtype):
    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch["input_ids"], doc_ids=batch.get("doc_ids"))
            loss, _ = causal_lm_loss(out.logits, batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seq", type=int)
    ap.add_argument("--examples", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--attn", default=None, help="attention backend (default sdpa; flash_attn on CUDA if installed)")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = dict(PRESETS["cuda" if device.type == "cuda" else "cpu"])
    for k in ("seq", "examples", "steps", "rounds"):
        if getattr(args, k):
            cfg[k] = getattr(args, k)
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from mmllm.nn.attention import FLASH_ATTN_AVAILABLE

    attn = args.attn or ("flash_attn" if device.type == "cuda" and FLASH_ATTN_AVAILABLE else "sdpa")
    examples = make_examples(cfg["examples"], seq=cfg["seq"], vocab=cfg["model"]["vocab_size"])
    lengths = np.array([len(x[0]) for x in examples])
    sup_total = sum(int((lab != IGNORE_INDEX).sum()) for _, lab in examples)
    modes = {m: batches(examples, m, cfg) for m in ("padded", "packed")}
    stats = {}
    for m, bs in modes.items():
        slots = sum(b["input_ids"].numel() for b in bs)
        stats[m] = {"batches": len(bs), "slots": slots,
                    "padding_fraction": round(1 - lengths.sum() / slots, 4),
                    "tokens_per_batch": round(lengths.sum() / len(bs), 1)}
    torch.manual_seed(0)
    model = DecoderLM(**cfg["model"], max_seq_len=cfg["seq"], attn_backend=attn).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = step_fn(model, opt, device, dtype)
    clock = (lambda: (torch.cuda.synchronize(), time.perf_counter())[1]) if device.type == "cuda" \
        else time.process_time
    for m in modes:  # warm-up (kernels, allocator, autotuning)
        for b in modes[m][:2]:
            step(b)
    rates = {m: {"tokens_per_s": [], "supervised_per_s": []} for m in modes}
    cursor = {m: 0 for m in modes}
    for _ in range(cfg["rounds"]):
        for m, bs in modes.items():
            chunk = [bs[(cursor[m] + i) % len(bs)] for i in range(cfg["steps"])]
            cursor[m] += cfg["steps"]
            real = sum(int(b["input_ids"].ne(0).sum()) for b in chunk)  # ids >= 8: pad id 0 only
            sup = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in chunk)
            t0 = clock()
            for b in chunk:
                step(b)
            dt = clock() - t0
            rates[m]["tokens_per_s"].append(real / dt)
            rates[m]["supervised_per_s"].append(sup / dt)
    for m in modes:
        stats[m].update({k: round(statistics.median(v), 1) for k, v in rates[m].items()})
    stats["speedup_packed_over_padded"] = round(
        stats["packed"]["tokens_per_s"] / stats["padded"]["tokens_per_s"], 2)
    stats["setup"] = {"device": str(device), "attn": attn, "dtype": str(dtype).split(".")[-1],
                      "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                      "examples": len(examples), "median_len": int(np.median(lengths)),
                      "p95_len": int(np.percentile(lengths, 95)), "max_len": int(lengths.max()),
                      "supervised_tokens": sup_total, "seq": cfg["seq"]}
    for m in modes:
        s = stats[m]
        print(f"{m:>6}: padding {s['padding_fraction']:.1%} of {s['slots']} slots, "
              f"{s['tokens_per_s']:.0f} tokens/s, {s['supervised_per_s']:.0f} supervised tokens/s")
    print(f"packed / padded tokens/s: {stats['speedup_packed_over_padded']}x")
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
