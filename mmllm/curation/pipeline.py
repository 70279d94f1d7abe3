"""``run_curation``: the curation run end to end.

1. **Pass 1** (a NeMo Curator ``Pipeline`` on Ray, or in-process): read -> URL filter ->
   extract -> language ID -> Gopher repetition -> Gopher quality -> [C4] -> RefinedWeb lines ->
   dedup signatures -> stage-1 Parquet shards + statistics sidecars in ``<output>/_work/stage1``.
   Inputs whose shards are complete are skipped, so a rerun resumes where a crash stopped.
2. **Global dedup steps** between passes, on the survivors: URL -> exact -> MinHash -> substring.
3. **Output**: JSONL or Parquet shards in ``<output>/data`` and ``report.{json,png,md}``, all
   written atomically. A rerun with the same shards and settings reuses the finished output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs
from hydra.utils import instantiate
from nemo_curator.backends.base import BaseExecutor
from nemo_curator.pipeline import Pipeline
from nemo_curator.stages.base import ProcessingStage
from nemo_curator.tasks import FileGroupTask
from omegaconf import DictConfig, OmegaConf

from mmllm.config import CONF_DIR as _CONF_DIR
from mmllm.curation.base import STATS_KEY, merge_stats_lists
from mmllm.curation.corpus import Stage1Corpus, run_global_steps
from mmllm.curation.dedup_common import GlobalDedupStep
from mmllm.curation.dedup_url import default_dump_id
from mmllm.curation.executors import make_executor, needs_dashboard, ray_session, uses_ray
from mmllm.curation.readers import (
    CurationReaderStage,
    MissingTextColumnError,
    input_format,
    shard_key,
)
from mmllm.curation.report import build_report, write_report
from mmllm.curation.writer import (
    ShardWriterStage,
    atomic_write_bytes,
    finished_inputs,
    read_sidecars,
)
from mmllm.errors import ConfigError, MissingFileError

CONF_DIR = Path(_CONF_DIR)
log = logging.getLogger(__name__)


@dataclass
class CurationResult:
    """What a curation run produced.

    Args:
        output_dir: The output directory.
        shards: Output shard paths (JSONL or Parquet; field ``text`` plus metadata).
        report: The report dict (also in ``report.json``).
        report_paths: ``{"json", "png", "md"}`` paths.
        reused: True when a finished previous run was reused unchanged.
    """

    output_dir: str
    shards: list[str]
    report: dict[str, Any]
    report_paths: dict[str, str] = field(default_factory=dict)
    reused: bool = False

    @property
    def num_documents(self) -> int:
        """Documents in the output."""
        return int(self.report["output"]["documents"])


def load_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/curate.yaml`` with Hydra overrides, without touching Hydra's global state
    (so it also works inside another ``@hydra.main`` application)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        # Inside another Hydra app of the kit: its search path is the same config directory.
        cfg = compose(config_name="curate", overrides=list(overrides))
    else:
        # initialize_config_dir restores the (uninitialised) global state on exit.
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="curate", overrides=list(overrides))
    with_hydra = OmegaConf.to_container(cfg, resolve=False)
    with_hydra.pop("hydra", None)
    return OmegaConf.create(with_hydra)


def build_components(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate the stages, dedup steps and executor of a composed config.

    Returns:
        ``{"stages": [...], "dedup": [...], "executor": BaseExecutor}`` (``null`` entries of
        ``stages``/``dedup`` are disabled and left out).
    """
    stages = [instantiate(node) for node in cfg.stages.values() if node is not None]
    dedup = [instantiate(node) for node in cfg.dedup.values() if node is not None]
    return {"stages": stages, "dedup": dedup, "executor": instantiate(cfg.executor)}


def resolve_inputs(inputs: str | Sequence[str], storage_options: dict | None = None) -> list[str]:
    """Expand paths, globs and directories (fsspec) into a sorted list of input files.

    Raises:
        FileNotFoundError: When nothing matches.
        ValueError: For a file of unknown format.
    """
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    files: list[str] = []
    for item in map(str, items):
        fs, p = url_to_fs(item, **(storage_options or {}))
        if any(c in p for c in "*?["):
            found = fs.glob(p)
        elif fs.isdir(p):
            found = [f for f in fs.find(p) if _known(f)]
        else:
            found = [p] if fs.exists(p) else []
        if not found:
            msg = f"No input files match {item!r}"
            raise MissingFileError(msg, fix="pass existing WARC/WET/JSONL/Parquet files, a glob or a "
                                            "directory (relative paths start at the working directory)")
        files += [fs.unstrip_protocol(f) if "://" in item else f for f in found]
    for f in files:
        input_format(f)  # fail now, not in a worker, on an unsupported file
    return sorted(dict.fromkeys(files))


