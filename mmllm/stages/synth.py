"""The ``self_instruct`` pipeline stage: instruction data generated through the teacher path.

By default the teacher is the pipeline's own pretrained model, served in-process by ``mmllm
serve`` (:class:`~mmllm.serve.ServerThread` on 127.0.0.1, a free port) and queried with the
real OpenAI client (:class:`~mmllm.teacher.OpenAITeacher`): the path a hosted teacher takes.
A tiny pretrained model writes mostly junk, which the filters drop; the stage still finishes
(with zero examples kept, said in its record and output) rather than fail the pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from mmllm.stages.base import Stage, StageContext

log = logging.getLogger(__name__)


class SelfInstructStage(Stage):
    """Generates ``<stage dir>/sft.jsonl`` (``{"messages": [...]}`` rows) and ``stats.json``.

    Args:
        teacher: a :class:`~mmllm.teacher.Teacher`, or its config node (``_target_:
            mmllm.teacher.OpenAITeacher``, ...; Hydra builds a node in ``pipeline.stages`` with
            the stage, and a teacher loads its model only at its first request); None serves the
            pretrain stage's checkpoint and asks it through the OpenAI client.
        num_instructions: tasks to keep (the run stops there, or after ``max_rounds``).
        requests_per_round: proposal requests per round.
        max_rounds: rounds at most.
        max_tokens: longest teacher answer (tokens).
        max_seq_len: context of the served model (capped by the model's).
        options: more :class:`~mmllm.synth.SelfInstruct` arguments (the defaults keep prompts
            short enough for a small model's context).
    """

    optional_inputs = ("tokenize",)
    config_keys = ("seed",)

    def __init__(self, *, teacher: Any = None, num_instructions: int = 8,
                 requests_per_round: int = 8, max_rounds: int = 2, max_tokens: int = 48,
                 max_seq_len: int = 512, options: Mapping | None = None) -> None:
        self.teacher = dict(teacher) if isinstance(teacher, Mapping) else teacher
        self.inputs = () if self.teacher is not None else ("pretrain",)
        self.num_instructions, self.requests_per_round = num_instructions, requests_per_round
        self.max_rounds, self.max_tokens, self.max_seq_len = max_rounds, max_tokens, max_seq_len
        self.options = {"num_prompt_instructions": 4, "num_machine_instructions": 1, "num_shots": 2,
                        "max_instances": 2, **dict(options or {})}

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        return {name: ctx.dir / f"{name}.jsonl" for name in ("sft", "tasks")} | {"stats": ctx.dir / "stats.json"}

    def generator(self, ctx: StageContext):
        from mmllm.synth import SelfInstruct

        seed = ctx.cfg.get("seed")
        return SelfInstruct(num_instructions=self.num_instructions, requests_per_round=self.requests_per_round,
                            max_rounds=self.max_rounds, seed=0 if seed is None else int(seed), **self.options)

    def run(self, ctx: StageContext) -> None:
        generator = self.generator(ctx)
        if self.teacher is not None:
            built = isinstance(self.teacher, Mapping)
            teacher = instantiate(self.teacher) if built else self.teacher
            try:
                result = generator.run(teacher, ctx.dir)
            finally:
                if built:
                    teacher.close()
            source = f"{type(teacher).__name__}({teacher.model})"
        else:
            result, source = self._run_served(ctx, generator), "pretrain (mmllm serve)"
        s = result.stats
        ctx.record["self_instruct"] = {"teacher": source, "generated": s["generated"], "kept": s["kept"],
                                       "yield": s["yield"], "rows": s["rows"], "dropped": s["dropped"],
                                       "sft": str(result.paths["sft"])}
        print(f"self-instruct ({source}): kept {s['kept']} of {s['generated']} generated instructions "
              f"({s['rows']} SFT rows)")
        if not s["kept"]:
            why = (f"every candidate was dropped ({s['dropped']})" if s["generated"] else
                   f"no answer held a parsable instruction (requests: {s['requests']})")
            print(f"self-instruct kept nothing: {why}; {result.paths['sft']} is empty")

    def _run_served(self, ctx: StageContext, generator):
        """Serves the pretrained checkpoint on loopback and generates through the OpenAI client."""
        from mmllm.serve import Engine, ServerThread, create_app
        from mmllm.stages.builtin import trained_model
        from mmllm.teacher import OpenAITeacher

        model, tok = trained_model(ctx)
        max_seq_len = min(self.max_seq_len, model.max_seq_len)
        engine = Engine(model, tok, max_batch=self.requests_per_round, max_seq_len=max_seq_len,
                        seed=int(ctx.cfg.get("seed") or 0))
        app = create_app(engine, model_name="pretrain", max_tokens=self.max_tokens)
        # Failures (a prompt over the context) are counted and skipped, not fatal; no retries
        # either: the server is local and a rejected prompt stays rejected.
        with ServerThread(app) as server, OpenAITeacher(
                model="pretrain", base_url=server.url, max_retries=0, progress=False, on_error="skip",
                max_concurrency=self.requests_per_round, sampling={"max_tokens": self.max_tokens}) as teacher:
            return generator.run(teacher, ctx.dir)
