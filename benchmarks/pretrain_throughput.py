"""Pretraining step throughput: mmllm's training step vs transformers' LlamaForCausalLM.

One run compares, on the same Llama config, batch, precision, attention backend and optimizer:

* throughput: tokens/s of our step (``CausalLMModule.forward_loss`` + backward + clip + AdamW)
  against the same loop around ``LlamaForCausalLM``; ratio ours/HF, peak memory, and on CUDA the
  achieved TFLOP/s and MFU (FLOPs: ``6 N + 12 L T d``, see mmllm.callbacks.throughput);
* memory: our step's peak memory without / with full / with selective activation checkpointing,
  with bitsandbytes AdamW8bit instead of AdamW, and with the LM head fused into the loss;
* fused loss (``ours_fused`` side on CUDA): our step with ``fused_loss=true`` (liger-kernel's
  fused linear + cross-entropy; the chunked fallback on CPU), tokens/s, MFU and peak memory.

Each measurement runs in a fresh subprocess. On CPU both sides share one process and alternate
``rounds`` chunks of ``steps`` steps (a shared machine's load drifts: the ratio is the median of
per-round ratios); on CUDA each side has its own process (two 1B models need not fit together).
Peak memory by category (parameters, gradients, activations, optimizer state) comes from torch's
MemTracker, which works on CPU and CUDA alike; on CUDA the allocator's peak is reported too.

    python benchmarks/pretrain_throughput.py                 # CPU: small Llama, fp32
    python benchmarks/pretrain_throughput.py --device cuda   # GPU: ~1.1B Llama, seq 2048, bf16,
                                                             # SDPA-flash, fused AdamW, compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    # ~7.9 M parameters: a few seconds per case on a 2-core CPU.
    "cpu": dict(model=dict(vocab_size=8192, dim=256, n_layers=4, n_heads=8, n_kv_heads=4,
                           hidden_dim=688), seq=256, batch=4, steps=2, warmup=2,
                rounds=8, precision="fp32", compile=False),
    # TinyLlama-1.1B shapes (GQA 32/4, SwiGLU 5632, 22 layers, 32k vocab).
    "1b": dict(model=dict(vocab_size=32000, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4,
                          hidden_dim=5632), seq=2048, batch=8, steps=10, warmup=5,
               rounds=3, precision="bf16", compile=True),
}


def build(side: str, cfg: dict, case: dict, device):
    """The model of one side (identical weights: ours is loaded from the HF model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmllm.models import DecoderLM
    from mmllm.models.hf import load_hf_state_dict

    attn = case["attn"]
    hf_cfg = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"],
                         intermediate_size=cfg["hidden_dim"], num_hidden_layers=cfg["n_layers"],
                         num_attention_heads=cfg["n_heads"], num_key_value_heads=cfg["n_kv_heads"],
                         max_position_embeddings=case["seq"], rms_norm_eps=1e-5,
                         tie_word_embeddings=False,
                         attn_implementation="flash_attention_2" if attn == "flash_attn" else "sdpa")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg)
    if side == "hf":  # every other side ("ours", "ours_fused") is our DecoderLM
        model = hf
        if case["ac"] != "none":
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = hf.model.layers
    else:
        model = DecoderLM(**cfg, max_seq_len=case["seq"], attn_backend=attn)
        load_hf_state_dict(model, hf.state_dict())
        del hf
        from mmllm.distributed import parallelize

        parallelize(model, None, activation_checkpointing=case["ac"])
        layers = model.layers
    if case["compile"]:
        for layer in layers:  # per block on both sides
            layer.compile()
    return model.to(device).train()


def make_optimizer(params, name: str, device):
    import torch

    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    fused = device.type == "cuda"  # one kernel for all parameters
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)


