"""Runs the stages of a pipeline in order, skipping the finished ones (see :mod:`mmllm.stages.base`).

    stages = build_stages(cfg.pipeline.stages)          # {name: _target_ node}, in order
    run_stages(stages, cfg, run_dir, select=["pretrain"])

A stage is *up to date* when its marker's fingerprint matches the current one and its outputs
exist; it is then skipped. Otherwise it reruns when selected (all stages by default). A selected
stage whose inputs are not up to date is refused with an error naming the missing stage; a stage
that fails raises :class:`StageError` naming it, writes no marker and stops the run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from mmllm.errors import UserError, translate
from mmllm.stages.base import (
    ATTEMPT,
    MARKER,
    Marker,
    Stage,
    StageContext,
    apply_config_updates,
    config_diff,
    fingerprint,
    new_run_id,
    now_iso,
    run_relative,
    stage_dir,
)
from mmllm.stages.capture import CapturedOutput


class StageError(UserError, RuntimeError):
    """A stage failed, or cannot run because an input stage has not finished.

    A :class:`~mmllm.errors.UserError`, so ``mmllm pipeline`` ends with its message (which names
    the stage) and its fix, not with the cause's bare traceback.

    Attributes:
        stage: the stage's name.
        log: its log file (None when it did not start).
        tail: the last lines it printed.
    """

    def __init__(self, stage: str, message: str, *, log: Path | None = None, tail: Sequence[str] = (),
                 fix: str | None = None):
        super().__init__(message, fix=fix)
        self.stage, self.log, self.tail = stage, log, list(tail)

    def __reduce__(self):  # picklable (e.g. across processes) despite the keyword arguments
        return (_stage_error, (self.stage, self.message, self.log, self.tail, self.fix))


def _stage_error(stage: str, message: str, log: Path | None, tail: list[str],
                 fix: str | None = None) -> StageError:
    return StageError(stage, message, log=log, tail=tail, fix=fix)


@dataclasses.dataclass
class PlannedStage:
    """A stage of the pipeline with what the runner knows about it."""

    name: str
    stage: Stage
    node: dict  # the resolved config node (target and options): part of the fingerprint
    deps: list[str]  # the stages it reads, resolved against the pipeline


@dataclasses.dataclass
class StageStatus:
    """What happened to one stage in this invocation.

    ``status`` is "ran", "skipped" (up to date) or "outdated" (not selected and not up to date);
    a failed stage raises :class:`StageError` instead (its progress line says "failed").
    """

    name: str
    status: str
    seconds: float | None = None
    reason: str = ""


def build_stages(nodes: DictConfig | dict) -> list[PlannedStage]:
    """Instantiates the ``{name: _target_ node}`` mapping of ``pipeline.stages``, keeping its order.

    A node set to null removes that stage (``pipeline.stages.curate=null``). Raises ValueError when
    a stage reads a stage that is not listed before it.
    """
    planned: list[PlannedStage] = []
    for name, node in (nodes or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ValueError(f"pipeline stage {name!r} has no _target_ (the Stage class to run)")
        stage = instantiate(node, _convert_="all")
        if not isinstance(stage, Stage):
            raise TypeError(f"pipeline stage {name!r}: {node['_target_']} is not a mmllm.stages.Stage")
        stage.name = name
        container = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        planned.append(PlannedStage(name, stage, container, _deps(stage, name, [p.name for p in planned],
                                                                  list(nodes))))
    return planned


def _deps(stage: Stage, name: str, earlier: list[str], everything: list[str]) -> list[str]:
    deps = []
    for dep in stage.inputs:
        if dep not in earlier:
            where = "listed after it" if dep in everything else "not in pipeline.stages"
            raise ValueError(f"pipeline stage {name!r} reads stage {dep!r}, which is {where}: "
                             f"the stages are {everything}")
        deps.append(dep)
    for dep in stage.optional_inputs:  # read when the pipeline has them; "*": every earlier stage
        deps += [e for e in (earlier if dep == "*" else [dep]) if e in earlier and e not in deps]
    return deps


def _section(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=None)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def stage_config(p: PlannedStage, cfg: DictConfig, done: dict[str, Marker]) -> dict:
    """What the fingerprint of ``p`` covers: its node, its config sections, its inputs' run ids."""
    sections = {k: _section(cfg, k) for k in p.stage.config_keys}
    for key in p.stage.config_ignore:  # "data.batch_size": drop sections["data"]["batch_size"]
        *parents, leaf = key.split(".")
        node = sections
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return {"stage": p.node, "config": sections, "inputs": {d: done[d].run_id for d in p.deps}}


