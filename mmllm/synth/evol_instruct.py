"""Evol-Instruct (Xu et al., 2023, WizardLM): a teacher rewrites instructions into harder or rarer ones.

Each round every instruction of the current generation is evolved by one operation drawn at
random: five *in-depth* ones (add a constraint, deepen, concretise, require more reasoning steps,
complicate the input) or the *in-breadth* one (a new, rarer instruction of the same domain). The
teacher then answers each evolved instruction, and the eliminator drops failed evolutions:

* ``copied_prompt_words``: the evolution copies words of the evolving prompt ("given prompt",
  "#Rewritten Prompt#", ...); ``empty_evolution`` / ``degenerate_evolution``: nothing usable;
* ``no_information_gain``: the evolution equals its parent (the teacher judges "Equal / Not
  Equal" as in the paper, or ``equality_check="rouge"``: ROUGE-L F >= ``equality_threshold``);
  ``malformed_judgement`` when the judge says neither;
* ``refused_response`` (the answer says "sorry" and is under ``sorry_max_words`` words),
  ``degenerate_response`` (too short, or only punctuation and stop words),
  ``response_copies_instruction`` (ROUGE-L F >= 0.9 with the instruction: an echo), ``teacher_failed``;
* ``duplicate``: an instruction already kept.

A successful evolution is kept (an SFT row with the teacher's answer) and evolves further next
round; a failed one leaves its parent in the generation to be evolved again. Per round:
``evolved == kept + sum(eliminated.values())``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from mmllm.synth.common import (
    SynthResult,
    ask,
    input_file,
    load_seed_tasks,
    prompt_text,
    sft_row,
    write_outputs,
)
from mmllm.synth.filters import RougePool, is_degenerate, response_reason
from mmllm.synth.parsing import clean, parse_equal

log = logging.getLogger(__name__)

DEPTH = ("You rewrite prompts to make them harder. Rewrite the prompt below into a more demanding "
         "version that strong AI assistants (such as ChatGPT and GPT-4) would find more challenging, "
         "while a person can still understand and answer it. Keep every non-text part of the prompt "
         "(tables, code, data). {method} The rewritten prompt adds only 10 to 20 words to the "
         "original. Do not refer to 'the given prompt' or 'the rewritten prompt' in your answer: "
         "reply with the rewritten prompt only.\n\n#The Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:\n")
BREADTH = ("You create new prompts. Taking the prompt below as inspiration, write a brand-new prompt "
           "in the same domain that is rarer and more unusual. It has a similar length and difficulty "
           "and a person can understand and answer it. Do not refer to 'the given prompt' or 'the "
           "created prompt' in your answer: reply with the new prompt only.\n\n"
           "#Given Prompt#:\n{instruction}\n\n#Created Prompt#:\n")
METHODS = {
    "add_constraints": "Add one more constraint or requirement that the answer must satisfy.",
    "deepen": "If the prompt asks about a particular issue, increase the depth and breadth of the inquiry.",
    "concretize": "Replace general concepts with more specific ones.",
    "increase_reasoning": ("If the prompt can be solved with a few simple steps of thinking, rewrite it "
                           "to explicitly require multi-step reasoning."),
    "complicate_input": ("Add a complex input the prompt works on (a table, code, a formula or a data "
                         "sample in a suitable format) and refer to it in the prompt."),
}
OPERATIONS = (*METHODS, "breadth")
EQUAL = ("Here are two instructions to an AI assistant. Are they equal to each other, that is, do "
         "they have the same constraints and requirements, and the same depth and breadth of "
         "inquiry?\n\nThe first instruction: {a}\n\nThe second instruction: {b}\n\n"
         "Answer with Equal or Not Equal only.")
# Few-shot turns of the equality judge: a paraphrase is Equal, an added requirement is not.
JUDGE_SHOTS = (("Name three rivers in Europe.", "List three European rivers.", "Equal"),
               ("Name three rivers in Europe.",
                "Name three rivers in Europe and give the length of each in kilometres.", "Not Equal"))
_LABEL = re.compile(r"^\s*(?:\*\*|#)*\s*(?:the\s+)?(?:rewritten|created|new)\s+prompt\s*(?:\*\*|#)*\s*:?\s*",
                    re.IGNORECASE)
_COPIED = re.compile(r"(given|rewritten|created)\s*#?\s*prompt|#\s*rewritten|#\s*created", re.IGNORECASE)


def load_instructions(path: str | Path | None) -> list[str]:
    """Instructions to evolve, from JSONL rows: ``instruction`` (+ ``input``), ``prompt``, or
    ``messages`` (the first user turn). None: the shipped seed tasks (instruction + first input).

    Raises:
        ValueError: a row with none of these, named by file and line.
    """
    if path is None:
        return [prompt_text(t.instruction, t.instances[0]["input"]) for t in load_seed_tasks()]
    path = input_file(path, "instructions", "a JSONL of instruction / prompt / messages rows, or null "
                      "for the shipped seed tasks")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "instruction" in row:
                text = prompt_text(str(row["instruction"]), str(row.get("input") or ""))
            elif "prompt" in row:
                text = str(row["prompt"])
            else:
                text = next(str(m["content"]) for m in row["messages"] if m.get("role") == "user")
        except (ValueError, KeyError, TypeError, StopIteration, AttributeError) as e:
            raise ValueError(f"{path}:{n}: no instruction in the row ({type(e).__name__}); expected "
                             "'instruction', 'prompt' or 'messages' with a user turn") from e
        if text.strip():
            out.append(text.strip())
    if not out:
        raise ValueError(f"{path}: no instructions")
    return out


def evolution_prompt(instruction: str, operation: str) -> str:
    """The teacher prompt that evolves ``instruction`` by ``operation`` (one of :data:`OPERATIONS`)."""
    if operation == "breadth":
        return BREADTH.format(instruction=instruction)
    return DEPTH.format(method=METHODS[operation], instruction=instruction)


def judge_prompt(parent: str, child: str) -> list[dict]:
    """The equality question as a conversation, after the :data:`JUDGE_SHOTS` answered turns."""
    conv = []
    for a, b, verdict in JUDGE_SHOTS:
        conv += [{"role": "user", "content": EQUAL.format(a=a, b=b)}, {"role": "assistant", "content": verdict}]
    return conv + [{"role": "user", "content": EQUAL.format(a=parent, b=child)}]


def evolved_text(answer: str) -> str:
    """The evolved instruction in a teacher's answer: a leading "#Rewritten Prompt#:" label (an
    echo of the prompt's last line) removed, whitespace and surrounding quotes cleaned."""
    return clean(_LABEL.sub("", answer.strip(), count=1))


