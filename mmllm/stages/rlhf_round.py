"""The ``rlhf_round`` pipeline stage: one online RLHF round with the AI judge, at pipeline scale.

The pipeline's own checkpoint is the policy (sampled with :class:`mmllm.rlhf.policy.PolicySampler`)
and the judge's teacher (:class:`mmllm.teacher.LocalTeacher`); the round is
:func:`mmllm.rlhf.round.run_round` on ``conf/rlhf_round.yaml`` in ``<run>/rlhf``, so a rerun
resumes it. The reward-model and PPO steps go through ``train`` (default: ``mmllm train
experiment=reward_model`` / ``experiment=ppo`` in this process).

A tiny pretrained model is a poor judge in text: its answers carry no verdict. The stage's judge
therefore reads token probabilities by default (``judge_scoring="logprob"``,
:class:`mmllm.rlhf.judge.PairwiseJudge`): P(A)/P(B)/P(tie) in both orders, averaged, which every
model gives, so the round labels comparisons and trains. The two training steps run at pipeline
scale (``reward_steps`` reward-model steps, ``ppo_rollouts`` one-minibatch PPO rollouts on the
round's prompts; ``overrides`` may change any of it). With ``require_preferences=false`` a
round without a single decisive label skips the two training steps and says so (``trained: false``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf, open_dict

from mmllm.stages.base import Stage, StageContext


class RLHFRoundStage(Stage):
    """Runs one round of ``mmllm rlhf-round`` (labeller=ai) on the pretrained checkpoint.

    Args:
        prompts: the round's prompts.
        samples_per_prompt: K responses sampled per prompt.
        budget: comparisons judged.
        max_new_tokens: response length of the policy samples.
        judge_max_tokens: answer length of the judge (text scoring).
        judge_scoring: ``logprob`` (the judge's token probabilities) or ``text`` (parsed verdicts).
        reward_steps: optimizer steps of the reward model's retraining.
        ppo_rollouts: PPO rollouts (one epoch, one minibatch of ``batch_size`` prompts each).
            Measured at pipeline scale (dim 128, 4 layers, 6 comparisons) on a loaded 2-core
            machine: the stage takes 60 s with 4 / 1, 118 s with 8 / 2 (sampling ~20 s of it).
        batch_size: prompts per reward-model batch and per PPO rollout.
        train: ``train(overrides, output_dir) -> metrics`` for the reward model and PPO steps
            (a Hydra ``_partial_``); None: :func:`mmllm.rlhf.round.train_inprocess` (the
            pipeline's other stages train in-process too; a subprocess per step would cost
            more start-up than training here).
        require_preferences: fail when the judge gives no decisive label (else skip training).
        overrides: extra Hydra overrides of ``conf/rlhf_round.yaml`` (e.g.
            ``reward_train.overrides=[...]``, ``ppo_train.overrides=[...]``).
    """

    inputs = ("tokenize", "pretrain")
    config_keys = ("seed",)

    def __init__(self, *, prompts: list[str], samples_per_prompt: int = 3, budget: int = 6,
                 max_new_tokens: int = 24, judge_max_tokens: int = 48, judge_scoring: str = "logprob",
                 reward_steps: int = 4, ppo_rollouts: int = 1, batch_size: int = 2,
                 train: Callable[[list[str], Path], dict] | None = None,
                 require_preferences: bool = False, overrides: list[str] = ()) -> None:
        if len(prompts) < 2:
            raise ValueError("RLHFRoundStage needs at least two prompts (PPO holds one out as its probe)")
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={samples_per_prompt}: pairs need >= 2 responses")
        if judge_scoring not in ("logprob", "text"):
            raise ValueError(f"judge_scoring must be 'logprob' or 'text', got {judge_scoring!r}")
        if min(reward_steps, ppo_rollouts, batch_size) < 1:
            raise ValueError("reward_steps, ppo_rollouts and batch_size must be >= 1")
        self.judge_scoring, self.reward_steps, self.ppo_rollouts = judge_scoring, reward_steps, ppo_rollouts
        self.batch_size = batch_size
        self.prompts, self.samples_per_prompt, self.budget = list(prompts), samples_per_prompt, budget
        self.max_new_tokens, self.judge_max_tokens = max_new_tokens, judge_max_tokens
        self.train, self.require_preferences = train, require_preferences
        self.overrides = list(overrides)

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"rlhf": ctx.run_dir / "rlhf"}

    def round_config(self, ctx: StageContext):
        """The ``rlhf_round`` config of this stage's round."""
        from mmllm.config import compose_config

        ckpt = str(ctx.output("pretrain", "checkpoint"))
        run_dir = self.outputs(ctx)["rlhf"]
        seed = int(ctx.cfg.get("seed") or 0)
        bar = _bar(ctx)
        overrides = [f"run_dir={run_dir}", f"policy={ckpt}", "labeller=ai", "round=0",
                     f"prompts_per_round={len(self.prompts)}", f"samples_per_prompt={self.samples_per_prompt}",
                     f"budget={self.budget}", f"require_preferences={str(self.require_preferences).lower()}",
                     f"sampler.max_new_tokens={self.max_new_tokens}", f"sampler.seed={seed}",
                     "teacher=local", f"teacher.checkpoint={ckpt}", f"teacher.progress={bar}",
                     f"teacher.cache_path={run_dir}/teacher_cache.sqlite", "teacher.on_error=skip",
                     f"teacher.sampling.max_tokens={self.judge_max_tokens}", "teacher.max_batch=8",
                     f"selection.seed={seed}", f"judge.scoring={self.judge_scoring}", *self.overrides]
        cfg = compose_config("rlhf_round", overrides)
        with open_dict(cfg):
            cfg.prompts = OmegaConf.create(self.prompts)  # a list: no quoting through overrides
            # Pipeline scale, before the config's own overrides so that those win.
            cfg.reward_train.overrides = [*cfg.reward_train.overrides[:1], *self.reward_overrides(seed, bar),
                                          *cfg.reward_train.overrides[1:]]
            cfg.ppo_train.overrides = [*cfg.ppo_train.overrides[:1], *self.ppo_overrides(seed, bar),
                                       *cfg.ppo_train.overrides[1:]]
        return cfg

    def reward_overrides(self, seed: int, bar: str = "false") -> list[str]:
        """``mmllm train experiment=reward_model`` at pipeline scale: a few steps, no validation
        loop (the handful of pairs is all training data; the train accuracy is recorded) and so
        no reward normalisation (``normalize=data`` centres on held-out responses)."""
        return [f"trainer.max_steps={self.reward_steps}", f"data.batch_size={self.batch_size}",
                "data.seq_len=128", "data.val_fraction=0.0", "trainer.limit_val_batches=0",
                f"trainer.enable_progress_bar={bar}", "trainer.log_every_n_steps=1",
                "module.normalize=null", "module.optimizer.lr=2.0e-4", "module.scheduler.warmup_steps=1",
                f"callbacks.model_checkpoint.every_n_train_steps={self.reward_steps}", f"seed={seed}"]

    def ppo_overrides(self, seed: int, bar: str = "false") -> list[str]:
        """``mmllm train experiment=ppo`` at pipeline scale on the round's prompts (samples.jsonl)."""
        return ["data.path={round_dir}/samples.jsonl", f"data.batch_size={self.batch_size}",
                "data.probe_size=1", "data.chat=true", f"module.max_new_tokens={self.max_new_tokens}",
                "module.ppo_epochs=1", "module.num_minibatches=1", "module.probe_every=1",
                f"trainer.max_steps={self.ppo_rollouts}", f"trainer.enable_progress_bar={bar}",
                "trainer.log_every_n_steps=1",
                f"callbacks.model_checkpoint.every_n_train_steps={self.ppo_rollouts}", f"seed={seed}"]

    def run(self, ctx: StageContext) -> None:
        from mmllm.rlhf.round import run_round, train_inprocess

        state = run_round(self.round_config(ctx), train=self.train or train_inprocess)
        steps = state["steps"]
        label = steps["label"]["metrics"]
        rm, ppo = steps["reward_model"]["metrics"], steps["ppo"]["metrics"]
        trained = "skipped" not in rm
        ctx.record["rlhf_round"] = {
            "round": state["round"], "candidates": steps["select"]["metrics"]["candidates"],
            "selected": steps["select"]["metrics"]["selected"], "strategy": steps["select"]["metrics"]["strategy"],
            "judge_scoring": self.judge_scoring, "judged": label.get("judged", 0),
            "judge": {k: label.get(k, 0) for k in ("agree", "disagree", "malformed", "failed")},
            "labels": {k: label.get(f"label_{k}", 0) for k in ("a", "b", "tie", "skip")},
            "position_bias": label.get("position_bias"), "mean_abs_margin": label.get("mean_abs_margin"),
            "preference_pairs": steps["merge"]["metrics"]["preference_pairs"], "trained": trained,
            # The retrain's fit to its pairs (there is no held-out split at this scale) and PPO's reward.
            "reward_model_train_acc": rm.get("train/reward_acc"), "reward_model_loss": rm.get("train/loss"),
            "ppo_reward_mean": ppo.get("ppo/reward_mean"),
            "reward_model": state["outputs"]["reward_model"], "policy": state["outputs"]["policy"],
            "round_json": str(self.outputs(ctx)["rlhf"] / "rounds" / str(state["round"]) / "round.json"),
        }
        r = ctx.record["rlhf_round"]
        print(f"rlhf round {r['round']}: {r['judged']} comparisons judged ({self.judge_scoring}) "
              f"{r['judge']}, labels {r['labels']}, {r['preference_pairs']} preference pairs, trained: "
              f"{trained} (reward model train acc {r['reward_model_train_acc']}, PPO reward {r['ppo_reward_mean']})")


def _bar(ctx: StageContext) -> str:
    """The round's progress bars (judge, reward-model and PPO training) follow the pipeline's
    ``stage_trainer.enable_progress_bar``, as an override value ("true"/"false")."""
    return str(bool(OmegaConf.select(ctx.cfg, "stage_trainer.enable_progress_bar", default=False))).lower()
