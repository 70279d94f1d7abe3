"""PPOModule: RLHF with PPO (Ouyang et al. 2022) on a policy with a value head, and PPO-ptx.

One training step is one PPO iteration on a batch of prompts:

1. :meth:`PPOModule.rollout`: the policy samples responses through the decode session
   (:class:`mmllm.generation.DecodeSession`: batched, KV cache). Under FSDP2 the policy's
   parameters are gathered once for the rollout (:func:`gathered`), so decoding runs with no
   collectives and ranks may stop after different numbers of tokens. The rollout pieces
   (:class:`Rollout`, :func:`pad_rollout`, :func:`gathered`, the reward-model scoring,
   :class:`TokenFractionReward`) live in :mod:`mmllm.modules.ppo_rollout`, the checkpoint key
   layout in :mod:`mmllm.modules.ppo_checkpoint`; both are importable from here.
2. :meth:`PPOModule.score`: the reward (a reward model or a Python ``reward_fn``); then one
   forward each of the policy (old log-probabilities, values) and the frozen reference.
3. :meth:`PPOModule.compute_advantages`: per-token rewards (score - beta * KL) and GAE.
4. ``ppo_epochs`` passes over ``num_minibatches`` minibatches, each one optimizer step on
   :meth:`PPOModule.policy_loss` + ``ptx_coef`` * the LM loss of a pretraining batch, in ONE
   backward (PPO-ptx).

``trainer.max_steps`` counts optimizer steps: ``ppo_epochs * num_minibatches`` per rollout.
The rollout statistics live in :attr:`PPOModule.history` too (one dict per rollout).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import lightning as L
import torch
from torch import nn
from torch.distributed.tensor import DTensor

from mmllm.distributed import clip_grad_norm_, parallelize
from mmllm.distributed.strategy import data_parallel_rank
from mmllm.generation import SamplingParams
from mmllm.losses import causal_lm_loss
from mmllm.losses import ppo as F
from mmllm.models import DecoderWithScalarHead
from mmllm.modules.ppo_checkpoint import SAVED_NAMES, full_cpu_state, rename_keys
from mmllm.modules.ppo_rollout import (
    Rollout,
    TokenFractionReward,
    fsdp_modules,
    gathered,
    load_reward,
    pad_rollout,
    probe_summary,
    response_end_ids,
    reward_model_scores,
    sample_responses,
)
from mmllm.nn.heads import ValueHead

__all__ = ["CRITICS", "SAVED_NAMES", "PPOModule", "Rollout", "TokenFractionReward", "fsdp_modules",
           "gathered", "load_reward", "pad_rollout", "probe_summary", "response_end_ids",
           "reward_model_scores", "sample_responses"]

CRITICS = ("shared", "separate")


class PPOModule(L.LightningModule):
    """PPO fine-tuning of a causal LM against a reward (see the module docstring).

    Args:
        model: the policy LM or a factory (used when ``init_from`` is None: a random policy).
        init_from: the policy's weights (an SFT checkpoint; any ``mmllm.checkpoint.load_model`` source).
        critic: "shared" (a :class:`~mmllm.nn.heads.ValueHead` on the policy's trunk) or
            "separate" (a copy of the policy's decoder with its own value head).
        reward_model: a checkpoint of a reward model (DecoderWithScalarHead) or the module.
        reward_fn: ``reward_fn(prompts, responses) -> (B,) tensor`` on token ids, used when
            ``reward_model`` is None (e.g. :class:`TokenFractionReward`).
        optimizer: partial ``optimizer(params)``; scheduler: partial ``scheduler(opt, total_steps)``.
        max_new_tokens, temperature, top_k, top_p: rollout sampling (temperature > 0).
        ppo_epochs, num_minibatches: passes over each rollout and minibatches per pass.
        clip_range, value_clip_range: PPO's epsilon for the ratio and the values (None: off).
        vf_coef, entropy_coef: weights of the value loss and an entropy bonus.
        gamma, lam: GAE's discount and lambda.
        kl_coef: beta (the initial one when ``kl_target`` is set: adaptive control).
        kl_target, kl_horizon: the adaptive KL controller's target (per sequence) and horizon.
        kl_estimator: "k1", "k2" or "k3" (:func:`mmllm.losses.ppo.kl_penalty`) in the reward.
        whiten_advantages: normalise advantages over the rollout's tokens.
        ptx_coef: gamma of PPO-ptx: weight of the pretraining LM loss (0: off).
        ptx_data: a datamodule (or an iterable of batches) of pretraining batches.
        probe_every: score greedy answers to the datamodule's probe prompts every this many
            rollouts (0: never); logs the score mean/std/quantiles.
        probe_prompts: the probe set as token ids (default: the datamodule's ``probe_prompts``).
        max_grad_norm: clip the gradient norm (None: off).
        eos_token_id: ids that end a response (None: the datamodule tokenizer's eos).
        parallelism: keyword arguments of ``mmllm.distributed.parallelize`` for every model.
    """

    def __init__(self, *, model: nn.Module | Callable[[], nn.Module] | None = None,
                 init_from: str | None = None, critic: str = "shared",
                 reward_model: str | nn.Module | None = None, reward_fn: Callable | None = None,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable | None = None, max_new_tokens: int = 32,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 ppo_epochs: int = 2, num_minibatches: int = 2, clip_range: float = 0.2,
                 value_clip_range: float | None = 0.2, vf_coef: float = 0.1,
                 entropy_coef: float = 0.0, gamma: float = 1.0, lam: float = 0.95,
                 kl_coef: float = 0.05, kl_target: float | None = None, kl_horizon: int = 10_000,
                 kl_estimator: str = "k1", whiten_advantages: bool = True, ptx_coef: float = 0.0,
                 ptx_data=None, probe_every: int = 10, probe_prompts: list[list[int]] | None = None,
                 max_grad_norm: float | None = 1.0,
                 eos_token_id: int | list[int] | None = None, parallelism: dict | None = None) -> None:
        super().__init__()
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
        if temperature <= 0:
            raise ValueError(f"PPO samples its rollouts: temperature must be > 0, got {temperature}")
        if kl_estimator not in F.KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {F.KL_ESTIMATORS}, got {kl_estimator!r}")
        if ptx_coef > 0 and ptx_data is None:
            raise ValueError("ptx_coef > 0 needs ptx_data (a pretraining datamodule)")
        self.automatic_optimization = False
        # In a dict, not attributes: a module given here must not register as a submodule (its
        # weights would be saved twice); configure_model builds the real ones from it.
        self._sources = {"policy": model, "reward": reward_model}
        self.init_from, self.critic_kind = init_from, critic
        # A reward model wins; reward_fn is the fallback (configs give a rule reward for demos).
        self.reward_fn = None if reward_model is not None else reward_fn
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.sampling = SamplingParams(temperature, top_k, top_p)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.ppo_epochs, self.num_minibatches = ppo_epochs, num_minibatches
        self.clip_range, self.value_clip_range = clip_range, value_clip_range
        self.vf_coef, self.entropy_coef, self.gamma, self.lam = vf_coef, entropy_coef, gamma, lam
        self.kl_estimator, self.whiten_advantages = kl_estimator, whiten_advantages
        self.kl_ctl = F.AdaptiveKLController(kl_coef=kl_coef, target=kl_target, horizon=kl_horizon) \
            if kl_target else F.FixedKLController(kl_coef=kl_coef)
        self.ptx_coef, self.ptx_data, self._ptx_iter = ptx_coef, ptx_data, None
        self.probe_every, self.probe_prompts = probe_every, probe_prompts
        self.max_grad_norm = max_grad_norm
        self.eos_token_id, self.pad_token_id = eos_token_id, 0
        self.parallelism = dict(parallelism or {})
        self.model: nn.Module | None = None
        self.critic: nn.Module | None = None
        self.ref: nn.Module | None = None
        self.reward_model: nn.Module | None = None
        self.reward_end_id: int | None = None  # set for a reward model loaded from a checkpoint
        self.tokenizer_path: str | None = None
        self.run_config: dict | None = None
        self.rollouts = 0
        self._generator: torch.Generator | None = None  # per-rank sampling stream (on_fit_start)
        self.history: list[dict[str, float]] = []

    # --------------------------------------------------------------------------- model setup
    def configure_model(self) -> None:
        """Builds policy (+ value head), critic, reference and reward model, then shards them."""
        if self.model is not None:
            return
        if self._sources["reward"] is None and self.reward_fn is None:
            # Checked here, not in __init__, so module=ppo composes on its own (tests/configs).
            raise ValueError("PPO needs a reward: reward_model (a checkpoint) or reward_fn")
        from mmllm.checkpoint import load_model

        if self.init_from:
            policy = load_model(self.init_from)[0]
        else:
            src = self._sources["policy"]
            if src is None:
                raise ValueError("PPOModule needs a policy: init_from (an SFT checkpoint) or model")
            policy = src if isinstance(src, nn.Module) else src()
        self.ref = copy.deepcopy(policy).eval().requires_grad_(False)
        if self.critic_kind == "shared":
            self.model = DecoderWithScalarHead(decoder=policy, head=ValueHead(dim=policy.dim),
                                               return_logits=True)
        else:
            self.model = policy
            self.critic = DecoderWithScalarHead(decoder=copy.deepcopy(policy), head=ValueHead(dim=policy.dim))
        if self._sources["reward"] is not None:
            self.reward_model, self.reward_end_id = load_reward(self._sources["reward"])
        if self.parallelism:
            kwargs = {k: v for k, v in self.parallelism.items() if k != "meta_init"}  # models load in full
            mesh = getattr(self, "device_mesh", None)
            for name in ("model", "critic", "ref", "reward_model"):
                if getattr(self, name) is not None:
                    setattr(self, name, parallelize(getattr(self, name), mesh, **kwargs))

    @property
    def policy(self) -> nn.Module:
        """The policy's DecoderLM (what the decode session runs)."""
        return self.model.decoder if isinstance(self.model, DecoderWithScalarHead) else self.model

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None)
        if self.eos_token_id is None and tok is not None:
            self.eos_token_id = response_end_ids(tok)
        if tok is not None and tok.pad_token_id is not None:
            self.pad_token_id = tok.pad_token_id
        if not self.tokenizer_path and getattr(dm, "tokenizer_dir", None):
            self.tokenizer_path = str(dm.tokenizer_dir)
        # Each rank samples from its own stream: with one seed everywhere, data-parallel ranks
        # would draw the same random numbers for every token (correlated rollouts).
        # Tensor-parallel ranks of one group share a stream: they must sample the same tokens.
        dp_rank = data_parallel_rank(self._trainer)[0]
        self._generator = torch.Generator(self.device).manual_seed(
            (torch.initial_seed() + 1_000_003 * dp_rank) % 2**63)
        if self.ptx_coef > 0 and isinstance(self.ptx_data, L.LightningDataModule):
            self.ptx_data.prepare_data()
            self.ptx_data.setup("fit")

    # --------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], *, greedy: bool = False) -> Rollout:
        """Samples a response per prompt on one decode session (KV cache, all rows batched)."""
        was_training = self.model.training
        self.model.eval()
        with gathered(self.model):
            responses = sample_responses(self.policy, prompts, max_new_tokens=self.max_new_tokens,
                                         sampling=SamplingParams() if greedy else self.sampling,
                                         eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                                         generator=self._generator, progress=self._rollout_bar())
        self.model.train(was_training)
        return pad_rollout(prompts, responses, self.pad_token_id, self.device)

    def _rollout_bar(self) -> str | bool:
        """A bar over a rollout's decoding when the trainer shows its own bar (rank 0 only)."""
        trainer = self._trainer
        show = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
        return f"rollout {self.rollouts + 1}" if show else False

    @torch.no_grad()
    def score(self, roll: Rollout) -> torch.Tensor:
        """(B,) rewards of the responses: the reward model's score at the last token, or reward_fn."""
        if self.reward_fn is not None:
            return torch.as_tensor(self.reward_fn(roll.prompts, roll.responses),
                                   dtype=torch.float32, device=self.device).reshape(-1)
        return reward_model_scores(self.reward_model, roll, self.reward_end_id).to(self.device)

    def forward_policy(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response: torch.Tensor,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log-probabilities, values and entropies (each (B, R)) of ``response`` under the policy."""
        P = input_ids.shape[1] - response.shape[1]
        # Position P - 1 + j predicts response token j; its value is the state's before token j.
        window = slice(P - 1, input_ids.shape[1] - 1)
        if self.critic is None:
            out = self.model(input_ids, attention_mask=attention_mask)
            logits, values = out.logits[:, window], out.scores[:, window]
        else:
            logits = self.model(input_ids, attention_mask=attention_mask).logits[:, window]
            values = self.critic(input_ids, attention_mask=attention_mask).scores[:, window]
        logits = logits.float() / self.temperature
        return F.token_logprobs(logits, response), values, F.entropy_from_logits(logits)

    @torch.no_grad()
    def compute_advantages(self, roll: Rollout) -> Rollout:
        """Fills ``kl``, ``advantages`` and ``returns``: score - beta * KL per token, then GAE."""
        roll.kl = F.kl_penalty(roll.logprobs, roll.ref_logprobs, self.kl_estimator) * roll.mask
        rewards = F.shape_rewards(roll.scores, roll.kl, roll.mask, self.kl_ctl.value)
        adv, roll.returns = F.gae(rewards, roll.values, roll.mask, gamma=self.gamma, lam=self.lam)
        roll.advantages = F.masked_whiten(adv, roll.mask) if self.whiten_advantages else adv
        return roll

    def policy_loss(self, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """PPO loss of a minibatch: clipped surrogate + vf_coef * clipped value loss - entropy bonus."""
        logprobs, values, entropy = self.forward_policy(mb["input_ids"], mb["attention_mask"], mb["response"])
        pg, pg_stats = F.policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"],
                                     clip_range=self.clip_range)
        vf, vf_stats = F.value_loss(values, mb["values"], mb["returns"], mb["mask"],
                                    clip_range=self.value_clip_range)
        ent = F.masked_mean(entropy, mb["mask"])
        loss = pg + self.vf_coef * vf - self.entropy_coef * ent
        stats = {"policy_loss": pg.detach(), "value_loss": vf.detach(), "entropy": ent.detach(),
                 "clip_frac": pg_stats["clip_frac"], "approx_kl": pg_stats["approx_kl"],
                 "value_clip_frac": vf_stats["clip_frac"]}
        return loss, stats

    def ptx_loss(self) -> torch.Tensor:
        """The LM loss of the next pretraining batch (the ptx term)."""
        batch = {k: v.to(self.device) for k, v in self._next_ptx_batch().items()}
        logits = self.model(batch["input_ids"], doc_ids=batch.get("doc_ids")).logits
        return causal_lm_loss(logits, batch["labels"])[0]

    def _next_ptx_batch(self) -> dict[str, torch.Tensor]:
        source = self.ptx_data
        loader = source.train_dataloader() if isinstance(source, L.LightningDataModule) else source
        if self._ptx_iter is None:
            self._ptx_iter = iter(loader)
        try:
            return next(self._ptx_iter)
        except StopIteration:  # cycle through the pretraining data
            self._ptx_iter = iter(loader)
            return next(self._ptx_iter)

    # ---------------------------------------------------------------------------- training
    @torch.no_grad()
    def make_experience(self, prompts: list[list[int]]) -> Rollout:
        """Rollout, rewards, old log-probabilities and values, reference log-probabilities, advantages."""
        roll = self.rollout(prompts)
        roll.scores = self.score(roll)
        roll.logprobs, roll.values, _ = self.forward_policy(roll.input_ids, roll.attention_mask,
                                                            roll.response)
        window = slice(roll.prompt_len - 1, roll.input_ids.shape[1] - 1)
        ref_logits = self.ref(roll.input_ids, attention_mask=roll.attention_mask).logits[:, window]
        roll.ref_logprobs = F.token_logprobs(ref_logits.float() / self.temperature, roll.response)
        return self.compute_advantages(roll)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        roll = self.make_experience(batch["prompt_ids"])
        stats = self.optimize(roll)
        lengths = roll.mask.sum(-1).float()
        kl_seq = (roll.kl * roll.mask).sum(-1)
        stats.update(reward_mean=roll.scores.mean(), reward_std=roll.scores.std(unbiased=False),
                     kl=kl_seq.mean(), kl_per_token=F.masked_mean(roll.kl, roll.mask),
                     response_len=lengths.mean(), beta=torch.tensor(self.kl_ctl.value))
        stats = self._mean_over_ranks(stats)
        self.kl_ctl.update(stats["kl"], len(roll.prompts) * self.trainer.world_size)
        self.rollouts += 1
        if self.probe_every and (self.rollouts - 1) % self.probe_every == 0:
            stats.update(self.probe())
        B = len(roll.prompts)
        for k, v in stats.items():
            self.log(k if "/" in k else f"ppo/{k}", v, batch_size=B, prog_bar=k in ("reward_mean", "kl"))
        self.history.append({"rollout": self.rollouts, **stats})

    def optimize(self, roll: Rollout) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of ``num_minibatches`` optimizer steps; the mean of their stats."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        B = roll.response.shape[0]
        totals: dict[str, torch.Tensor] = {}
        steps = 0
        for _ in range(self.ppo_epochs):
            for idx in torch.randperm(B, device=self.device).chunk(min(self.num_minibatches, B)):
                loss, stats = self.policy_loss(roll.rows(idx))
                if self.ptx_coef > 0:  # PPO-ptx: the LM loss joins the same backward
                    ptx = self.ptx_loss()
                    loss = loss + self.ptx_coef * ptx
                    stats["ptx_loss"] = ptx.detach()
                if not torch.isfinite(loss.detach()):
                    raise FloatingPointError(f"non-finite PPO loss at rollout {self.rollouts}: "
                                             "lower the learning rate or check the reward scale")
                opt.zero_grad(set_to_none=True)
                self.manual_backward(loss)
                if self.max_grad_norm:
                    stats["grad_norm"] = clip_grad_norm_(self._trainable(), self.max_grad_norm)
                opt.step()
                if sched is not None:
                    sched.step()
                stats["loss"] = loss.detach()
                for k, v in stats.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
                steps += 1
        stats = {k: v / steps for k, v in totals.items()}
        stats["lr"] = torch.tensor(opt.param_groups[0]["lr"])
        return stats

    def _mean_over_ranks(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        keys = sorted(stats)
        packed = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32).to(self.device) for k in keys])
        if self.trainer.world_size > 1:  # one all-reduce for every statistic
            packed = self.trainer.strategy.reduce(packed, reduce_op="mean")
        return dict(zip(keys, packed.tolist()))

    @torch.no_grad()
    def probe(self) -> dict[str, float]:
        """Scores of greedy answers to the datamodule's fixed probe prompts (reward-hacking monitor)."""
        prompts = self.probe_prompts or getattr(getattr(self.trainer, "datamodule", None),
                                                "probe_prompts", None)
        if not prompts:
            return {}
        roll = self.rollout(prompts, greedy=True)
        return probe_summary(self.score(roll), roll.mask.sum(-1))

    # --------------------------------------------------------------------------- optimizer
    def _trainable(self) -> list[nn.Parameter]:
        mods = [self.model] + ([self.critic] if self.critic is not None else [])
        return [p for m in mods for p in m.parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("PPOModule needs an optimizer config to train (module.optimizer)")
        params = self._trainable()
        # Weight decay on matrices only (not on norms, biases, the value head's bias).
        groups = [{"params": [p for p in params if p.ndim >= 2]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 \
            else int(self.trainer.estimated_stepping_batches) * self.ppo_epochs * self.num_minibatches
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer, total)}

    # ------------------------------------------------------------------------- checkpoints
    def _meta(self) -> dict:
        from mmllm.distributed.parallelize import model_class_path

        return {"model_class": model_class_path(self.policy), "model_config": getattr(self.policy, "config", None),
                "run_config": self.run_config, "tokenizer": self.tokenizer_path,
                "ppo": {"kl_coef": self.kl_ctl.value, "rollouts": self.rollouts}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Records the policy's metadata; with a shared trunk, unsharded, the policy's weights are
        saved as ``model.*`` (the value head as ``value_head.*``), so ``mmllm.checkpoint.load_model``
        loads the PPO policy like any kit checkpoint."""
        checkpoint["mmllm"] = self._meta()
        sd = checkpoint.get("state_dict")
        if self.critic is None and sd and not any(isinstance(v, DTensor) for v in sd.values()):
            checkpoint["state_dict"] = rename_keys(sd, SAVED_NAMES)
            checkpoint["mmllm"]["ppo"]["renamed"] = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("mmllm", {}).get("ppo", {})
        self.rollouts = int(meta.get("rollouts", 0))
        self.kl_ctl.value = float(meta.get("kl_coef", self.kl_ctl.value))
        if meta.get("renamed"):
            inverse = [(new, old) for old, new in SAVED_NAMES]
            checkpoint["state_dict"] = rename_keys(checkpoint["state_dict"], inverse)

    def save_policy(self, path) -> None:
        """Writes the policy alone as a kit checkpoint (``mmllm.checkpoint.load_model`` reads it).
        Under FSDP2 every rank must call it (the shards are gathered); rank 0 writes."""
        state = full_cpu_state(self.policy, prefix="model.")
        if self._trainer is None or self._trainer.is_global_zero:
            torch.save({"mmllm": self._meta(), "state_dict": state}, str(path))