def evolution_reason(parent: str, child: str | None) -> str | None:
    """Why an evolution fails before it is answered (None: it goes on)."""
    if child is None:
        return "teacher_failed"
    if not child:
        return "empty_evolution"
    if _COPIED.search(child):
        return "copied_prompt_words"
    if is_degenerate(child, min_words=3):
        return "degenerate_evolution"
    if " ".join(child.lower().split()) == " ".join(parent.lower().split()):
        return "no_information_gain"
    return None


class EvolInstruct:
    """Evolves instructions with a teacher over several rounds (see the module doc).

    Args:
        instructions: JSONL of instructions to evolve (see :func:`load_instructions`; None:
            the shipped seed tasks).
        num_instructions: how many of them to evolve (the first n; None: all).
        rounds: evolution rounds (the paper: 4).
        operations: the operations drawn from (default: all of :data:`OPERATIONS`).
        equality_check: "teacher" (ask it "Equal / Not Equal", as the paper) or "rouge".
        equality_threshold: with "rouge", ROUGE-L F at or above this means no information gain.
        min_response_words: shorter answers are degenerate.
        sorry_max_words: an answer with "sorry" shorter than this is a refusal.
        evolve_sampling, response_sampling, judge_sampling: sampling params of each step.
        seed: seed of the operation draws.
    """

    def __init__(self, *, instructions: str | None = None, num_instructions: int | None = None,
                 rounds: int = 4, operations: Sequence[str] = OPERATIONS, equality_check: str = "teacher",
                 equality_threshold: float = 0.9, min_response_words: int = 3, sorry_max_words: int = 80,
                 evolve_sampling: Mapping | None = None, response_sampling: Mapping | None = None,
                 judge_sampling: Mapping | None = None, seed: int = 0) -> None:
        unknown = sorted(set(operations) - set(OPERATIONS))
        if unknown or not operations:
            raise ValueError(f"unknown operations {unknown}; choose from {OPERATIONS}")
        if equality_check not in ("teacher", "rouge"):
            raise ValueError(f"equality_check must be 'teacher' or 'rouge', got {equality_check!r}")
        if rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {rounds}")
        self.instructions = load_instructions(instructions)[:num_instructions]
        self.rounds, self.operations = rounds, tuple(operations)
        self.equality_check = equality_check
        self.equality_threshold = equality_threshold
        self.min_response_words, self.sorry_max_words = min_response_words, sorry_max_words
        self.evolve_sampling = dict(evolve_sampling or {"temperature": 0.7})
        self.response_sampling = dict(response_sampling or {"temperature": 0.0})
        self.judge_sampling = dict(judge_sampling or {"temperature": 0.0, "max_tokens": 4})
        self.seed = seed

    def no_gain(self, parent: str, child: str) -> bool:
        """ROUGE-L F of ``child`` against ``parent`` reaches ``equality_threshold``."""
        return RougePool(threshold=self.equality_threshold, texts=[parent]).is_duplicate(child)

    def run(self, teacher, output_dir: str | Path) -> SynthResult:
        """Evolves the instructions for ``rounds`` rounds and writes the kept ones to ``output_dir``.

        Returns:
            The result; ``output_dir`` gets ``sft.jsonl``, ``evolutions.jsonl`` (each kept evolution
            with its parent, operation, round and answer) and ``stats.json``.
        """
        rng = random.Random(self.seed)
        generation = list(self.instructions)
        kept: list[dict] = []
        seen = {" ".join(t.lower().split()) for t in generation}
        round_stats, counts = [], Counter()
        for r in tqdm(range(1, self.rounds + 1), desc="evol-instruct: rounds", unit="round"):
            generation, stats = self._round(teacher, rng, r, generation, kept, seen, counts)
            round_stats.append(stats)
            log.info("evol-instruct round %d: %d evolved, %d kept", r, stats["evolved"], stats["kept"])
        rows = [sft_row(e["instruction"], e["response"]) for e in kept]
        evolved = sum(s["evolved"] for s in round_stats)
        eliminated = sum((Counter(s["eliminated"]) for s in round_stats), Counter())
        stats = {"mode": "evol_instruct", "instructions": len(self.instructions), "rounds": round_stats,
                 "generated": evolved, "kept": len(kept),
                 "yield": round(len(kept) / evolved, 4) if evolved else 0.0, "rows": len(rows),
                 "eliminated": dict(sorted(eliminated.items())),
                 "requests": dict(sorted(counts.items())), "teacher": dict(getattr(teacher, "stats", {}))}
        if not kept:
            log.warning("evol-instruct kept no evolutions of %d (%s)", evolved, stats["eliminated"])
        return write_outputs(output_dir, rows, stats, {"evolutions": kept})

    def _round(self, teacher, rng: random.Random, r: int, generation: list[str], kept: list[dict],
               seen: set[str], counts: Counter) -> tuple[list[str], dict]:
        """Evolves ``generation`` once; returns the next generation and the round's stats."""
        ops = [rng.choice(self.operations) for _ in generation]
        sampling = {**self.evolve_sampling, "seed": rng.randrange(2 ** 31)}
        answers = ask(teacher, [evolution_prompt(p, op) for p, op in zip(generation, ops)], counts,
                      "evolve", desc=f"evol-instruct: round {r}", sampling=sampling)
        children = [evolved_text(a) if a is not None else None for a in answers]
        reasons: list[str | None] = [evolution_reason(p, c) for p, c in zip(generation, children)]
        for i, (p, c) in enumerate(zip(generation, children)):
            if reasons[i] is None and self.equality_check == "rouge" and self.no_gain(p, c):
                reasons[i] = "no_information_gain"
            elif reasons[i] is None and " ".join(c.lower().split()) in seen:
                reasons[i] = "duplicate"
        live = [i for i, why in enumerate(reasons) if why is None]
        responses = ask(teacher, [children[i] for i in live], counts, "respond",
                        desc=f"evol-instruct: answers {r}", sampling=self.response_sampling)
        for i, resp in zip(live, responses):
            reasons[i] = response_reason(resp, min_words=self.min_response_words,
                                         sorry_max_words=self.sorry_max_words)
            if reasons[i] is None and RougePool(threshold=0.9, texts=[children[i]]).is_duplicate(resp):
                reasons[i] = "response_copies_instruction"  # an echo, not an answer
        if self.equality_check == "teacher":
            self._judge(teacher, generation, children, reasons, counts)
        nxt, eliminated = [], Counter()
        response_of = dict(zip(live, responses))
        for i, (parent, child) in enumerate(zip(generation, children)):
            norm = " ".join((child or "").lower().split())
            if reasons[i] is None and norm in seen:
                reasons[i] = "duplicate"  # two parents evolved into the same text this round
            if reasons[i] is None:
                seen.add(norm)
                kept.append({"instruction": child, "response": response_of[i], "parent": parent,
                             "operation": ops[i], "round": r})
                nxt.append(child)
            else:
                eliminated[reasons[i]] += 1
                nxt.append(parent)  # evolve the parent again next round
        stats = {"round": r, "evolved": len(generation), "kept": len(generation) - sum(eliminated.values()),
                 "eliminated": dict(sorted(eliminated.items())), "operations": dict(sorted(Counter(ops).items()))}
        return nxt, stats

    def _judge(self, teacher, parents: list[str], children: list, reasons: list, counts: Counter) -> None:
        """Asks the teacher whether each surviving evolution equals its parent (no information gain)."""
        live = [i for i, why in enumerate(reasons) if why is None]
        verdicts = ask(teacher, [judge_prompt(parents[i], children[i]) for i in live], counts, "judge",
                       desc="evol-instruct: equality", sampling=self.judge_sampling)
        for i, verdict in zip(live, verdicts):
            equal = parse_equal(verdict)
            if equal is None:
                reasons[i] = "teacher_failed" if verdict is None else "malformed_judgement"
            elif equal:
                reasons[i] = "no_information_gain"
