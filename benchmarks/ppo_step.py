"""Time per PPO step, split into generation, scoring and training: mmllm's PPOModule vs TRL.

Both sides run the same tiny Llama (built once with a fixed seed, saved as an HF directory under
the cache dir), the same batch of fixed-length prompts, the same response length (no eos, so
every row decodes ``--new-tokens`` tokens), 2 PPO epochs of 2 minibatches, a value head on the
policy trunk and a reward model of the same size:

* generation: sampling the responses (mmllm: the decode session with its KV cache; TRL:
  ``PPOTrainer.generate``, i.e. HF ``generate``);
* scoring: the reward model, then the policy's log-probabilities and values and the
  reference's log-probabilities, and the advantages (TRL: its ``forward_pass``,
  ``compute_rewards`` and ``compute_advantages`` timings);
* training: the minibatch optimizer steps (TRL: the rest of ``PPOTrainer.step``).

TRL's classic ``PPOTrainer`` (last shipped in trl 0.11.x) runs in its own virtualenv under
``--cache-dir`` (created on first use: ``python -m venv`` + ``pip install trl==<ver>`` with
transformers < 4.47, which that release needs); the venv reads this interpreter's packages
(torch included) through a ``.pth`` file, so both sides use the same torch.

    python benchmarks/ppo_step.py                       # CPU, or --device cuda
    python benchmarks/ppo_step.py --skip-trl --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

PHASES = ("generation", "scoring", "training")


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_model_dir(args) -> Path:
    """The tiny Llama (policy init) and a word-level tokenizer, saved once per shape."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(args.cache_dir) / f"llama_v{args.vocab}_d{args.dim}_l{args.layers}"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=4 * args.dim,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(out)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                  pad_token="t0", eos_token="t1", bos_token="t2")
    tok.save_pretrained(out)
    return out


def prompt_batches(args, n: int) -> list[list[list[int]]]:
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=g).tolist()
            for _ in range(n)]


# --------------------------------------------------------------------------------- mmllm
def run_mmllm(args, model_dir: Path) -> dict[str, float]:
    from functools import partial

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from mmllm.checkpoint import load_model
    from mmllm.models import DecoderWithScalarHead
    from mmllm.modules.ppo import PPOModule
    from mmllm.nn.heads import ScalarHead

    class Timed(PPOModule):
        times: dict[str, list[float]]

        def _timed(self, phase, fn, *a, **kw):
            sync(args.device)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync(args.device)
            self.times[phase].append(time.perf_counter() - t0)
            return out

        def rollout(self, prompts, *, greedy=False):
            return self._timed("generation", super().rollout, prompts, greedy=greedy)

        def make_experience(self, prompts):
            return self._timed("experience", super().make_experience, prompts)

        def optimize(self, roll):
            return self._timed("training", super().optimize, roll)

    rm = DecoderWithScalarHead(decoder=load_model(model_dir)[0], head=ScalarHead(dim=args.dim))
    module = Timed(init_from=str(model_dir), reward_model=rm, optimizer=partial(torch.optim.AdamW, lr=1e-5),
                   max_new_tokens=args.new_tokens, ppo_epochs=2, num_minibatches=2, kl_coef=0.05,
                   eos_token_id=[], probe_every=0, top_k=None)
    module.times = {p: [] for p in (*PHASES, "experience")}
    n = args.warmup + args.steps
    data = DataLoader([p for b in prompt_batches(args, n) for p in b], batch_size=args.batch,
                      collate_fn=lambda rows: {"prompt_ids": [list(r) for r in rows]})
    trainer = L.Trainer(max_steps=n * 4, accelerator="gpu" if args.device.startswith("cuda") else "cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, train_dataloaders=data)
    t = {k: v[args.warmup:] for k, v in module.times.items()}
    t["scoring"] = [e - g for e, g in zip(t.pop("experience"), t["generation"])]
    return {p: sum(t[p]) / len(t[p]) for p in PHASES}


# ----------------------------------------------------------------------------------- TRL
def trl_venv(args) -> Path:
    """A virtualenv with trl==<version> that also sees this interpreter's packages (torch)."""
    venv = Path(args.cache_dir) / f"trl-{args.trl_version}"
    py = venv / "bin" / "python"
    if py.is_file() and subprocess.run([str(py), "-c", "import trl"], capture_output=True,
                                       check=False).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # After the venv's own site-packages: its pins (transformers < 4.47) win, torch comes from here.
    Path(site, "_mmllm_base_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"trl=={args.trl_version}",
                    "transformers>=4.44,<4.47", "accelerate<1.1", "datasets<3.1"], check=True)
    return py


