"""Code generation scored by execution: pass@k (Chen et al.) with a sandboxed subprocess."""

from __future__ import annotations

from collections.abc import Sequence

from mmllm.eval.metrics import pass_at_k
from mmllm.eval.runner import ModelRunner
from mmllm.eval.sandbox import run_programs
from mmllm.eval.tasks.base import Task, TaskResult
from mmllm.eval.templates import Example

HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")


class CodeTask(Task):
    """Generates ``n_samples`` completions per problem and runs each against the problem's tests.

    The program is ``meta["program_prefix"] + completion + "\\n" + meta["tests"]`` (HumanEval:
    prompt + completion + test + ``check(entry_point)``; MBPP: completion + asserts); it passes
    when it runs to its end (the tests ran) and exits 0. Execution happens only in a sandboxed
    child process (:mod:`mmllm.sandbox`), never in this process.

    Args:
        ks: the k of every reported pass@k (each <= ``n_samples``).
        n_samples: completions per problem (> 1 needs ``temperature > 0``).
        temperature / top_p: sampling (temperature 0: greedy).
        max_new_tokens: generation budget.
        stop: strings that end a completion (HumanEval's: a new top-level statement).
        timeout: seconds per program.
        memory_mb: address-space limit per program.
        n_workers: programs run at once.
        isolation: the sandbox layer, ``"auto"``/``"bwrap"``/``"none"`` (:mod:`mmllm.sandbox`).
        **kwargs: see :class:`Task`.
    """

    def __init__(self, *, ks: Sequence[int] = (1,), n_samples: int = 1, temperature: float = 0.0,
                 top_p: float | None = 0.95, max_new_tokens: int = 384,
                 stop: Sequence[str] = HUMANEVAL_STOP, timeout: float = 5.0, memory_mb: int = 1024,
                 n_workers: int = 2, isolation: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        if any(k > n_samples or k < 1 for k in ks):
            raise ValueError(f"every k of pass@k must be in [1, n_samples={n_samples}], got {list(ks)}")
        if n_samples > 1 and temperature <= 0:
            raise ValueError("n_samples > 1 needs temperature > 0 (greedy samples are identical)")
        if self.template is None:
            raise ValueError(f"code task {self.name} needs a template")
        self.ks, self.n_samples = list(ks), n_samples
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.stop, self.timeout, self.memory_mb, self.n_workers = list(stop), timeout, memory_mb, n_workers
        self.isolation = isolation

    def demo_answer(self, example: Example) -> str:
        return example.answers[0]

    @staticmethod
    def program(example: Example, completion: str) -> str:
        """The program whose exit code says whether ``completion`` solves ``example``."""
        return example.meta["program_prefix"] + completion + "\n" + example.meta["tests"]

    def execute(self, examples: Sequence[Example], completions: Sequence[Sequence[str]],
                progress: bool = True) -> list[list[bool]]:
        """Runs every completion of every example; returns pass/fail per completion."""
        programs = [self.program(ex, c) for ex, cs in zip(examples, completions) for c in cs]
        results = run_programs(programs, n_workers=self.n_workers, timeout=self.timeout,
                               memory_mb=self.memory_mb, isolation=self.isolation, progress=progress)
        out, i = [], 0
        for cs in completions:
            out.append([r.passed for r in results[i:i + len(cs)]])
            i += len(cs)
        return out

    def check_references(self, limit: int | None = None) -> list[bool]:
        """Whether each example's reference solution passes its own tests (data sanity check)."""
        examples = self.examples(limit)
        return [p[0] for p in self.execute(examples, [[ex.answers[0]] for ex in examples])]

    def run(self, runner: ModelRunner, *, limit: int | None = None,
            num_fewshot: int | None = None) -> TaskResult:
        """Generates, executes and reports pass@k for every k in ``ks``."""
        examples = self.examples(limit)
        prompts = self.contexts(examples, num_fewshot)
        flat = [p for p in prompts for _ in range(self.n_samples)]
        gens = runner.generate(flat, max_new_tokens=self.max_new_tokens, stop=self.stop,
                               temperature=self.temperature, top_p=self.top_p, seed=self.seed)
        completions = [gens[i * self.n_samples:(i + 1) * self.n_samples] for i in range(len(examples))]
        passed = self.execute(examples, completions, progress=runner.progress)
        metrics = {}
        for k in self.ks:
            per = [pass_at_k(len(p), sum(p), k) for p in passed]
            metrics[f"pass@{k}"] = sum(per) / max(len(per), 1)
        samples = [{"task_id": ex.meta.get("task_id"), "completions": cs, "passed": p}
                   for ex, cs, p in zip(examples, completions, passed)]
        return TaskResult(name=self.name, metrics=metrics, n=len(examples), samples=samples)
