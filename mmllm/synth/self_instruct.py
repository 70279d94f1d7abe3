"""Self-instruct (Wang et al., 2023): a teacher grows a pool of tasks from a few seed tasks.

Each round:

1. **Propose.** Each request shows the teacher ``num_prompt_instructions`` tasks sampled from the
   pool (mostly seed tasks, up to ``num_machine_instructions`` generated ones) as "Task 1: ... Task
   k:" and lets it continue the list; every instruction it writes is a candidate.
2. **Filter.** Heuristics (length, keywords such as image/file, "write a program", leading
   punctuation or non-English) and ROUGE-L near-duplicates (>= ``rouge_threshold`` against the
   pool and the round's earlier candidates) drop candidates.
3. **Classify.** The teacher says whether the task is classification (a few seed tasks as shots).
4. **Instances.** Non-classification: input first ("Example / Input / Output"); classification:
   output first ("Class label / Input"), so the inputs are not biased towards one label. Empty,
   duplicate, contradictory (same input, different outputs), degenerate or looping instances are dropped;
   a task left without instances is dropped.

A kept task joins the pool and becomes SFT rows (one per instance):
``{"messages": [{"role": "user", "content": instruction + input}, {"role": "assistant", ...}]}``.
Every candidate is counted exactly once: ``generated == kept + sum(dropped.values())``.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mmllm.synth.common import (
    SeedTask,
    SynthResult,
    ask,
    load_seed_tasks,
    prompt_text,
    sft_row,
    write_outputs,
)
from mmllm.synth.filters import (
    BLACKLIST,
    RougePool,
    instruction_reason,
    is_degenerate,
    is_repetitive,
    words,
)
from mmllm.synth.parsing import (
    parse_instances,
    parse_instructions,
    parse_labeled_instances,
    parse_yes_no,
)

log = logging.getLogger(__name__)

PROPOSE = ("Come up with a series of new tasks that people could ask a helpful AI assistant to do. "
           "Make them diverse: vary the verbs, the topics and the kind of answer (writing, "
           "classification, editing, reasoning, coding, advice). Each task is one or two sentences, "
           "can be done with text alone (no images, files or web browsing), and some need an input "
           "while others do not. Continue the numbered list with new tasks, one per line.\n\n")
CLASSIFY = ("Is the task below a classification task, one whose answer is a label from a small, fixed "
            "set of labels? Answer Yes or No.\n\n")
INPUT_FIRST = ("Write examples for the task. Each example gives an Input (the information the task "
               "works on, or <none> when it needs none) and the Output a good assistant would give. "
               "Write one to three examples in the same format as the ones below.\n\n")
OUTPUT_FIRST = ("For the classification task, list its possible class labels and write an input that "
                "belongs to each label, in the same format as the examples below.\n\n")


_EXAMPLE_START = re.compile(r"\s*[*#]*\s*(example|input)\b", re.IGNORECASE)
_LABEL_START = re.compile(r"\s*[*#]*\s*class\s+label\b", re.IGNORECASE)


def _continued(answer: str, prompt_tail: str, restated: re.Pattern) -> str:
    """The answer as a continuation of the prompt's last line (``prompt_tail``), unless the
    teacher restated that line itself."""
    return answer if restated.match(answer) else prompt_tail + answer


class SelfInstruct:
    """Generates instruction-following data with a teacher from seed tasks (see the module doc).

    Args:
        seed_tasks: JSONL of seed tasks in the self-instruct format (None: the shipped ones).
        num_instructions: tasks to keep; the run stops when it has them (or at ``max_rounds``).
        requests_per_round: proposal requests sent together each round.
        max_rounds: rounds at most (a weak teacher may never reach ``num_instructions``).
        num_prompt_instructions: tasks shown in a proposal prompt (the paper: 8).
        num_machine_instructions: of those, at most this many generated ones (the paper: 2).
        num_shots: seed examples shown in the classification and instance prompts.
        max_instances: instances kept per task (one SFT row each).
        rouge_threshold: ROUGE-L F at or above which a candidate is a near-duplicate.
        min_words, max_words: instruction length bounds (words).
        max_output_words: longer instance outputs are dropped.
        blacklist: keywords that drop an instruction.
        propose_sampling, classify_sampling, instance_sampling: sampling params of each step
            (override the teacher's defaults).
        seed: seed of the pool sampling (and of the proposal requests' sampling).
    """

    def __init__(self, *, seed_tasks: str | None = None, num_instructions: int = 100,
                 requests_per_round: int = 8, max_rounds: int = 100, num_prompt_instructions: int = 8,
                 num_machine_instructions: int = 2, num_shots: int = 4, max_instances: int = 3,
                 rouge_threshold: float = 0.7, min_words: int = 3, max_words: int = 150,
                 max_output_words: int = 400, blacklist: Sequence[str] = BLACKLIST,
                 propose_sampling: Mapping | None = None, classify_sampling: Mapping | None = None,
                 instance_sampling: Mapping | None = None, seed: int = 0) -> None:
        if num_instructions < 1 or requests_per_round < 1 or max_rounds < 1:
            raise ValueError("num_instructions, requests_per_round and max_rounds must be >= 1")
        if not 0 <= num_machine_instructions <= num_prompt_instructions:
            raise ValueError("num_machine_instructions must be in [0, num_prompt_instructions]")
        self.seeds = load_seed_tasks(seed_tasks)
        self.num_instructions, self.requests_per_round = num_instructions, requests_per_round
        self.max_rounds, self.num_prompt_instructions = max_rounds, num_prompt_instructions
        self.num_machine_instructions, self.num_shots = num_machine_instructions, num_shots
        self.max_instances, self.rouge_threshold = max_instances, rouge_threshold
        self.min_words, self.max_words, self.max_output_words = min_words, max_words, max_output_words
        self.blacklist = tuple(blacklist)
        self.propose_sampling = dict(propose_sampling or {"temperature": 0.7, "top_p": 0.5})
        self.classify_sampling = dict(classify_sampling or {"temperature": 0.0, "max_tokens": 3})
        self.instance_sampling = dict(instance_sampling or {"temperature": 0.0})
        self.seed = seed

    # ---- prompts -------------------------------------------------------------------------
    def propose_prompt(self, rng: random.Random, generated: list[SeedTask]) -> str:
        """A "Task 1: ... Task k: / Task k+1:" prompt from the pool (seed + generated tasks)."""
        n_machine = min(self.num_machine_instructions, len(generated))
        shown = rng.sample(generated, n_machine) if n_machine else []
        shown += rng.sample(self.seeds, min(self.num_prompt_instructions - n_machine, len(self.seeds)))
        rng.shuffle(shown)
        lines = [f"Task {i}: {t.instruction}" for i, t in enumerate(shown, 1)]
        return PROPOSE + "\n".join(lines) + f"\nTask {len(shown) + 1}:"

    def classify_prompt(self, instruction: str, rng: random.Random) -> list[dict]:
        """A conversation: seed tasks of both kinds as answered turns, then ``instruction``."""
        yes = [t for t in self.seeds if t.is_classification]
        no = [t for t in self.seeds if not t.is_classification]
        k = max(1, self.num_shots // 2)
        shots = rng.sample(yes, min(k, len(yes))) + rng.sample(no, min(k, len(no)))
        rng.shuffle(shots)
        conv = []
        for t in shots:
            conv += [{"role": "user", "content": f"{CLASSIFY}Task: {t.instruction}"},
                     {"role": "assistant", "content": "Yes" if t.is_classification else "No"}]
        return conv + [{"role": "user", "content": f"{CLASSIFY}Task: {instruction}"}]

    def instance_prompt(self, instruction: str, classification: bool, rng: random.Random) -> str:
        pool = [t for t in self.seeds if t.is_classification == classification] or self.seeds
        shots = rng.sample(pool, min(max(1, self.num_shots // 2), len(pool)))
        if classification:
            demo = ["Task: " + t.instruction + "".join(f"\nClass label: {i['output']}\nInput: {i['input'] or '<none>'}"
                                                       for i in t.instances) for t in shots]
            return OUTPUT_FIRST + "\n\n".join(demo) + f"\n\nTask: {instruction}\nClass label:"
        demo = ["Task: " + t.instruction + "".join(f"\nExample {j}\nInput: {i['input'] or '<none>'}\nOutput: {i['output']}"
                                                   for j, i in enumerate(t.instances, 1)) for t in shots]
        return INPUT_FIRST + "\n\n".join(demo) + f"\n\nTask: {instruction}\nExample 1\nInput:"

    # ---- filters -------------------------------------------------------------------------
    def filter_instances(self, instances: list[dict], classification: bool, dropped: Counter) -> list[dict]:
        """The instances worth keeping (at most ``max_instances``); ``dropped`` counts the rest by reason."""
        by_input: dict[str, set[str]] = {}
        for inst in instances:
            by_input.setdefault(inst["input"].lower(), set()).add(inst["output"].lower())
        kept, seen = [], set()
        for inst in instances:
            inp, out = inst["input"], inst["output"]
            if not out:
                reason = "empty_output"
            elif (inp.lower(), out.lower()) in seen:
                reason = "duplicate_instance"
            elif len(by_input[inp.lower()]) > 1 and not (classification and inp):
                reason = "conflicting_outputs"  # the same input with different outputs
            elif inp and inp.strip().lower() == out.strip().lower():
                reason = "output_copies_input"
            elif len(words(out)) > self.max_output_words:
                reason = "output_too_long"
            elif not classification and is_degenerate(out):
                reason = "degenerate_output"  # labels may be stop words ("yes"); answers may not
            elif is_repetitive(out):
                reason = "repetitive_output"
            elif len(kept) >= self.max_instances:
                reason = "over_max_instances"
            else:
                reason = None
            seen.add((inp.lower(), out.lower()))
            if reason:
                dropped[reason] += 1
            else:
                kept.append({"input": inp, "output": out})
        return kept

    def screen(self, candidates: list[str], pool: RougePool, dropped: Counter) -> list[str]:
        """Candidates passing the heuristics and ROUGE-L dedup against ``pool`` and each other."""
        batch = RougePool(threshold=self.rouge_threshold)
        passed = []
        for text in candidates:
            reason = instruction_reason(text, min_words=self.min_words, max_words=self.max_words,
                                        blacklist=self.blacklist)
            if reason is None:
                tokens = pool.tokenize(text)
                if pool.is_duplicate(text, tokens) or batch.is_duplicate(text, tokens):
                    reason = "rouge_duplicate"
                else:
                    batch.add(text, tokens)
            if reason:
                dropped[reason] += 1
            else:
                passed.append(text)
        return passed

    # ---- the run -------------------------------------------------------------------------
    def run(self, teacher, output_dir: str | Path) -> SynthResult:
        """Generates up to ``num_instructions`` tasks with ``teacher`` and writes them to ``output_dir``.

        Returns:
            The result; ``output_dir`` gets ``sft.jsonl`` (SFT rows), ``tasks.jsonl`` (kept tasks in
            the seed format, reusable as seeds) and ``stats.json``.
        """
        rng = random.Random(self.seed)
        pool = RougePool(threshold=self.rouge_threshold, texts=[t.instruction for t in self.seeds])
        generated: list[SeedTask] = []
        dropped, inst_dropped, counts = Counter(), Counter(), Counter()
        rounds = 0
        with tqdm(total=self.num_instructions, desc="self-instruct: tasks kept", unit="task") as bar:
            while len(generated) < self.num_instructions and rounds < self.max_rounds:
                rounds += 1
                self._round(teacher, rng, pool, generated, dropped, inst_dropped, counts)
                bar.update(min(len(generated), self.num_instructions) - bar.n)
                log.info("self-instruct round %d: %d/%d tasks kept", rounds, len(generated), self.num_instructions)
        rows = [sft_row(prompt_text(t.instruction, i["input"]), i["output"]) for t in generated for i in t.instances]
        kept = len(generated)
        stats = {"mode": "self_instruct", "rounds": rounds, "generated": counts["candidates"], "kept": kept,
                 "yield": round(kept / counts["candidates"], 4) if counts["candidates"] else 0.0,
                 "rows": len(rows), "classification_kept": sum(t.is_classification for t in generated),
                 "dropped": dict(sorted(dropped.items())), "instances_dropped": dict(sorted(inst_dropped.items())),
                 "requests": {k: v for k, v in sorted(counts.items()) if k != "candidates"},
                 "teacher": dict(getattr(teacher, "stats", {}))}
        if not kept:
            log.warning("self-instruct kept no tasks from %d candidates (%s): the teacher's answers "
                        "did not survive the filters", counts["candidates"], stats["dropped"])
        return write_outputs(output_dir, rows, stats, {"tasks": [t.as_json() for t in generated]})

    def _round(self, teacher, rng: random.Random, pool: RougePool, generated: list[SeedTask],
               dropped: Counter, inst_dropped: Counter, counts: Counter) -> None:
        """One propose -> filter -> classify -> instances round; kept tasks join ``generated`` and ``pool``."""
        prompts = [self.propose_prompt(rng, generated) for _ in range(self.requests_per_round)]
        sampling = {**self.propose_sampling, "seed": rng.randrange(2 ** 31)}
        candidates = []
        for answer in ask(teacher, prompts, counts, "propose", desc="self-instruct: propose", sampling=sampling):
            found = parse_instructions(answer) if answer is not None else []
            counts["propose_malformed"] += answer is not None and not found
            candidates += found
        counts["candidates"] += len(candidates)
        room = self.num_instructions - len(generated)
        screened = self.screen(candidates, pool, dropped)
        if len(screened) > room:
            dropped["over_target"] += len(screened) - room
        screened = screened[:room]  # proposals beyond the target are not worth more requests
        labels = ask(teacher, [self.classify_prompt(s, rng) for s in screened], counts, "classify",
                     desc="self-instruct: classify", sampling=self.classify_sampling)
        todo = []
        for text, label in zip(screened, labels):
            is_cls = parse_yes_no(label)
            if is_cls is None:
                dropped["teacher_failed" if label is None else "malformed_classification"] += 1
            else:
                todo.append((text, is_cls))
        answers = ask(teacher, [self.instance_prompt(t, c, rng) for t, c in todo], counts, "instances",
                      desc="self-instruct: instances", sampling=self.instance_sampling)
        for (text, is_cls), answer in zip(todo, answers):
            if answer is None:
                dropped["teacher_failed"] += 1
                continue
            parsed = (parse_labeled_instances(_continued(answer, "Class label:", _LABEL_START)) if is_cls
                      else parse_instances(_continued(answer, "Example 1\nInput:", _EXAMPLE_START)))
            instances = self.filter_instances(parsed, is_cls, inst_dropped)
            if not instances:
                dropped["malformed_instances" if not parsed else "no_valid_instances"] += 1
                continue
            generated.append(SeedTask(text, instances, is_cls))
            pool.add(text)
