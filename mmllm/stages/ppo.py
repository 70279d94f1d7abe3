"""The ``ppo`` stage of ``mmllm pipeline``: a few PPO iterations (with PPO-ptx) on the SFT policy.

It reads the ``sft`` stage's checkpoint (else the ``pretrain`` stage's) and the ``reward_model``
stage's reward model; without a reward model it uses a rule reward (the share of response
tokens that spell ``reward_strings``) and says so in its record. The PPO-ptx term trains on the
pipeline's own pretraining data (``data``, prepared by the tokenize stage). It records the
reward / KL curves and the probe scores, and writes the policy as a kit checkpoint.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

from mmllm.stages.base import Stage, StageContext
from mmllm.stages.trainer import CONFIG_IGNORE as STAGE_TRAINER_IGNORE
from mmllm.stages.trainer import stage_trainer

DEFAULT_PROMPTS = ("The history of", "The city of", "In the year", "The first", "A new",
                   "The war", "The king", "The people of", "The name", "The book", "In science,",
                   "The music of", "The river", "The game", "During the", "The most")


class PPOStage(Stage):
    """RLHF with PPO at pipeline scale (seconds on a CPU).

    Args:
        prompts: generation prompts (plain text; ``chat`` renders them as user turns).
        path: a prompt file instead (JSONL/Parquet, a glob or a list; rows ``prompt`` or
            ``messages``, as ``data=prompts`` of ``mmllm train experiment=ppo`` reads).
        on_bad_row: "error" or "skip" (counted in the record) for malformed rows of ``path``.
        self_instruct: also prompt with the ``self_instruct`` stage's instructions (its
            ``sft.jsonl``, the answers dropped), when that stage ran and kept any.
        chat: render prompts with the chat template (None: when the policy comes from ``sft``).
        rollouts: PPO iterations (batches of prompts).
        batch_size: prompts per rollout; probe_size: prompts held out for the probe scores.
        max_new_tokens: response budget.
        ppo_epochs, num_minibatches: optimizer passes per rollout.
        lr: AdamW learning rate.
        kl_coef, kl_target: beta, and the adaptive controller's target (None: fixed beta).
        ptx_coef: PPO-ptx weight of the pretraining LM loss (0: off).
        ptx_rows: rows of each pretraining batch used by the ptx term (a full pretraining batch
            would cost more than the PPO minibatch it is added to).
        reward_strings: the rule reward's strings (used without a reward model).
        policy_output, reward_output: the output names of the sft/pretrain and reward_model stages.
    """

    optional_inputs = ("tokenize", "pretrain", "self_instruct", "sft", "reward_model")
    config_keys = ("seed", "data", "stage_trainer")
    config_ignore = STAGE_TRAINER_IGNORE

    def __init__(self, *, prompts: list[str] = DEFAULT_PROMPTS, path: str | list[str] | None = None,
                 on_bad_row: str = "error", self_instruct: bool = False, chat: bool | None = None,
                 rollouts: int = 3, batch_size: int = 8, probe_size: int = 4,
                 max_new_tokens: int = 12, ppo_epochs: int = 2, num_minibatches: int = 2,
                 lr: float = 1e-4, kl_coef: float = 0.05, kl_target: float | None = 2.0,
                 ptx_coef: float = 0.5, ptx_rows: int = 4, reward_strings: list[str] = (" the",),
                 policy_output: str = "checkpoint", reward_output: str = "checkpoint") -> None:
        if rollouts < 1 or (path is None and not self_instruct and len(prompts) < batch_size + probe_size):
            raise ValueError(f"the ppo stage needs rollouts >= 1 and at least batch_size + probe_size "
                             f"({batch_size + probe_size}) prompts, got {rollouts} and {len(prompts)}")
        self.prompts, self.chat, self.rollouts = list(prompts), chat, rollouts
        self.path, self.on_bad_row, self.self_instruct = path, on_bad_row, self_instruct
        self.batch_size, self.probe_size, self.max_new_tokens = batch_size, probe_size, max_new_tokens
        self.ppo_epochs, self.num_minibatches, self.lr = ppo_epochs, num_minibatches, lr
        self.kl_coef, self.kl_target, self.ptx_coef = kl_coef, kl_target, ptx_coef
        self.ptx_rows = ptx_rows
        self.reward_strings = list(reward_strings)
        self.policy_output, self.reward_output = policy_output, reward_output

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {"checkpoint": ctx.run_dir / "ppo" / "policy.ckpt"}

    def _sources(self, ctx: StageContext) -> tuple[Path, str, Path | None]:
        """The policy checkpoint, the stage it came from, and the reward model (or None)."""
        for stage in ("sft", "pretrain"):
            if ctx.has(stage):
                policy = (stage, ctx.output(stage, self.policy_output))
                break
        else:
            raise RuntimeError("the ppo stage needs a policy: run the sft or pretrain stage first")
        rm = ctx.output("reward_model", self.reward_output) if ctx.has("reward_model") else None
        return policy[1], policy[0], rm

    def _tokenizer_dir(self, ctx: StageContext, policy: Path) -> str:
        if ctx.has("tokenize") and "tokenizer" in ctx.markers["tokenize"].outputs:
            return str(ctx.output("tokenize", "tokenizer"))
        return str(policy)  # load_policy_tokenizer reads the tokenizer recorded in the checkpoint

    def _prompt_files(self, ctx: StageContext) -> list[str]:
        """``path`` (one or a list) and, with ``self_instruct``, that stage's ``sft.jsonl`` if it kept rows."""
        files = [] if self.path is None else [self.path] if isinstance(self.path, str) else list(self.path)
        if self.self_instruct and ctx.has("self_instruct"):
            made = ctx.output("self_instruct", "sft")
            if made.is_file() and made.stat().st_size > 0:
                files.append(str(made))
            else:
                print(f"ppo: the self_instruct stage kept no instructions ({made}): not used")
        return files

    def _ptx_data(self, ctx: StageContext):
        from hydra.utils import instantiate

        if self.ptx_coef <= 0 or "_target_" not in (ctx.cfg.get("data") or {}):
            return None
        dm = instantiate(ctx.cfg.data)
        dm.prepare_data()  # cached by the tokenize stage
        dm.setup("fit")
        return _Rows(dm.train_dataloader(), self.ptx_rows)

    def run(self, ctx: StageContext) -> None:
        import lightning as L
        import torch

        from mmllm.data.prompts import PromptDataModule
        from mmllm.modules.ppo import PPOModule, TokenFractionReward

        policy, policy_stage, rm = self._sources(ctx)
        tok_dir = self._tokenizer_dir(ctx, policy)
        chat = self.chat if self.chat is not None else policy_stage == "sft"
        files = self._prompt_files(ctx)
        data = PromptDataModule(path=files or None, prompts=None if self.path else self.prompts,
                                tokenizer=tok_dir, chat=chat, on_bad_row=self.on_bad_row,
                                batch_size=self.batch_size, probe_size=self.probe_size,
                                seed=int(ctx.cfg.get("seed") or 0))
        ptx = self._ptx_data(ctx)
        rule = TokenFractionReward(strings=self.reward_strings, tokenizer=data.tokenizer)
        reward = f"reward model {rm}" if rm is not None else \
            f"rule reward (no reward_model stage): share of response tokens of {self.reward_strings}"
        print(f"ppo: policy {policy} ({policy_stage}), {reward}")
        module = PPOModule(init_from=str(policy), reward_model=str(rm) if rm else None, reward_fn=rule,
                           optimizer=partial(torch.optim.AdamW, lr=self.lr, weight_decay=0.0),
                           max_new_tokens=self.max_new_tokens, ppo_epochs=self.ppo_epochs,
                           num_minibatches=self.num_minibatches, kl_coef=self.kl_coef,
                           kl_target=self.kl_target, ptx_coef=self.ptx_coef if ptx else 0.0,
                           ptx_data=ptx, probe_every=max(1, self.rollouts - 1))
        L.seed_everything(int(ctx.cfg.get("seed") or 0), verbose=False)
        # Manual optimization: PPOModule clips its own gradients (max_grad_norm).
        trainer = stage_trainer(ctx, max_steps=self.rollouts * self.ppo_epochs * self.num_minibatches,
                                gradient_clip_val=None)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=data)
        seconds = time.perf_counter() - t0
        out = self.outputs(ctx)["checkpoint"]
        out.parent.mkdir(parents=True, exist_ok=True)
        module.save_policy(out)
        self._record(ctx, module, policy, reward, ptx is not None, seconds, out)
        ctx.record["ppo"]["prompts"] = {"files": files, "inline": 0 if self.path else len(self.prompts),
                                        **data.counts}

    @staticmethod
    def _record(ctx: StageContext, module, policy: Path, reward: str, ptx: bool, seconds: float,
                out: Path) -> None:
        h = module.history
        curve = lambda key: [round(r[key], 4) for r in h if key in r]
        probes = [{k.removeprefix("probe/"): round(v, 4) for k, v in r.items() if k.startswith("probe/")}
                  for r in h if "probe/score_mean" in r]
        ctx.record["ppo"] = {
            "policy": str(policy), "reward": reward, "ptx": ptx, "rollouts": len(h),
            "reward_mean": curve("reward_mean"), "kl": curve("kl"), "beta": curve("beta"),
            "entropy": curve("entropy"), "ptx_loss": curve("ptx_loss"), "probe": probes,
            "seconds": round(seconds, 1), "checkpoint": str(out)}
        r = ctx.record["ppo"]
        print(f"ppo: reward {r['reward_mean'][0]} -> {r['reward_mean'][-1]}, KL {r['kl'][0]} -> "
              f"{r['kl'][-1]} over {len(h)} rollouts ({r['seconds']} s)")


class _Rows:
    """The first ``rows`` rows of every batch of ``loader`` (re-iterable)."""

    def __init__(self, loader, rows: int) -> None:
        self.loader, self.rows = loader, rows

    def __iter__(self):
        for batch in self.loader:
            yield {k: v[:self.rows] for k, v in batch.items()}
