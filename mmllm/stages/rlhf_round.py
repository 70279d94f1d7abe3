"""The ``rlhf_round`` pipeline stage: one online RLHF round with the AI judge, at pipeline scale.

The pipeline's own checkpoint is the policy (sampled with :class:`mmllm.rlhf.policy.PolicySampler`)
and the judge's teacher (:class:`mmllm.teacher.LocalTeacher`); the round is
:func:`mmllm.rlhf.round.run_round` on ``conf/rlhf_round.yaml`` in ``<run>/rlhf``, so a rerun
resumes it. The reward-model and PPO steps go through ``train`` (default: ``mmllm train
experiment=reward_model`` / ``experiment=ppo`` in subprocesses).

A tiny pretrained model is a poor judge: most of its answers carry no verdict and are counted as
malformed. With ``require_preferences=false`` (the default here) a round without a single
decisive label skips the two training steps and says so in the record (``trained: false``).
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
        judge_max_tokens: answer length of the judge.
        train: ``train(overrides, output_dir) -> metrics`` for the reward model and PPO steps
            (a Hydra ``_partial_``); None: :func:`mmllm.rlhf.round.train_cli`.
        require_preferences: fail when the judge gives no decisive label (else skip training).
        overrides: extra Hydra overrides of ``conf/rlhf_round.yaml`` (e.g.
            ``reward_train.overrides=[...]``, ``ppo_train.overrides=[...]``).
    """

    inputs = ("tokenize", "pretrain")
    config_keys = ("seed",)

    def __init__(self, *, prompts: list[str], samples_per_prompt: int = 3, budget: int = 6,
                 max_new_tokens: int = 24, judge_max_tokens: int = 48,
                 train: Callable[[list[str], Path], dict] | None = None,
                 require_preferences: bool = False, overrides: list[str] = ()) -> None:
        if not prompts:
            raise ValueError("RLHFRoundStage needs at least one prompt")
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={samples_per_prompt}: pairs need >= 2 responses")
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
        overrides = [f"run_dir={run_dir}", f"policy={ckpt}", "labeller=ai", "round=0",
                     f"prompts_per_round={len(self.prompts)}", f"samples_per_prompt={self.samples_per_prompt}",
                     f"budget={self.budget}", f"require_preferences={str(self.require_preferences).lower()}",
                     f"sampler.max_new_tokens={self.max_new_tokens}", f"sampler.seed={seed}",
                     "teacher=local", f"teacher.checkpoint={ckpt}", "teacher.progress=false",
                     f"teacher.cache_path={run_dir}/teacher_cache.sqlite", "teacher.on_error=skip",
                     f"teacher.sampling.max_tokens={self.judge_max_tokens}", "teacher.max_batch=8",
                     f"selection.seed={seed}", *self.overrides]
        cfg = compose_config("rlhf_round", overrides)
        with open_dict(cfg):
            cfg.prompts = OmegaConf.create(self.prompts)  # a list: no quoting through overrides
        return cfg

    def run(self, ctx: StageContext) -> None:
        from mmllm.rlhf.round import run_round

        state = run_round(self.round_config(ctx), train=self.train)
        steps = state["steps"]
        label = steps["label"]["metrics"]
        trained = "skipped" not in steps["reward_model"]["metrics"]
        ctx.record["rlhf_round"] = {
            "round": state["round"], "candidates": steps["select"]["metrics"]["candidates"],
            "selected": steps["select"]["metrics"]["selected"], "strategy": steps["select"]["metrics"]["strategy"],
            "judge": {k: label.get(k, 0) for k in ("agree", "disagree", "malformed", "failed")},
            "position_bias": label.get("position_bias"),
            "preference_pairs": steps["merge"]["metrics"]["preference_pairs"],
            "trained": trained, "reward_model": state["outputs"]["reward_model"],
            "policy": state["outputs"]["policy"],
            "round_json": str(self.outputs(ctx)["rlhf"] / "rounds" / str(state["round"]) / "round.json"),
        }
        r = ctx.record["rlhf_round"]
        print(f"rlhf round {r['round']}: {r['selected']} comparisons judged {r['judge']}, "
              f"{r['preference_pairs']} preference pairs, trained: {trained}")