def _known(path: str) -> bool:
    try:
        input_format(path)
    except ValueError:
        return False
    return True


def _first_pass(files: list[str], stages: list[ProcessingStage], dedup: list[GlobalDedupStep],
                stage1: str, executor: BaseExecutor, ray_kwargs: dict[str, Any],
                storage_options: dict) -> list[str]:
    """Run the pipeline over the inputs without finished stage-1 shards; return those inputs."""
    todo = [f for f in files if f not in finished_inputs(read_sidecars(stage1, storage_options))]
    if not todo:
        return []
    fs, p = url_to_fs(stage1, **storage_options)
    for f in todo:  # drop chunks of an interrupted earlier attempt
        for stale in fs.glob(f"{p}/{shard_key(f)}-*"):
            fs.rm(stale)
    signature_stages = [s for d in dedup if (s := d.signature_stage()) is not None]
    # The reader's planning stage cuts each input into slices of records_per_batch records.
    pipeline = Pipeline(name="mmllm_curation", stages=[
        stages[0].split_stage(), *stages, *signature_stages,
        ShardWriterStage(path=stage1, storage_options=storage_options)])
    tasks = [FileGroupTask(dataset_name="curation", data=[f], _metadata={"source_files": [f]})
             for f in todo]
    ray_kwargs = {**ray_kwargs, "dashboard": needs_dashboard(executor)}
    with ray_session(**ray_kwargs) if uses_ray(executor) else nullcontext():
        pipeline.run(executor, initial_tasks=tasks)
    return todo


def _check_text_field(sidecars: list[dict], reader: CurationReaderStage, stage1: str,
                      storage_options: dict) -> None:
    """Raise when every record read lacks the text field: a configuration error, not bad data.

    The stage-1 shards of such a run are removed, so a rerun with the right field reads again.
    """
    [read] = merge_stats_lists([[r for r in sc[STATS_KEY] if r["stage"] == reader.name]
                                for sc in sidecars]) or [None]
    missing = (read or {}).get("dropped", {}).get("missing_text_field", {}).get("docs", 0)
    if not read or not read["docs_in"] or missing < read["docs_in"]:
        return
    fs, p = url_to_fs(stage1, **storage_options)
    fs.rm(p, recursive=True)
    msg = (f"No input record has the text field {reader.text_field!r} "
           f"({missing} record(s) read); set stages.read.text_field")
    raise MissingTextColumnError(msg)


def _fingerprint(sidecars: list[dict], dedup: list, output_format: str) -> str:
    blob = json.dumps({"shards": [(s["shard"], s["num_docs"]) for s in sidecars],
                       "dedup": [repr(d) for d in dedup], "format": output_format})
    return hashlib.sha1(blob.encode()).hexdigest()


def _reuse(out: str, fingerprint: str, storage_options: dict) -> CurationResult | None:
    fs, p = url_to_fs(out, **storage_options)
    try:
        with fs.open(f"{p}/_work/state.json", "rt") as fh:
            state = json.load(fh)
        with fs.open(f"{p}/report.json", "rt") as fh:
            report = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shards = state.get("shards", [])
    if state.get("fingerprint") != fingerprint or not all(fs.exists(s) for s in shards):
        return None
    paths = {k: f"{out.rstrip('/')}/report.{k}" for k in ("json", "png", "md")}
    return CurationResult(output_dir=out, shards=shards, report=report, report_paths=paths,
                          reused=True)