def run_trl(args, model_dir: Path) -> dict[str, float]:
    """Runs in the TRL venv (``--trl-worker``): TRL's classic PPOTrainer on the same model."""
    import warnings

    import torch
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    # The tokenizer file itself: transformers 5 records a tokenizer class 4.x does not know.
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), pad_token="t0",
                                  eos_token="t1", bos_token="t2")
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir))
    ref = AutoModelForCausalLMWithValueHead.from_pretrained(str(model_dir))
    rm = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1).to(args.device)
    rm.config.pad_token_id = tok.pad_token_id
    config = PPOConfig(batch_size=args.batch, mini_batch_size=args.batch // 2, ppo_epochs=2,
                       learning_rate=1e-5, init_kl_coef=0.05, adap_kl_ctrl=False, log_with=None,
                       seed=0, gradient_accumulation_steps=1)
    trainer = PPOTrainer(config, policy, ref, tok)
    gen = {"do_sample": True, "top_k": 0, "top_p": 1.0, "max_new_tokens": args.new_tokens,
           "min_new_tokens": args.new_tokens, "pad_token_id": tok.pad_token_id}
    times = {p: [] for p in PHASES}
    for batch in prompt_batches(args, args.warmup + args.steps):
        queries = [torch.tensor(q, device=trainer.accelerator.device) for q in batch]
        sync(args.device)
        t0 = time.perf_counter()
        responses = trainer.generate(queries, batch_size=args.batch, return_prompt=False,
                                     remove_padding=False, **gen)  # fixed-length responses
        sync(args.device)
        t1 = time.perf_counter()
        with torch.no_grad():
            seqs = torch.stack([torch.cat([q, r]) for q, r in zip(queries, responses)])
            scores = rm(seqs).logits[:, 0].float()
        sync(args.device)
        t2 = time.perf_counter()
        stats = trainer.step(queries, list(responses), list(scores))
        sync(args.device)
        t3 = time.perf_counter()
        forward = sum(stats[f"time/ppo/{k}"] for k in ("forward_pass", "compute_rewards", "compute_advantages"))
        times["generation"].append(t1 - t0)
        times["scoring"].append(t2 - t1 + forward)
        times["training"].append(t3 - t2 - forward)
    return {p: sum(v[args.warmup:]) / args.steps for p, v in times.items()}


# ---------------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="measured PPO steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=16, help="prompts per step")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--trl-version", default="0.11.4")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/mmllm/ppo_bench"))
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)  # model dir: run the TRL side here
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    if args.trl_worker:
        print(json.dumps(run_trl(args, Path(args.trl_worker))))
        return
    model_dir = build_model_dir(args)
    results = {"mmllm": run_mmllm(args, model_dir)}
    if not args.skip_trl:
        py = trl_venv(args)
        cmd = [str(py), __file__, *(argv if argv is not None else sys.argv[1:]), "--trl-worker", str(model_dir)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[f"trl {args.trl_version}"] = json.loads(out.strip().splitlines()[-1])
    shape = (f"{args.layers} layers x {args.dim}, vocab {args.vocab}, {args.batch} prompts x "
             f"{args.prompt_len} tokens -> {args.new_tokens} new tokens, 2 epochs x 2 minibatches, {args.device}")
    print(f"\nPPO step ({shape}), seconds per step (mean of {args.steps} after {args.warmup} warm-up):")
    print(f"{'':14}" + "".join(f"{p:>12}" for p in (*PHASES, "total")))
    for name, t in results.items():
        print(f"{name:14}" + "".join(f"{t[p]:12.3f}" for p in PHASES) + f"{sum(t.values()):12.3f}")
    if len(results) == 2:
        ours, theirs = results.values()
        ratios = {p: theirs[p] / ours[p] for p in PHASES}
        ratios["total"] = sum(theirs.values()) / sum(ours.values())
        print(f"{'TRL / mmllm':14}" + "".join(f"{ratios[p]:11.2f}x" for p in (*PHASES, "total")))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
