"""What the generators share: seed tasks, SFT rows, the outputs written, teacher calls that count failures."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SEED_TASKS = Path(__file__).resolve().parent / "assets" / "seed_tasks.jsonl"


@dataclasses.dataclass
class SeedTask:
    """One task in the self-instruct format (Wang et al., 2023).

    Attributes:
        instruction: what to do ("Classify the sentiment of the review.").
        instances: ``{"input": ..., "output": ...}`` examples (input "" when the task needs none).
        is_classification: the output is one of a small fixed set of labels.
    """

    instruction: str
    instances: list[dict]
    is_classification: bool = False

    def as_json(self) -> dict:
        return {"instruction": self.instruction, "instances": self.instances,
                "is_classification": self.is_classification}


def input_file(path: str | Path, key: str, expected: str) -> Path:
    """``path`` as a Path; a :class:`~mmllm.errors.MissingFileError` naming ``key`` when it is no file.

    Args:
        path: the configured file.
        key: its option, for the message (``seed_tasks``).
        expected: what the option takes, for the fix line.
    """
    from mmllm.errors import MissingFileError

    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise MissingFileError(f"{key}={path}: no such file{where}", fix=f"pass {expected}")
    return path


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Seed tasks from a JSONL file of ``{instruction, instances: [{input, output}], is_classification}``.

    Args:
        path: the file (None: the ~30 tasks shipped in ``mmllm/synth/assets/seed_tasks.jsonl``).

    Raises:
        ValueError: a malformed row, named by file and line (seeds are hand-written: fix them).
    """
    path = input_file(path, "seed_tasks", "a JSONL of {instruction, instances, is_classification} rows, "
                      "or null for the shipped seed tasks") if path else SEED_TASKS
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            instances = [{"input": str(i.get("input") or ""), "output": str(i["output"])}
                         for i in row["instances"]]
            instruction = str(row["instruction"]).strip()
            if not instruction or not instances or not all(i["output"].strip() for i in instances):
                raise ValueError("needs an instruction and instances with non-empty outputs")
            tasks.append(SeedTask(instruction, instances, bool(row.get("is_classification", False))))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: not a seed task ({type(e).__name__}: {e}); expected "
                             '{"instruction": ..., "instances": [{"input": ..., "output": ...}], '
                             '"is_classification": ...}') from e
    if not tasks:
        raise ValueError(f"{path}: no seed tasks")
    return tasks


def prompt_text(instruction: str, input: str = "") -> str:
    """The user turn of a task instance: the instruction, then its input after a blank line."""
    return f"{instruction.strip()}\n\n{input.strip()}" if input.strip() else instruction.strip()


def sft_row(user: str, assistant: str) -> dict:
    """A ``{"messages": [user, assistant]}`` row (what :class:`~mmllm.data.sft.SFTDataModule` reads)."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def ask(teacher, prompts: Sequence[str | list[dict]], counter: Counter, stage: str, *, desc: str,
        sampling: Mapping | None = None) -> list[str | None]:
    """The teacher's answers to ``prompts``, concurrently (None for a failed request).

    A prompt is the text of one user turn, or a whole conversation (few-shot examples as
    earlier user/assistant turns, which chat models follow more reliably than inline shots).

    ``counter[f"{stage}_requests"]`` counts the requests and ``counter[f"{stage}_failed"]`` the
    answers that came back None (a teacher with ``on_error="skip"``).
    """
    convs = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
    answers = teacher.chat_many(convs, desc=desc, **dict(sampling or {})) if convs else []
    counter[f"{stage}_requests"] += len(convs)
    counter[f"{stage}_failed"] += sum(a is None for a in answers)
    return answers


@dataclasses.dataclass
class SynthResult:
    """What a generator wrote.

    Attributes:
        rows: the SFT rows (``{"messages": [...]}``), as in ``sft``.
        stats: the counts written to ``stats``.
        paths: name -> file (``sft``, ``stats`` and the generator's own records).
    """

    rows: list[dict]
    stats: dict
    paths: dict[str, Path]


def write_jsonl(rows: Iterable[Mapping], path: Path) -> Path:
    """Writes rows as JSONL atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)
    return path


def write_outputs(output_dir: str | Path, rows: list[dict], stats: dict,
                  records: Mapping[str, list[dict]]) -> SynthResult:
    """``<dir>/sft.jsonl`` (rows), ``<dir>/stats.json`` and ``<dir>/<name>.jsonl`` per record list."""
    out = Path(output_dir)
    paths = {"sft": write_jsonl(rows, out / "sft.jsonl")}
    for name, recs in records.items():
        paths[name] = write_jsonl(recs, out / f"{name}.jsonl")
    paths["stats"] = out / "stats.json"
    paths["stats"].write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return SynthResult(rows=rows, stats=stats, paths=paths)