def _outdated(p: PlannedStage, marker: Marker | None, config: dict, run_dir: Path) -> str:
    """Why ``p`` is not up to date ("" when it is)."""
    if marker is None:
        unfinished = (stage_dir(run_dir, p.name) / ATTEMPT).exists()
        return "an earlier attempt did not finish" if unfinished else "not run yet"
    if marker.fingerprint != fingerprint(config):
        changed = config_diff(marker.config, config)
        inputs = sorted({k.split(".")[1] for k in changed if k.startswith("inputs.")})
        keys = [k for k in changed if not k.startswith("inputs.")]
        parts = ([f"input {', '.join(inputs)} reran"] if inputs else []) + \
                ([f"changed {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"] if keys else [])
        return "; ".join(parts) or "fingerprint changed"
    missing = [str(v) for v in marker.output_paths(run_dir).values() if not Path(v).exists()]
    return f"output missing: {missing[0]}" if missing else ""


def _progress(i: int, n: int, s: StageStatus) -> None:
    secs = f"{s.seconds:.1f} s" if s.seconds is not None else "-"
    note = f" ({s.reason})" if s.reason else ""
    print(f"[pipeline] stage {i}/{n} {s.name}: {s.status} {secs}{note}", flush=True)


def follower_rank() -> int:
    """This process's global rank when it is not rank 0 of a multi-process job, else 0.

    Lightning's launcher starts ranks 1.. by rerunning the command line (``LOCAL_RANK``, and
    ``NODE_RANK`` on further nodes); torchrun and SLURM start every rank at once (``RANK``,
    ``SLURM_PROCID``). A follower runs only the distributed stages (:attr:`Stage.distributed`).
    """
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 0:
            return int(os.environ[var])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    if local.isdigit() and node.isdigit() and (int(local) or int(node)):
        return int(node) * 1_000 + int(local)  # only its being > 0 matters
    return 0


def _finished(stages: list[PlannedStage], cfg: DictConfig, run_dir: Path) -> tuple[dict, DictConfig]:
    """The stages whose markers are up to date (as rank 0 judges them) and the config after them."""
    cfg, done = copy.deepcopy(cfg), {}
    for q in stages:
        marker = Marker.read(run_dir, q.name)
        if marker is None or any(d not in done for d in q.deps):
            continue
        if not _outdated(q, marker, stage_config(q, cfg, done), run_dir):
            done[q.name] = marker
            apply_config_updates(cfg, marker.config_updates)
    return done, cfg


