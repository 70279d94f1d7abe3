"""Measures DPO against RLHF (the kit's reward model + PPO) on the same synthetic task (README table).

    python -m components.dpo.measure [--out /tmp/dpo_measure] [--seeds 0 1 2] [--beta 0.1] ...

The task: :func:`mmllm.data.preference_formats.synthetic_preferences` (300 prompts "Describe the
<w> and the <w>.", two responses of 8 random words; the one with a "kind" word is preferred),
rendered with the chat template, held out by prompt (15 %: 23 pairs, 12 distinct prompts). Per
seed (``--seeds``; every arm of a run uses the same seed and the same start policy):

0. warm-up: a 2-layer, dim-64 decoder from scratch, SFT (response tokens only) on BOTH responses
   of every training prompt, so its samples are responses of the task's words with no preference
   learned yet (about half a "kind" word each). This is the starting policy of both arms.
1. DPO (:class:`components.dpo.module.DPOModule`) on the training pairs, reference = start.
2. The kit's K-wise reward model (:class:`mmllm.modules.reward.RewardModelModule`, initialised
   from the start policy, rewards normalised on the held-out responses) on the same pairs, saved
   as a checkpoint, then :class:`mmllm.modules.ppo.PPOModule` against it on the training prompts.
   Both arms use the same beta (DPO's beta = PPO's fixed KL coefficient): DPO's loss is the
   closed form of maximising ``r - beta * KL`` (Rafailov et al. 2023), so the arms aim at the
   same KL-regularised optimum, one with the preference data directly, one through a learned
   reward and sampling.

Reported per policy on the held-out prompts (``--samples`` sampled responses each, temperature
1): the gold reward of the rule (the number of "kind" words a response says; the share of
responses with at least one), response length in words, the share that end with ``<|im_end|>``
within the budget, and the KL to the start policy (``E_y~pi [log pi(y|x) - log start(y|x)]``,
nats per response, on the same samples); on the held-out pairs: the accuracy of DPO's implicit
reward ``beta * log pi/start`` (for the PPO policy too), the mean change of the chosen and of the
rejected responses' log-probability, and the reward model's accuracy (as trained, and as PPO
scores sampled-format responses); the wall time of every method (PPO's includes its reward
model). ``torch.set_num_threads(--threads)``: on a shared CPU, more threads spin and run slower.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Sequence
from datetime import date
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import nn

from components.dpo.module import DPOModule
from mmllm.data.preference import PreferenceDataModule
from mmllm.data.preference_formats import SYNTH_GOOD
from mmllm.data.prompts import PromptDataModule
from mmllm.generation import generate_ids
from mmllm.losses.ppo import token_logprobs
from mmllm.losses.ranking import dpo_ranking_loss, pair_accuracy, sequence_logprobs
from mmllm.models import DecoderLM
from mmllm.modules.causal_lm import CausalLMModule
from mmllm.modules.ppo import PPOModule, pad_rollout
from mmllm.modules.reward import RewardModelModule, load_reward_model, score_sequences

POLICY = {"vocab_size": 512, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden_dim": 128,
          "max_seq_len": 128}
END = "<|im_end|>"


def trainer(steps: int, **kwargs) -> L.Trainer:
    """A quiet CPU trainer of ``steps`` optimizer steps (no validation unless asked)."""
    opts = {"limit_val_batches": 0, "num_sanity_val_steps": 0}
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **{**opts, **kwargs})


def adamw(lr: float):
    return partial(torch.optim.AdamW, lr=lr, weight_decay=0.0)


def preference_data(out: Path, *, reward_model: bool, batch_size: int = 8) -> PreferenceDataModule:
    """The synthetic pairs: DPO / SFT layout (response labels, no end token) or the reward
    model's (eos end-of-context token). One cache dir: both share one trained tokenizer."""
    src = {"name": "synthetic", "path": str(out / "synthetic.jsonl"),
           "synthetic": {"num_prompts": 300, "k": 2, "seed": 0}}
    dm = PreferenceDataModule(sources=[src], vocab_size=512, seq_len=96, batch_size=batch_size,
                              labels=not reward_model, end_token="eos" if reward_model else None,
                              cache_dir=str(out / "data"), val_fraction=0.15)
    dm.setup()
    return dm


