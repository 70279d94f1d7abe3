"""HuggingGPT (Shen et al., 2023): an LLM plans tasks, picks an expert per task, runs them, answers.

Four stages, each through an LLM (a :class:`~mmllm.teacher.Teacher` or any
``fn(messages) -> str``):

1. **Task planning.** The request becomes a JSON list of tasks
   ``{"id": 0, "task": "calculation", "args": {...}, "dep": [-1]}``; an argument may name an
   earlier task's output with a ``<resource>-<id>`` placeholder (``"<text>-0"``). The JSON is
   pulled out of whatever prose or code fence surrounds it; a malformed plan is sent back with
   the error for a bounded number of retries, then :class:`PlanError`.
2. **Model selection.** Catalog entries (``data/hugginggpt_models.json``: the kit's LM, the VLM
   (``expert: "vlm"``, for image-to-text and visual question answering; its ``describe`` is
   :func:`mmllm.tools.experts.vlm_describer` over the vlm_stage2 checkpoint), the registry's tools) of the task's type are ranked by BM25 between the task and their
   descriptions; the LLM picks one of the top ``top_k`` (``{"id": ...}``); an answer that cannot
   be parsed, or names no candidate, falls back to the top-ranked one.
3. **Task execution** in dependency order (a cycle or a missing dependency is a
   :class:`PlanError` before anything runs); placeholders are filled from finished outputs when a
   task starts; tasks whose dependencies are done run in parallel on a thread pool; each is timed.
4. **Response generation.** The LLM answers the request from the plan, choices and results.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmllm.tools.registry import ToolRegistry
from mmllm.tools.search import BM25Index, Passage

CATALOG_PATH = Path(__file__).parent / "data" / "hugginggpt_models.json"
_PLACEHOLDER = re.compile(r"<([A-Za-z_]+)>-(\d+)")
Messages = list[dict]
Expert = Callable[[dict], object]


class PlanError(ValueError):
    """A plan that cannot run: malformed JSON, bad fields, unknown dependencies or a cycle."""


@dataclass
class Task:
    id: int
    task: str
    args: dict
    dep: list[int] = field(default_factory=list)


@dataclass
class TaskResult:
    id: int
    task: str
    model: str | None
    ok: bool
    output: str
    start: float = 0.0       # time.perf_counter() at start / end
    end: float = 0.0
    reason: str = ""         # why this model was chosen

    @property
    def seconds(self) -> float:
        return self.end - self.start


def _ask(llm, messages: Messages) -> str:
    answer = llm.chat(messages) if hasattr(llm, "chat") else llm(messages)
    if answer is None:
        raise PlanError("the LLM returned no answer")
    return str(answer)


# ------------------------------------------------------------------------------ planning
def extract_json(text: str, kind: type = list):
    """The first JSON value of type ``kind`` in ``text`` (prose and code fences around it are fine).

    Raises:
        PlanError: no such value.
    """
    decoder = json.JSONDecoder()
    opener = "[" if kind is list else "{"
    for m in re.finditer(re.escape(opener), text):
        try:
            value, _ = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, kind):
            return value
    raise PlanError(f"no JSON {kind.__name__} found in the answer: {text[:200]!r}")


def parse_plan(text: str) -> list[Task]:
    """Tasks from an LLM answer; ``dep`` ``[-1]`` (HuggingGPT's "none") becomes ``[]``.

    Placeholders in the arguments count as dependencies.
    """
    raw = extract_json(text, list)
    if not raw:
        raise PlanError("the plan has no tasks")
    tasks = []
    for k, t in enumerate(raw):
        if not isinstance(t, dict) or not {"id", "task", "args"} <= set(t):
            raise PlanError(f"task {k} must be an object with id, task, args and dep, got {t!r}")
        if not isinstance(t["id"], int) or not isinstance(t["task"], str) or not isinstance(t["args"], dict):
            raise PlanError(f"task {k}: id must be an integer, task a string, args an object")
        dep = t.get("dep", [])
        if not isinstance(dep, list) or not all(isinstance(d, int) for d in dep):
            raise PlanError(f"task {t['id']}: dep must be a list of task ids")
        refs = {int(m.group(2)) for m in _PLACEHOLDER.finditer(json.dumps(t["args"]))}
        tasks.append(Task(t["id"], t["task"], t["args"], sorted({d for d in dep if d >= 0} | refs)))
    return tasks


def topological_order(tasks: Sequence[Task]) -> list[int]:
    """Task ids in an order where every task follows its dependencies; PlanError on a cycle."""
    by_id = {t.id: t for t in tasks}
    if len(by_id) != len(tasks):
        raise PlanError("task ids must be unique")
    for t in tasks:
        missing = [d for d in t.dep if d not in by_id]
        if missing or t.id in t.dep:
            raise PlanError(f"task {t.id} depends on {'itself' if not missing else f'unknown tasks {missing}'}")
    order, done = [], set()
    while len(order) < len(tasks):
        ready = [t.id for t in tasks if t.id not in done and set(t.dep) <= done]
        if not ready:
            stuck = sorted(set(by_id) - done)
            raise PlanError(f"the plan has a dependency cycle among tasks {stuck}")
        order += ready
        done.update(ready)
    return order


def fill_placeholders(value, outputs: Mapping[int, str]):
    """``value`` (nested dicts/lists/strings) with every ``<resource>-<id>`` replaced by that output."""
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: outputs[int(m.group(2))], value)
    if isinstance(value, list):
        return [fill_placeholders(v, outputs) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, outputs) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------- experts
def load_catalog(path: str | Path = CATALOG_PATH) -> list[dict]:
    """The model catalog: entries with ``id``, ``task``, ``expert``, ``description`` (and ``prompt``)."""
    entries = json.loads(Path(path).read_text())
    for e in entries:
        if not {"id", "task", "expert", "description"} <= set(e):
            raise ValueError(f"catalog entry {e!r} needs id, task, expert and description")
    return entries


def tool_experts(registry: ToolRegistry) -> dict[str, Expert]:
    """One expert per registry tool: runs it, raising its error text on failure."""
    def make(name: str) -> Expert:
        def run(args: dict) -> str:
            result = registry.call(name, args)
            if not result.ok:
                raise RuntimeError(result.content)
            return result.content
        return run
    return {name: make(name) for name in registry.names}


def text_expert(generate_fn: Callable[[str], str]) -> Expert:
    """An LM expert: ``args["text"]`` (or the args as JSON) through ``generate_fn(prompt) -> str``."""
    return lambda args: generate_fn(args["text"] if isinstance(args.get("text"), str) else json.dumps(args))


def vlm_expert(describe: Callable[[str, str], str]) -> Expert:
    """The VLM slot: ``describe(image, question) -> str`` on ``args["image"]`` (a path or URL) and
    ``args["text"]`` (default: a caption request); the kit's VLM is
    :func:`mmllm.tools.experts.vlm_describer`."""
    def run(args: dict) -> str:
        if not isinstance(args.get("image"), str):
            raise TypeError("image-to-text needs args.image (a path or URL)")
        return describe(args["image"], args.get("text") or "Describe the image.")
    return run


def default_experts(registry: ToolRegistry | None = None, *, generate_fn: Callable[[str], str] | None = None,
                    vlm: Callable[[str, str], str] | None = None) -> dict[str, Expert]:
    """Experts for the shipped catalog: the registry's tools, the LM (``generate_fn(prompt)``, e.g.
    a closure over :func:`mmllm.generation.generate`) and the VLM slot when given."""
    experts = tool_experts(registry) if registry is not None else {}
    if generate_fn is not None:
        experts["lm"] = text_expert(generate_fn)
    if vlm is not None:
        experts["vlm"] = vlm_expert(vlm)
    return experts


class HuggingGPT:
    """Plans, selects, executes and answers.

    Args:
        llm: a teacher (``.chat(messages)``) or ``fn(messages) -> str``.
        experts: expert name (the catalog's ``expert`` field) -> ``fn(args) -> output``; catalog
            entries whose expert is absent are never chosen (e.g. the VLM slot until one is given).
        catalog: catalog entries (default: the shipped JSON).
        top_k: candidates shown to the LLM per task.
        max_retries: re-plans after a malformed plan.
        max_workers: tasks run at once.
    """

    def __init__(self, *, llm, experts: Mapping[str, Expert], catalog: Sequence[dict] | None = None,
                 top_k: int = 3, max_retries: int = 2, max_workers: int = 4) -> None:
        self.llm, self.experts = llm, dict(experts)
        self.catalog = [e for e in (catalog if catalog is not None else load_catalog()) if e["expert"] in self.experts]
        self.top_k, self.max_retries, self.max_workers = top_k, max_retries, max_workers

    @property
    def task_types(self) -> list[str]:
        return sorted({e["task"] for e in self.catalog})

    # -------------------------------------------------------------------------- stage 1
    def plan(self, request: str) -> list[Task]:
        """Task planning with up to ``max_retries`` corrections; PlanError when none parses."""
        messages = [{"role": "system", "content": (
            "Split the user's request into tasks. Answer with a JSON list only, each task "
            '{"id": int, "task": type, "args": {...}, "dep": [ids of tasks it needs, or -1]}. '
            f"Task types: {', '.join(self.task_types)}. To use the output of task k in args, "
            'write "<text>-k" (or <image>-k, ...).')},
            {"role": "user", "content": request}]
        for attempt in range(self.max_retries + 1):
            answer = _ask(self.llm, messages)
            try:
                tasks = parse_plan(answer)
                unknown = sorted({t.task for t in tasks} - set(self.task_types))
                if unknown:
                    raise PlanError(f"unknown task types {unknown}; use only {self.task_types}")
                topological_order(tasks)
                return tasks
            except PlanError as exc:
                if attempt == self.max_retries:
                    raise PlanError(f"no valid plan after {attempt + 1} attempts: {exc}") from None
                messages += [{"role": "assistant", "content": answer},
                             {"role": "user", "content": f"That plan is invalid: {exc}. Answer with the corrected JSON list."}]
        raise AssertionError("unreachable")

    # -------------------------------------------------------------------------- stage 2
    def candidates(self, task: Task) -> list[dict]:
        """Catalog entries of the task's type, best BM25 match of task + args first (ties: catalog order)."""
        same = [e for e in self.catalog if e["task"] == task.task]
        if len(same) <= 1:
            return same
        index = BM25Index([Passage(e["id"], e["task"], e["description"]) for e in same])
        query = f"{task.task} {json.dumps(task.args, ensure_ascii=False)}"
        score = {h.passage.doc_id: h.score for h in index.search(query, k=len(same))}
        return sorted(same, key=lambda e: -score.get(e["id"], 0.0))[:self.top_k]

    def select(self, task: Task, request: str) -> tuple[dict, str]:
        """The chosen entry and why ("llm: ..." or "fallback: ...")."""
        cands = self.candidates(task)
        if not cands:
            raise PlanError(f"no available model for task type {task.task!r}")
        if len(cands) == 1:
            return cands[0], "only candidate"
        listing = "\n".join(json.dumps({"id": e["id"], "description": e["description"]}) for e in cands)
        answer = _ask(self.llm, [{"role": "user", "content": (
            f"Request: {request}\nTask: {json.dumps(asdict(task))}\nCandidate models:\n{listing}\n"
            'Pick the best model. Answer with JSON {"id": model id, "reason": why}.')}])
        try:
            choice = extract_json(answer, dict)
            chosen = next(e for e in cands if e["id"] == choice.get("id"))
            return chosen, "llm: " + str(choice.get("reason", ""))
        except (PlanError, StopIteration):
            return cands[0], f"fallback: top BM25 candidate (unparseable choice {answer[:80]!r})"

    # -------------------------------------------------------------------------- stage 3
    def _run_task(self, task: Task, entry: dict, outputs: Mapping[int, str], reason: str) -> TaskResult:
        start = time.perf_counter()
        try:
            args = fill_placeholders(task.args, outputs)
            if "prompt" in entry and isinstance(args.get("text"), str):
                args = args | {"text": entry["prompt"].format(text=args["text"])}
            out = self.experts[entry["expert"]](args)
            ok, text = True, out if isinstance(out, str) else json.dumps(out, default=str)
        except Exception as exc:  # noqa: BLE001 (a failed task is reported, its dependants skipped)
            ok, text = False, f"error: {type(exc).__name__}: {exc}"
        return TaskResult(task.id, task.task, entry["id"], ok, text, start, time.perf_counter(), reason)

    def execute(self, tasks: Sequence[Task], request: str = "") -> dict[int, TaskResult]:
        """Runs the plan: each task once its dependencies succeeded, independent ones concurrently."""
        topological_order(tasks)
        by_id = {t.id: t for t in tasks}
        chosen = {t.id: self.select(t, request) for t in tasks}
        results: dict[int, TaskResult] = {}
        running: dict = {}
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="hugginggpt") as pool:
            while len(results) < len(tasks):
                for t in tasks:
                    if t.id in results or t.id in running.values() or not set(t.dep) <= set(results):
                        continue
                    failed = [d for d in t.dep if not results[d].ok]
                    if failed:
                        results[t.id] = TaskResult(t.id, t.task, None, False, f"skipped: task(s) {failed} failed")
                        continue
                    outputs = {d: results[d].output for d in t.dep}
                    entry, reason = chosen[t.id]
                    running[pool.submit(self._run_task, t, entry, outputs, reason)] = t.id
                if not running:
                    continue
                done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in done:
                    results[by_id[running.pop(fut)].id] = fut.result()
        return results

    # -------------------------------------------------------------------------- stage 4
    def respond(self, request: str, tasks: Sequence[Task], results: Mapping[int, TaskResult]) -> str:
        report = [{"task": asdict(t), "model": results[t.id].model, "why": results[t.id].reason,
                   "ok": results[t.id].ok, "output": results[t.id].output,
                   "seconds": round(results[t.id].seconds, 3)} for t in tasks]
        return _ask(self.llm, [{"role": "user", "content": (
            f"Request: {request}\nThe tasks run for it, the models chosen and their results:\n"
            f"{json.dumps(report, ensure_ascii=False, indent=1)}\n"
            "Answer the request from these results; say which models were used, and report failures.")}])

    def run(self, request: str) -> dict:
        """All four stages; returns ``{"plan", "results", "answer"}``."""
        tasks = self.plan(request)
        results = self.execute(tasks, request)
        return {"plan": tasks, "results": results, "answer": self.respond(request, tasks, results)}
