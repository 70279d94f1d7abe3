"""Our evaluator vs lm-eval on SmolLM2-135M-Instruct and the local capitals task; speed ratios.

    python benchmarks/eval_agreement.py [--shots 0 3] [--device cpu|cuda] [--humaneval N]

Prints acc / acc_norm from (1) ``mmllm.eval.evaluate``, (2) lm-eval through our ``MMLLMEvalLM``
and (3) lm-eval's own ``HFLM`` on the transformers model the DecoderLM was converted from, the
largest per-choice log-likelihood difference, wall times (prefix reuse on/off vs HFLM) and,
with ``--humaneval N``, greedy pass@1 on the first N HumanEval problems.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def load(device: str):
    """SmolLM2 once as transformers model, and the DecoderLM converted from it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmllm.models.hf import from_hf_model, smollm2_gguf_path

    p = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    hf = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    hf = hf.to(device).eval()
    return from_hf_model(hf).to(device), hf, tok


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 3])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--humaneval", type=int, default=0, help="greedy pass@1 on the first N problems")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    from mmllm.eval import evaluate
    from mmllm.eval.agreement import agreement, write_lm_eval_task
    from mmllm.eval.builtin import capitals_task

    (model, hf, tok), t_load = timed(lambda: load(args.device))
    print(f"loaded SmolLM2-135M in {t_load:.1f}s on {args.device}")
    task_dir = write_lm_eval_task(tempfile.mkdtemp())
    summary = {}
    for k in args.shots:
        res, t = timed(lambda k=k: agreement(model, tok, task_dir, hf_model=hf, num_fewshot=k,
                                              batch_size=args.batch_size))
        for name, r in res.items():
            diff = max(abs(a - b) for x, y in zip(r["loglikelihoods"], res["ours"]["loglikelihoods"])
                       for a, b in zip(x, y))
            print(f"{k}-shot {name:14s} acc={r['acc']:.4f} acc_norm={r['acc_norm']:.4f} "
                  f"max|ll - ours|={diff:.2e}")
            summary[f"{k}shot/{name}"] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "max_dll": diff}
        task = capitals_task(num_fewshot=k)
        _, t_reuse = timed(lambda task=task: evaluate(model, tok, [task], batch_size=args.batch_size,
                                                      progress=False))
        _, t_plain = timed(lambda task=task: evaluate(model, tok, [task], batch_size=args.batch_size,
                                                      reuse_prefix=False, progress=False))
        print(f"{k}-shot time: prefix reuse {t_reuse:.2f}s, no reuse {t_plain:.2f}s "
              f"(ratio {t_plain / t_reuse:.2f}x); whole agreement run {t:.1f}s")
        summary[f"{k}shot/seconds"] = {"reuse": t_reuse, "plain": t_plain}
    if args.humaneval:
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        from mmllm.config import CONF_DIR

        cfg = OmegaConf.load(f"{CONF_DIR}/eval/tasks/humaneval.yaml")
        task = instantiate(cfg.humaneval)
        rep, t = timed(lambda: evaluate(model, tok, [task], limit=args.humaneval,
                                        batch_size=args.batch_size, log_samples=True))
        passed = [s["task_id"] for s in rep["samples"]["humaneval"] if s["passed"][0]]
        print(f"HumanEval greedy pass@1 on the first {args.humaneval}: "
              f"{rep['results']['humaneval']['pass@1']:.4f} ({len(passed)} passed: {passed}) in {t:.0f}s")
        summary["humaneval"] = {"n": args.humaneval, **rep["results"]["humaneval"], "passed": passed}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
