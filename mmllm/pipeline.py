"""``mmllm pipeline``: the stages of ``conf/pipeline.yaml`` (``pipeline.stages``), in order.

The default pipeline is the kit end to end at tiny scale: curate -> tokenize -> pretrain ->
export -> evaluate -> samples -> summary (``summary.json``, ``summary.md``). Every stage reads
what earlier ones wrote to the run directory and leaves a marker, ``<run>/stages/<name>/DONE.json``,
so a rerun of the same directory skips what is done (see :mod:`mmllm.stages`)::

    mmllm pipeline                                   # a new run directory
    mmllm pipeline run_dir=<run>                     # continue it (or hydra.run.dir=<run>)
    mmllm pipeline run_dir=<run> stages=[evaluate]   # one stage, from the outputs in <run>
    mmllm pipeline run_dir=<run> force=[samples]     # rerun a stage that is up to date
    mmllm pipeline pipeline.stages.curate=null       # without a stage (here: raw text, no curation)
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from mmllm.config import CONF_DIR
from mmllm.stages import StageStatus, build_stages, run_stages


def run_pipeline(cfg: DictConfig) -> list[StageStatus]:
    """Runs (or continues) the pipeline of ``cfg`` in ``cfg.paths.output_dir``.

    Returns:
        One status per stage ("ran", "skipped", ...).

    Raises:
        mmllm.stages.StageError: a stage failed (its name, error and last printed lines), or a
            selected stage needs a stage that has not finished.
    """
    run_dir = Path(cfg.paths.output_dir)
    stages = build_stages(cfg.pipeline.stages)
    select = cfg.get("stages")
    statuses = run_stages(stages, cfg, run_dir, select=None if select is None else list(select),
                          force=list(cfg.get("force") or []))
    counts = {s: sum(x.status == s for x in statuses) for s in ("ran", "skipped", "outdated")}
    print(f"[pipeline] {run_dir}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n), flush=True)
    return statuses


@hydra.main(config_path=CONF_DIR, config_name="pipeline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from mmllm.cli import restore_command_line

    restore_command_line()  # a multi-device pretrain stage reruns this command for ranks 1..
    OmegaConf.set_struct(cfg, True)
    with open_dict(cfg):  # run_dir= and hydra.run.dir= both choose the run; record the one in use
        cfg.run_dir = str(cfg.paths.output_dir)
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