def _follow(stages: list[PlannedStage], cfg: DictConfig, run_dir: Path, selected: set[str],
            poll_s: float = 5.0) -> list[StageStatus]:
    """A follower rank: waits until rank 0 has finished each distributed stage's inputs (up-to-date
    markers), joins that stage's run (rank 0 alone writes its marker and log), and leaves every
    other stage to rank 0."""
    wait_s = float(os.environ.get("MMLLM_PIPELINE_FOLLOWER_WAIT_S", 7 * 24 * 3600))
    last = max((i for i, p in enumerate(stages) if p.stage.distributed and p.name in selected), default=-1)
    statuses = []
    for i, p in enumerate(stages[:last + 1]):
        if not (p.stage.distributed and p.name in selected):
            statuses.append(StageStatus(p.name, "rank 0", None, "run by rank 0"))
            continue
        deadline = time.monotonic() + wait_s
        while True:
            done, run_cfg = _finished(stages[:i], cfg, run_dir)
            if all(d in done for d in p.deps):
                break
            if time.monotonic() > deadline:
                raise StageError(p.name, f"rank {follower_rank()} waited {wait_s:.0f} s for the inputs "
                                         f"{p.deps} of {p.name!r} from rank 0",
                                 fix="check rank 0's log; MMLLM_PIPELINE_FOLLOWER_WAIT_S sets the wait")
            time.sleep(poll_s)
        _seed(run_cfg)
        t0 = time.perf_counter()
        p.stage.run(StageContext(name=p.name, run_dir=run_dir, cfg=run_cfg,
                                 markers={d: done[d] for d in p.deps}))
        statuses.append(StageStatus(p.name, "ran", round(time.perf_counter() - t0, 2), "follower rank"))
    return statuses


def run_stages(stages: list[PlannedStage], cfg: DictConfig, run_dir: str | Path, *,
               select: Sequence[str] | None = None, force: Sequence[str] = ()) -> list[StageStatus]:
    """Runs the pipeline in ``run_dir``; returns one status per stage.

    Args:
        stages: from :func:`build_stages`.
        cfg: the full config (not modified: stages see a copy with earlier stages' updates).
        run_dir: the run directory (markers in ``<run_dir>/stages/<name>/DONE.json``).
        select: run only these stages (None: all); the others are used when up to date.
        force: rerun these stages even when up to date.

    Raises:
        StageError: a stage failed, or a selected stage's input has not finished.
    """
    run_dir = Path(run_dir)
    names = [p.name for p in stages]
    for key, given in (("stages", select or []), ("force", force)):
        unknown = [s for s in given if s not in names]
        if unknown:
            raise ValueError(f"{key}={list(given)}: unknown stage(s) {unknown}; the stages are {names}")
    selected = set(names if select is None else select) | set(force)
    if follower_rank():
        return _follow(stages, cfg, run_dir, selected)
    cfg = copy.deepcopy(cfg)
    done: dict[str, Marker] = {}
    outdated: dict[str, tuple[str, str | None]] = {}  # name -> (why, the input that is why)
    statuses: list[StageStatus] = []
    for i, p in enumerate(stages):
        missing = [d for d in p.deps if d not in done]
        if missing and p.name in selected:
            raise _missing_input(p.name, missing[0], outdated, names, run_dir)
        marker = Marker.read(run_dir, p.name)
        config = None if missing else stage_config(p, cfg, done)
        reason = f"input {missing[0]} is not up to date" if missing else _outdated(p, marker, config, run_dir)
        if p.name in force and not reason:
            reason = "forced"
        if not reason:
            done[p.name] = marker
            apply_config_updates(cfg, marker.config_updates)
            status = StageStatus(p.name, "skipped", 0.0,
                                 f"up to date: ran {marker.seconds:.1f} s at {marker.finished_at}")
        elif p.name not in selected:
            outdated[p.name] = (reason, missing[0] if missing else None)
            status = StageStatus(p.name, "outdated", None, reason)
        else:
            try:
                done[p.name] = _execute(p, cfg, run_dir, config, done, reason, forced=p.name in force)
            except StageError:
                _progress(i + 1, len(stages), StageStatus(p.name, "failed", None, reason))
                raise
            status = StageStatus(p.name, "ran", done[p.name].seconds, reason)
        statuses.append(status)
        _progress(i + 1, len(stages), status)
    return statuses