def make_step(side: str, case: dict, device):
    """Builds one side; returns its ``step()`` (forward, loss, backward, clip, optimizer step)."""
    import torch

    from mmllm.losses import causal_lm_loss
    from mmllm.modules import CausalLMModule

    model = build(side, case["model"], case, device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, case["optimizer"], device)
    fused = case.get("fused_loss", False) or side == "ours_fused"
    module = CausalLMModule(model=model, fused_loss=fused) if side != "hf" else None

    def loss_of(ids, labels):
        if module is not None:  # our training step's loss: CausalLMModule.forward_loss
            return module.forward_loss({"input_ids": ids, "labels": labels})[0]
        return causal_lm_loss(model(input_ids=ids).logits, labels)[0]

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, case["model"]["vocab_size"], (case["batch"], case["seq"] + 1), generator=g)
    ids, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["precision"] == "bf16")

    def step():
        with autocast:
            loss = loss_of(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    step.model, step.opt = model, opt
    return step


def timed(step, n: int) -> tuple[float, float, float]:
    """Wall seconds and CPU seconds of ``n`` steps (reading the last loss syncs the device), the loss."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        loss = step()
    loss = float(loss)
    return time.perf_counter() - t0, time.process_time() - c0, loss


def side_metrics(case: dict, seconds: float, n_steps: int, device) -> dict:
    import torch

    from mmllm.callbacks.throughput import DecoderShape, flops_per_token, peak_tflops

    tps = case["batch"] * case["seq"] * n_steps / seconds
    out = {"tokens_per_s": tps, "step_s": seconds / n_steps}
    if device.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        shape = DecoderShape(**case["model"], head_dim=case["model"]["dim"] // case["model"]["n_heads"])
        out["tflops"] = flops_per_token(shape, case["seq"]) * tps / 1e12
        peak = peak_tflops(torch.cuda.get_device_name(device))
        out["mfu"] = out["tflops"] / peak if peak else None
    return out


def run_throughput(case: dict) -> dict:
    """Throughput of the sides in ``case["sides"]``, alternating ``rounds`` chunks of steps.

    Both sides live in this one process (CPU): alternating chunks exposes them to the same load,
    and the per-round ratio cancels drift of a shared machine. On CUDA one side per process.
    """
    import torch

    device = torch.device(case["device"])
    torch.set_num_threads(case["threads"])
    steps = {side: make_step(side, case, device) for side in case["sides"]}
    first = {side: float(step()) for side, step in steps.items()}
    for step in steps.values():
        timed(step, case["warmup"] - 1)
    wall, cpu, last = {s: [] for s in steps}, {s: [] for s in steps}, {}
    order = list(steps)
    for r in range(case["rounds"]):
        for side in order if r % 2 == 0 else order[::-1]:  # neither side always goes first
            step = steps[side]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            w, c, last[side] = timed(step, case["steps"])
            wall[side].append(w)
            cpu[side].append(c)
    tokens = case["batch"] * case["seq"] * case["steps"]
    out = {}
    for side in steps:
        out[side] = {**side_metrics(case, statistics.median(wall[side]), case["steps"], device),
                     "tokens_per_cpu_s": tokens / statistics.median(cpu[side]),
                     "first_loss": first[side], "last_loss": last[side],
                     "round_tokens_per_s": [tokens / t for t in wall[side]]}
    if len(steps) == 2:
        # CPU seconds: what a shared machine's other jobs disturb least.
        out["round_ratios"] = [h / o for o, h in zip(cpu["ours"], cpu["hf"], strict=True)]
    return out


def run_memory(case: dict) -> dict:
    """Peak memory of one training step of ours, by category (torch's MemTracker, any device)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(case["device"])
    torch.set_num_threads(case["threads"])
    step = make_step("ours", case, device)
    step()  # creates the optimizer state, which the tracked step then holds
    tracker = MemTracker()
    tracker.track_external(step.model, step.opt)
    with tracker:
        step()
    snapshot = tracker.get_tracker_snapshot("peak")  # keyed by torch.device("cuda:0"), "cpu", ...
    peak = next(v for k, v in snapshot.items() if torch.device(k).type == device.type)
    gb = {str(k.value if hasattr(k, "value") else k): v / 2**30 for k, v in peak.items()}
    return {"peak_gb": gb["Total"], "activation_gb": gb["Activation"], "optstate_gb": gb["Optstate"],
            "param_gb": gb["Parameter"], "grad_gb": gb["Gradient"], "temp_gb": gb["Temp"]}


def spawn(case: dict) -> dict:
    """Runs ``case`` in a fresh interpreter; OOM and other failures become an ``error`` entry."""
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(lines[-1])


def throughput(base: dict) -> dict:
    """Ours and HF: in one process on CPU (alternating chunks), one process per side on CUDA."""
    if base["device"] == "cpu":
        result = spawn({**base, "kind": "throughput", "sides": ["ours", "hf"]})
        if "error" not in result:
            result["ratio"] = statistics.median(result.pop("round_ratios"))
            result["device"] = "cpu"
        return result
    result = {side: spawn({**base, "kind": "throughput", "sides": [side]}).get(side, {"error": "?"})
              for side in ("ours", "ours_fused", "hf")}
    if all("error" not in r for r in result.values()):
        result["ratio"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    return result


def fmt(r: dict, key: str, spec: str) -> str:
    return "-" if r.get(key) is None else format(r[key], spec)


def print_throughput(tp: dict) -> None:
    if "error" in tp:
        print(f"error: {tp['error']}")
        return
    print(f"{'side':<10} {'tokens/s':>11} {'step s':>8} {'peak GB':>8} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'loss0':>7} {'lossN':>7}  tokens/s per round")
    for side in ("ours", "ours_fused", "hf"):
        if side not in tp:
            continue
        r = tp[side]
        if "error" in r:
            print(f"{side:<10} error: {r['error']}")
            continue
        rounds = ", ".join(f"{v:.0f}" for v in r["round_tokens_per_s"])
        print(f"{side:<10} {r['tokens_per_s']:>11.1f} {r['step_s']:>8.3f} {fmt(r, 'peak_mem_gb', '8.2f'):>8} "
              f"{fmt(r, 'tflops', '8.1f'):>8} {fmt(r, 'mfu', '6.1%'):>6} {r['first_loss']:>7.3f} "
              f"{r['last_loss']:>7.3f}  [{rounds}]")
    if "ratio" in tp:
        basis = "per CPU-second, median of rounds" if "tokens_per_cpu_s" in tp["ours"] and \
            tp.get("device") == "cpu" else "wall clock"
        print(f"ratio ours/HF tokens/s: {tp['ratio']:.3f} ({basis}); tokens per CPU-second: "
              f"ours {tp['ours']['tokens_per_cpu_s']:.1f}, hf {tp['hf']['tokens_per_cpu_s']:.1f}")


MEMORY_CASES = {"adamw": {}, "adamw+ac_full": {"ac": "full"}, "adamw+ac_selective": {"ac": "selective"},
                "adamw8bit": {"optimizer": "adamw8bit"}, "adamw+fused_loss": {"fused_loss": True}}


def memory(base: dict) -> dict:
    """Peak memory of our step per configuration (one process each, no compile)."""
    print(f"\n# peak memory of one training step of ours (GB, torch MemTracker on {base['device']})")
    print(f"{'case':<20} {'peak':>8} {'activ.':>8} {'optstate':>8} {'params':>8} {'grads':>8}")
    out = {}
    for name, over in MEMORY_CASES.items():
        r = out[name] = spawn({**base, **over, "kind": "memory", "compile": False})
        if "error" in r:
            print(f"{name:<20} error: {r['error']}")
            continue
        print(f"{name:<20} {r['peak_gb']:>8.3f} {r['activation_gb']:>8.3f} {r['optstate_gb']:>8.3f} "
              f"{r['param_gb']:>8.3f} {r['grad_gb']:>8.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default: cpu / 1b by device")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--steps", type=int, help="timed steps per round")
    p.add_argument("--rounds", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attn"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: per-core figures)")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(run_throughput(case) if case["kind"] == "throughput" else run_memory(case)))
        return
    base = dict(PRESETS[args.preset or ("1b" if args.device == "cuda" else "cpu")])
    for key in ("batch", "seq", "steps", "rounds", "precision", "compile"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    base.update(device=args.device, attn=args.attn, ac="none", optimizer="adamw",
                threads=args.threads if args.device == "cpu" else (os.cpu_count() or 1))
    print(f"# pretrain step on {args.device}: Llama {base['model']}, batch {base['batch']} x seq "
          f"{base['seq']}, {base['precision']}, attn {base['attn']}, compile {base['compile']}, "
          f"{'fused ' if args.device == 'cuda' else ''}AdamW, clip 1.0; {base['rounds']} rounds of "
          f"{base['steps']} timed steps after {base['warmup']} warm-up steps, {base['threads']} threads")
    tp = throughput(base)
    print_throughput(tp)
    mem = {} if args.skip_memory else memory(base)
    print(json.dumps({"config": base, "throughput": tp, "memory": mem}))


if __name__ == "__main__":
    main()
