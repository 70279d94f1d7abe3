"""The stage protocol of ``mmllm pipeline``: a stage, its context, its completion marker.

A stage is a small object built from a ``_target_`` node of ``pipeline.stages`` (its options are
the node's keys). It declares

* ``inputs``: the stages whose outputs it reads (they must be listed before it and be finished);
* ``optional_inputs``: stages it reads when the pipeline has them (``"*"``: every earlier stage);
* ``config_keys``: the config sections it reads (``model``, ``data``, ...; ``config_ignore``
  lists keys inside them that do not change its result);
* ``outputs(ctx)``: the paths it writes, by name;
* ``run(ctx)``: the work; what it reports goes into ``ctx.record``.

When a stage finishes, the runner writes ``<run>/stages/<name>/DONE.json`` last and atomically:
its fingerprint (hash of its own options, its config sections and the run ids of its inputs),
timing, outputs and record. A marker whose fingerprint matches means "done, skip"; any rerun of
an input gives it a new run id, so everything downstream of a rerun stage reruns too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

MARKER = "DONE.json"
ATTEMPT = "ATTEMPT.json"  # written when a stage starts, removed when its marker is written


def stage_dir(run_dir: Path, name: str) -> Path:
    """``<run>/stages/<name>``: the stage's marker and log."""
    return Path(run_dir) / "stages" / name


@dataclasses.dataclass
class Marker:
    """The completion record of one stage (``<run>/stages/<name>/DONE.json``).

    Attributes:
        stage: the stage name.
        target: the class that ran (``module.Class``).
        fingerprint: sha256 of ``config`` (see :func:`fingerprint`).
        run_id: unique per execution; downstream fingerprints include it.
        started_at, finished_at: ISO-8601 UTC times.
        seconds: wall time of ``run``.
        outputs: name -> path (relative to the run directory when inside it).
        record: what the stage reported (the summary gathers these).
        config_updates: dotted config keys the stage set for the stages after it.
        config: what the fingerprint was computed from (explains why a stage reruns).
    """

    stage: str
    target: str
    fingerprint: str
    run_id: str
    started_at: str
    finished_at: str
    seconds: float
    outputs: dict[str, str]
    record: dict[str, Any]
    config_updates: dict[str, Any]
    config: dict[str, Any]

    def write(self, run_dir: Path) -> Path:
        """Writes the marker atomically (temporary file, fsync, rename): it exists whole or not at all."""
        path = stage_dir(run_dir, self.stage) / MARKER
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{MARKER}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(self), f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, run_dir: Path, name: str) -> Marker | None:
        """The marker of stage ``name``, or None when absent or unreadable (an unfinished stage)."""
        path = stage_dir(run_dir, name) / MARKER
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def output_paths(self, run_dir: Path) -> dict[str, Path]:
        """``outputs`` as absolute paths."""
        return {k: _absolute(run_dir, v) for k, v in self.outputs.items()}


def _absolute(run_dir: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else Path(run_dir) / path


def run_relative(run_dir: Path, path: str | Path) -> str:
    path, run_dir = Path(path).resolve(), Path(run_dir).resolve()
    return str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return uuid.uuid4().hex


def fingerprint(config: dict) -> str:
    """sha256 of a JSON-serialisable dict (keys sorted, so order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (why a stage reruns)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in config_diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "<root>"]


class Stage:
    """Base class of pipeline stages (subclasses are built from ``pipeline.stages`` nodes).

    Subclasses set the class attributes below, take their options as keyword-only constructor
    arguments, and implement :meth:`run` (and :meth:`outputs` when they write files).
    """

    inputs: tuple[str, ...] = ()
    optional_inputs: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    config_ignore: tuple[str, ...] = ()  # dotted keys inside config_keys that do not matter
    name: str = ""  # set by the runner from the node's key in pipeline.stages
    # True for a stage whose run() is one multi-process job (pretraining on several devices or
    # nodes): every rank runs it; the other stages run on rank 0 only (see runner.follower_rank).
    distributed: bool = False

    def outputs(self, ctx: StageContext) -> dict[str, Path]:
        """The paths this stage writes, by name (checked after ``run``, recorded in the marker)."""
        return {}

    def clean(self, ctx: StageContext) -> None:
        """Removes what an earlier, unfinished or outdated run of this stage left behind.

        Only outputs inside the run directory are removed: a shared cache elsewhere (e.g. a
        ``data.cache_dir`` used by many runs) is never deleted by a pipeline.
        """
        run_dir = ctx.run_dir.resolve()
        for path in self.outputs(ctx).values():
            path = Path(path).resolve()
            if path != run_dir and path.is_relative_to(run_dir):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()

    def run(self, ctx: StageContext) -> None:
        raise NotImplementedError(f"{type(self).__name__}.run")


@dataclasses.dataclass
class StageContext:
    """What a running stage sees.

    Attributes:
        name: this stage's name.
        run_dir: the pipeline's run directory.
        cfg: the full config, with the updates of earlier stages applied (read-only by convention:
            use :meth:`update_config` for values later stages must see).
        markers: the markers of this stage's finished inputs, by name.
        record: what this stage reports (JSON-serialisable; gathered by the summary stage).
        config_updates: the updates this stage made (recorded in its marker).
        resuming: an earlier attempt of this stage with the same fingerprint did not finish; the
            stage may continue from what it left behind (pretraining: its last checkpoint).
    """

    name: str
    run_dir: Path
    cfg: DictConfig
    markers: dict[str, Marker]
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    config_updates: dict[str, Any] = dataclasses.field(default_factory=dict)
    resuming: bool = False

    @property
    def dir(self) -> Path:
        """``<run>/stages/<name>``."""
        return stage_dir(self.run_dir, self.name)

    def output(self, stage: str, key: str) -> Path:
        """The path an input stage recorded as its output ``key``."""
        if stage not in self.markers:
            raise KeyError(f"stage {self.name!r} reads {stage!r}, which is not among its finished "
                           f"inputs ({sorted(self.markers)}): add it to {type(self).__name__}.inputs")
        outputs = self.markers[stage].output_paths(self.run_dir)
        if key not in outputs:
            raise KeyError(f"stage {stage!r} recorded no output {key!r} (it has {sorted(outputs)})")
        return outputs[key]

    def has(self, stage: str) -> bool:
        """Whether ``stage`` is a finished input of this stage (an optional input may be absent)."""
        return stage in self.markers

    def update_config(self, key: str, value: Any) -> None:
        """Sets dotted ``key`` of the config for the stages after this one (also on later reruns)."""
        self.config_updates[key] = value
        apply_config_updates(self.cfg, {key: value})


def apply_config_updates(cfg: DictConfig, updates: dict[str, Any]) -> None:
    """Applies ``{dotted key: value}`` to ``cfg`` (struct mode is lifted for these keys only)."""
    with open_dict(cfg):
        for key, value in updates.items():
            OmegaConf.update(cfg, key, value, merge=False)