def run_curation(inputs: str | Sequence[str], output_dir: str | Path, *,
                 stages: Sequence[ProcessingStage] | None = None,
                 dedup: Sequence[GlobalDedupStep] | None = None,
                 executor: BaseExecutor | str | None = None, output_format: str = "jsonl",
                 ray_address: str | None = None, num_cpus: int | None = None,
                 ray_temp_dir: str | None = None, overrides: Sequence[str] = (), storage_options: dict | None = None,
                 max_examples: int = 3) -> CurationResult:
    """Curate web data: WARC/WET/JSONL/Parquet in, filtered + deduplicated shards and a report out.

    Args:
        inputs: Path, glob, directory or list of them (local or fsspec).
        output_dir: Output directory (shards in ``data/``, report files at the top).
        stages: Pass-1 stages (first a :class:`CurationReaderStage`); default from
            ``conf/curate.yaml`` (+ ``overrides``).
        dedup: Global dedup steps; default from the config.
        executor: A NeMo Curator executor or ``"ray_data"``/``"xenna"``/``"local"``; default
            from the config.
        output_format: ``"jsonl"`` or ``"parquet"``.
        ray_address: Ray cluster to join (else ``RAY_ADDRESS``, else a private local instance).
        num_cpus: CPUs of the private local Ray instance.
        ray_temp_dir: Parent of the private instance's temp dir (default ``RAY_TMPDIR``/``/tmp``).
        overrides: Hydra overrides of ``conf/curate.yaml`` for the defaults above.
        storage_options: fsspec options for inputs and outputs.
        max_examples: Examples of removed text kept per reason.

    Returns:
        The :class:`CurationResult`.
    """
    t0 = time.perf_counter()
    if output_format not in ("jsonl", "parquet"):
        msg = f"output_format must be 'jsonl' or 'parquet', got {output_format!r}"
        raise ConfigError(msg, fix="output_format=jsonl or output_format=parquet")
    if stages is None or dedup is None or executor is None:
        parts = build_components(load_config(overrides))
        stages = parts["stages"] if stages is None else stages
        dedup = parts["dedup"] if dedup is None else dedup
        executor = parts["executor"] if executor is None else executor
    executor = make_executor(executor) if isinstance(executor, str) else executor
    stages, dedup, so = list(stages), list(dedup), dict(storage_options or {})
    if not stages or not isinstance(stages[0], CurationReaderStage):
        stages.insert(0, CurationReaderStage(storage_options=so))
    out = str(output_dir).rstrip("/")
    files = resolve_inputs(inputs, so)
    stage1 = f"{out}/_work/stage1"
    ray_kwargs = {"address": ray_address, "num_cpus": num_cpus, "temp_dir": ray_temp_dir}
    processed = _first_pass(files, stages, dedup, stage1, executor, ray_kwargs, so)
    t1 = time.perf_counter()
    done = finished_inputs(read_sidecars(stage1, so))
    missing = [f for f in files if f not in done]
    if missing:
        msg = f"The pipeline pass did not finish {len(missing)} input(s), e.g. {missing[:3]}"
        raise RuntimeError(msg)
    sidecars = [sc for f in files for sc in done[f]]
    _check_text_field(sidecars, stages[0], stage1, so)
    fingerprint = _fingerprint(sidecars, dedup, output_format)
    if not processed and (reused := _reuse(out, fingerprint, so)) is not None:
        log.info("Reusing the finished curation in %s", out)
        return reused
    return _finish(files, out, sidecars, dedup, output_format, fingerprint, so, max_examples,
                   {"pass1": t1 - t0, "start": t0, "ray_address": ray_address, "num_cpus": num_cpus})


def _finish(files: list[str], out: str, sidecars: list[dict], dedup: list, output_format: str,
            fingerprint: str, so: dict, max_examples: int, timing: dict) -> CurationResult:
    """Global dedup steps, output shards, report and run state."""
    fs, p = url_to_fs(out, **so)
    if fs.exists(f"{p}/_work/state.json"):
        fs.rm(f"{p}/_work/state.json")  # the output is about to change
    corpus = Stage1Corpus([(f"{out}/_work/stage1/{s['shard']}.parquet", s["num_docs"])
                           for s in sidecars], so)
    context = {"work_dir": f"{out}/_work", "dump_id": default_dump_id(files),
               "stage1_files": corpus.paths, "ray_address": timing["ray_address"],
               "num_cpus": timing["num_cpus"]}
    t1 = time.perf_counter()
    dedup_records = run_global_steps(corpus, dedup, context, max_examples)
    t2 = time.perf_counter()
    shards = corpus.write(f"{out}/data", output_format, [s["shard"] for s in sidecars])
    for stale in set(fs.glob(f"{p}/data/*")) - {url_to_fs(s, **so)[1] for s in shards}:
        fs.rm(stale)  # shards of an earlier run that no longer exist
    t3 = time.perf_counter()
    records = merge_stats_lists([sc[STATS_KEY] for sc in sidecars], max_examples) + dedup_records
    seconds = {"pass1": round(timing["pass1"], 2), "dedup": round(t2 - t1, 2),
               "write": round(t3 - t2, 2), "total": round(t3 - timing["start"], 2)}
    report = build_report(records, inputs=files, shards=shards, seconds=seconds)
    paths = write_report(report, out, so)
    state = {"fingerprint": fingerprint, "shards": shards}
    atomic_write_bytes(f"{out}/_work/state.json", json.dumps(state).encode(), so)
    return CurationResult(output_dir=out, shards=shards, report=report, report_paths=paths)


def run_from_config(cfg: DictConfig) -> CurationResult:
    """Run a composed ``curate`` config (what ``mmllm curate`` does)."""
    parts = build_components(cfg)
    return run_curation(OmegaConf.to_container(cfg.input, resolve=True)
                        if OmegaConf.is_list(cfg.input) else str(cfg.input),
                        str(cfg.output), stages=parts["stages"], dedup=parts["dedup"],
                        executor=parts["executor"], output_format=str(cfg.output_format),
                        ray_address=cfg.ray.address, num_cpus=cfg.ray.num_cpus,
                        ray_temp_dir=cfg.ray.temp_dir,
                        max_examples=int(cfg.max_examples))