def _missing_input(name: str, dep: str, outdated: dict, names: list[str], run_dir: Path) -> StageError:
    """The error for a selected stage whose input ``dep`` is not up to date (names the stage to run)."""
    chain = [dep]
    while chain[-1] in outdated and outdated[chain[-1]][1]:  # follow "input X is not up to date"
        chain.append(outdated[chain[-1]][1])
    root = chain[-1]
    why = outdated.get(root, ("not run yet", None))[0]
    unfinished = why in ("not run yet", "an earlier attempt did not finish")
    state = (f"has not finished (no {stage_dir(run_dir, root) / MARKER})" if unfinished
             else f"is out of date ({why})")
    via = f" (through {' <- '.join(chain[:-1])})" if len(chain) > 1 else ""
    todo = [n for n in names[names.index(root):names.index(name) + 1] if n in outdated or n == name]
    return StageError(name, f"stage {name!r} needs the outputs of stage {root!r}{via}, which {state}: "
                            f"run it first, e.g. `mmllm pipeline stages=[{','.join(todo)}] "
                            f"hydra.run.dir={run_dir}`")


def _seed(cfg: DictConfig) -> None:
    # Each stage starts from the same RNG state, so running it alone gives what the full run gives.
    if cfg.get("seed") is not None:
        import lightning as L

        L.seed_everything(int(cfg.seed), workers=True, verbose=False)


def _start_attempt(run_dir: Path, name: str, fp: str, forced: bool) -> bool:
    """Records that ``name`` starts with fingerprint ``fp``; True when an unfinished attempt had it too."""
    path = stage_dir(run_dir, name) / ATTEMPT
    try:
        previous = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
    except (FileNotFoundError, json.JSONDecodeError, AttributeError):
        previous = None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fingerprint": fp, "started_at": now_iso()}))
    return previous == fp and not forced  # force=[...] starts over


def _execute(p: PlannedStage, cfg: DictConfig, run_dir: Path, config: dict, done: dict[str, Marker],
             reason: str, *, forced: bool = False) -> Marker:
    """Runs one stage; writes its marker last. Raises StageError when it fails."""
    ctx = StageContext(name=p.name, run_dir=run_dir, cfg=cfg, markers={d: done[d] for d in p.deps})
    (ctx.dir / MARKER).unlink(missing_ok=True)  # from here on the stage is unfinished
    fp = fingerprint(config)
    ctx.resuming = _start_attempt(run_dir, p.name, fp, forced)
    if ctx.resuming:
        reason += "; resuming an unfinished attempt"
    log = ctx.dir / "log.txt"
    started, t0 = now_iso(), time.perf_counter()
    header = f"=== [{p.name}] === ({reason})"
    print(f"\n{header}", flush=True)
    out = CapturedOutput(log, header=f"{header} {started}")
    try:
        with out:
            p.stage.clean(ctx)
            _seed(cfg)
            p.stage.run(ctx)
            outputs = p.stage.outputs(ctx)
            absent = {k: str(v) for k, v in outputs.items() if not Path(v).exists()}
            if absent:
                raise FileNotFoundError(f"the stage finished without writing its outputs {absent}")
    except Exception as e:
        # The last 3 lines only: the message must stay a few lines (the log has everything).
        tail = "\n".join(f"  | {line}" for line in out.tail[-3:]) if out.tail else "  (nothing printed)"
        cause = translate(e)  # a known cause (a config value, a missing package) has its own fix
        resume = f"rerun with hydra.run.dir={run_dir} to resume from {p.name!r} (earlier stages are kept)"
        raise StageError(p.name, f"stage {p.name!r} failed: "
                                 f"{cause.message if cause else f'{type(e).__name__}: {e}'}\n"
                                 f"last lines printed (full log: {log}):\n{tail}",
                         log=log, tail=out.tail,
                         fix=f"{cause.fix}; then {resume}" if cause and cause.fix else resume) from e
    marker = Marker(stage=p.name, target=p.node["_target_"], fingerprint=fp,
                    run_id=new_run_id(), started_at=started, finished_at=now_iso(),
                    seconds=round(time.perf_counter() - t0, 2),
                    outputs={k: run_relative(run_dir, v) for k, v in outputs.items()},
                    record=ctx.record, config_updates=ctx.config_updates, config=config)
    marker.write(run_dir)
    (ctx.dir / ATTEMPT).unlink(missing_ok=True)
    return marker