def timed_fit(module: L.LightningModule, steps: int, datamodule, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    trainer(steps).fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - t0
    print(f"measure: {type(module).__name__} {steps} steps in {seconds:.1f} s", file=sys.stderr)
    return seconds


# --------------------------------------------------------------------------------- the arms
def warm_up(dm: PreferenceDataModule, steps: int, seed: int) -> tuple[DecoderLM, float]:
    """The start policy: SFT on both responses of every training prompt (no preference signal)."""
    L.seed_everything(seed, verbose=False)
    module = CausalLMModule(model=DecoderLM(**POLICY), optimizer=adamw(3e-3), document_masking=False,
                            fused_loss=False)
    seconds = timed_fit(module, steps, dm, seed)
    return module.model.eval(), seconds


def train_dpo(start: DecoderLM, dm: PreferenceDataModule, *, beta: float, steps: int, lr: float,
              seed: int) -> tuple[DecoderLM, float]:
    """DPO from the start policy (its frozen copy is the reference); the policy and seconds."""
    module = DPOModule(model=copy.deepcopy(start).train(), beta=beta, optimizer=adamw(lr))
    seconds = timed_fit(module, steps, dm, seed)
    return module.model.eval(), seconds


def train_reward_model(start: DecoderLM, dm: PreferenceDataModule, out: Path, *, steps: int, lr: float,
                       seed: int) -> tuple[Path, float, float]:
    """The reward model (from the start policy), its checkpoint, held-out accuracy and seconds."""
    module = RewardModelModule(model=copy.deepcopy(start).train(), optimizer=adamw(lr), normalize="data")
    L.seed_everything(seed, verbose=False)
    t0 = time.perf_counter()
    fit = trainer(steps)
    fit.fit(module, datamodule=dm)
    seconds = time.perf_counter() - t0
    path = out / f"reward_model_seed{seed}.ckpt"
    fit.save_checkpoint(path)  # after on_train_end: the normalised head
    acc = trainer(1, limit_val_batches=1.0).validate(module, datamodule=dm, verbose=False)[0]["val/reward_acc"]
    return path, float(acc), seconds


def train_ppo(start: DecoderLM, reward_model: Path, prompts: list[str], tokenizer_dir: str, *,
              beta: float, rollouts: int, lr: float, max_new_tokens: int, seed: int,
              batch_size: int = 16) -> tuple[PPOModule, float]:
    """PPO against the reward-model checkpoint on the training prompts (fixed KL coefficient beta)."""
    data = PromptDataModule(prompts=prompts, tokenizer=tokenizer_dir, chat=True, batch_size=batch_size,
                            probe_size=0, seed=seed)
    module = PPOModule(model=copy.deepcopy(start).train(), reward_model=str(reward_model),
                       optimizer=adamw(lr), max_new_tokens=max_new_tokens, kl_coef=beta, kl_target=None,
                       ppo_epochs=2, num_minibatches=2, probe_every=0)
    seconds = timed_fit(module, rollouts * 2 * 2, data, seed)
    return module, seconds


# ------------------------------------------------------------------------------- evaluation
def held_out(dm: PreferenceDataModule) -> list[list[int]]:
    """Generation prompts (chat-rendered ids) of the distinct held-out prompts."""
    unique = {ex.prompt[0]["content"]: ex.prompt for rows in dm.examples.values() for ex in rows
              if dm.is_val(ex)}
    return [dm.encoder.renderer.prompt(p) for p in unique.values()]


def train_prompts(dm: PreferenceDataModule) -> list[str]:
    return sorted({ex.prompt[0]["content"] for rows in dm.examples.values() for ex in rows
                   if not dm.is_val(ex)})


@torch.no_grad()
def response_logprobs(model: nn.Module, roll) -> torch.Tensor:
    """(B,) summed log-probabilities of a rollout's responses under ``model`` (temperature 1)."""
    window = slice(roll.prompt_len - 1, roll.input_ids.shape[1] - 1)
    logits = model(roll.input_ids, attention_mask=roll.attention_mask).logits[:, window]
    return (token_logprobs(logits, roll.response) * roll.mask).sum(-1)


@torch.no_grad()
def sample_eval(policy: DecoderLM, start: DecoderLM, prompts: list[list[int]], tok, *, samples: int,
                max_new_tokens: int, seed: int) -> dict:
    """Gold reward, length, termination and KL to ``start`` of sampled responses to ``prompts``."""
    rows = [p for p in prompts for _ in range(samples)]
    end_id = tok.convert_tokens_to_ids(END)
    new = generate_ids(policy.eval(), rows, max_new_tokens=max_new_tokens, temperature=1.0,
                       eos_token_id=[tok.eos_token_id, end_id], pad_token_id=tok.pad_token_id or 0,
                       generator=torch.Generator().manual_seed(seed))
    roll = pad_rollout(rows, new, tok.pad_token_id or 0, torch.device("cpu"))
    kl = response_logprobs(policy, roll) - response_logprobs(start.eval(), roll)
    words = [tok.decode(r, skip_special_tokens=True).split() for r in new]
    kind = torch.tensor([sum(w == SYNTH_GOOD for w in ws) for ws in words], dtype=torch.float)
    return {"gold_kind_words": kind.mean().item(), "gold_has_kind": (kind > 0).float().mean().item(),
            "words": sum(map(len, words)) / len(words), "ended": sum(end_id in r for r in new) / len(new),
            "kl_to_start": kl.mean().item(), "samples": len(rows),
            "example": tok.decode(new[0], skip_special_tokens=True)}


@torch.no_grad()
def pair_stats(policy: DecoderLM, start: DecoderLM, dm: PreferenceDataModule, beta: float) -> dict:
    """On the held-out pairs: the accuracy of ``beta * (log pi - log start)`` (DPO's implicit
    reward), and the mean change of the chosen and of the rejected responses' log-probability."""
    correct = total = 0
    chosen, rejected = [], []
    for batch in dm.val_dataloader():
        lp = sequence_logprobs(policy.eval()(batch["input_ids"]).logits, batch["labels"])
        lr = sequence_logprobs(start.eval()(batch["input_ids"]).logits, batch["labels"])
        _, pairs, rewards = dpo_ranking_loss(lp, lr, batch["group"], batch["rank"], beta=beta)
        c, n = pair_accuracy(rewards, pairs)
        correct, total = correct + int(c), total + int(n)
        chosen.append((lp - lr)[pairs.better])
        rejected.append((lp - lr)[pairs.worse])
    return {"implicit_pair_acc": correct / max(total, 1),
            "chosen_logp_change": torch.cat(chosen).mean().item(),
            "rejected_logp_change": torch.cat(rejected).mean().item()}


@torch.no_grad()
def reward_accuracy_as_ppo_scores(path: Path, dm: PreferenceDataModule) -> float:
    """Held-out pair accuracy of the reward model on responses laid out as PPO scores samples:
    prompt ids + response ids (ending at its ``<|im_end|>``) + the end-of-context token."""
    scorer = load_reward_model(path)
    end = scorer.encoder.end_id
    correct = total = 0
    for (encoded, ranks) in dm._val:
        seqs = []
        for ids, labels in encoded:  # DPO layout: labels mark the response (content + <|im_end|>)
            first = next(i for i, t in enumerate(labels) if t >= 0)
            last = max(i for i, t in enumerate(labels) if t >= 0)
            seqs.append([*ids[:first + 1], *ids[first + 1:last + 2], end])
        s = score_sequences(scorer.model, seqs)
        better, worse = (0, 1) if ranks[0] < ranks[1] else (1, 0)
        correct, total = correct + int(s[better] > s[worse]), total + 1
    return correct / max(total, 1)


# ------------------------------------------------------------------------------------- main
def train_arms(out: Path, sft_dm: PreferenceDataModule, rm_dm: PreferenceDataModule, *, seed: int,
               beta: float, warmup_steps: int, dpo_steps: int, rm_steps: int, ppo_rollouts: int,
               max_new_tokens: int, dpo_lrs: Sequence[float], rm_lr: float, ppo_lr: float) -> tuple:
    """``(start, {name: (policy, seconds, RM accuracy)}, PPO module, RM checkpoint, seconds)``."""
    start, warm_s = warm_up(sft_dm, warmup_steps, seed)
    policies = {"start (SFT warm-up)": (start, warm_s, None)}
    seconds = {"warmup": round(warm_s, 1)}
    for lr in dpo_lrs:
        dpo, dpo_s = train_dpo(start, sft_dm, beta=beta, steps=dpo_steps, lr=lr, seed=seed)
        policies[f"DPO (beta {beta}, lr {lr:g})"] = (dpo, dpo_s, None)
        seconds[f"dpo_lr{lr:g}"] = round(dpo_s, 1)
    rm_path, rm_acc, rm_s = train_reward_model(start, rm_dm, out, steps=rm_steps, lr=rm_lr, seed=seed)
    ppo, ppo_s = train_ppo(start, rm_path, train_prompts(sft_dm), sft_dm.tokenizer_dir, beta=beta,
                           rollouts=ppo_rollouts, lr=ppo_lr, max_new_tokens=max_new_tokens, seed=seed)
    policies[f"RM + PPO (kl_coef {beta}, lr {ppo_lr:g})"] = (ppo.policy, rm_s + ppo_s, rm_acc)
    seconds.update(reward_model=round(rm_s, 1), ppo=round(ppo_s, 1))
    return start, policies, ppo, rm_path, seconds


def measure(out: Path, *, seed: int = 0, beta: float = 0.1, warmup_steps: int = 150, dpo_steps: int = 60,
            rm_steps: int = 60, ppo_rollouts: int = 40, samples: int = 8, max_new_tokens: int = 16,
            dpo_lrs: Sequence[float] = (1e-3, 3e-4, 1e-4), rm_lr: float = 3e-3, ppo_lr: float = 1e-3) -> dict:
    """One run of every arm from the same seed and start policy, evaluated on the held-out set."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    sft_dm, rm_dm = preference_data(out, reward_model=False), preference_data(out, reward_model=True)
    start, policies, ppo, rm_path, seconds = train_arms(
        out, sft_dm, rm_dm, seed=seed, beta=beta, warmup_steps=warmup_steps, dpo_steps=dpo_steps,
        rm_steps=rm_steps, ppo_rollouts=ppo_rollouts, max_new_tokens=max_new_tokens, dpo_lrs=dpo_lrs,
        rm_lr=rm_lr, ppo_lr=ppo_lr)
    prompts = held_out(sft_dm)
    ev = partial(sample_eval, start=start, prompts=prompts, tok=sft_dm.tokenizer, samples=samples,
                 max_new_tokens=max_new_tokens, seed=seed + 1)
    none = {"implicit_pair_acc": None, "chosen_logp_change": 0.0, "rejected_logp_change": 0.0}
    rows = [{"policy": name, **ev(policy), "seconds": round(s, 1), "rm_pair_acc": acc,
             **(pair_stats(policy, start, sft_dm, beta) if policy is not start else none)}
            for name, (policy, s, acc) in policies.items()]
    return {"date": date.today().isoformat(), "seed": seed, "beta": beta, "val_pairs": len(sft_dm._val),
            "held_out_prompts": len(prompts), "train_prompts": len(train_prompts(sft_dm)),
            "steps": {"warmup": warmup_steps, "dpo": dpo_steps, "reward_model": rm_steps,
                      "ppo_rollouts": ppo_rollouts, "ppo_optimizer_steps": ppo_rollouts * 4},
            "seconds": seconds, "rm_pair_acc_as_ppo_scores": reward_accuracy_as_ppo_scores(rm_path, sft_dm),
            "ppo_reward_curve": [round(r["reward_mean"], 3) for r in ppo.history],
            "ppo_kl_curve": [round(r["kl"], 3) for r in ppo.history], "rows": rows}


COLUMNS = (("gold_kind_words", "gold: \"kind\" words / response", 2), ("gold_has_kind", "gold: share with one", 2),
           ("words", "words / response", 1), ("kl_to_start", "KL to start (nats)", 1),
           ("implicit_pair_acc", "pair acc. of beta log pi/start", 2), ("rm_pair_acc", "pair acc. of the RM", 2),
           ("chosen_logp_change", "Δ log p(chosen)", 1), ("rejected_logp_change", "Δ log p(rejected)", 1),
           ("seconds", "seconds", 0))


def table(results: list[dict]) -> str:
    """The README's markdown table: per policy the mean over seeds, with the range when > 1 seed."""
    lines = ["| policy | " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for i, row in enumerate(results[0]["rows"]):
        cells = []
        for key, _, digits in COLUMNS:
            vals = [r["rows"][i][key] for r in results]
            if vals[0] is None:
                cells.append("—")
                continue
            mean = f"{sum(vals) / len(vals):.{digits}f}"
            spread = f" ({min(vals):.{digits}f}–{max(vals):.{digits}f})" if len(vals) > 1 and key != "seconds" else ""
            cells.append(mean + spread)
        lines.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/dpo_measure")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO's beta = PPO's KL coefficient")
    for name, default in (("dpo-steps", 60), ("rm-steps", 60), ("ppo-rollouts", 40), ("warmup-steps", 150),
                          ("samples", 8)):
        ap.add_argument(f"--{name}", type=int, default=default)
    for name, default in (("rm-lr", 3e-3), ("ppo-lr", 1e-3)):
        ap.add_argument(f"--{name}", type=float, default=default)
    ap.add_argument("--dpo-lrs", type=float, nargs="+", default=[1e-3, 3e-4, 1e-4], help="one DPO arm each")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: on a shared machine more threads spin and run slower)")
    args = vars(ap.parse_args())
    torch.set_num_threads(args.pop("threads"))
    out = Path(args.pop("out"))
    t0 = time.perf_counter()
    seeds = args.pop("seeds")
    results = [measure(out, seed=seed, **args) for seed in seeds]
    print(f"measure: {len(results)} runs in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    (out / "result.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
