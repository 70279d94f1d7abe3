"""Stage-based pipelines: ``mmllm pipeline`` runs the stages listed in ``pipeline.stages``.

A stage (:class:`Stage`) names the stages it reads, the paths it writes and does its work in
``run(ctx)``; the runner (:func:`run_stages`) skips stages whose completion marker
(``<run>/stages/<name>/DONE.json``) is up to date, reruns those whose config or inputs changed
(and everything downstream of them), and names the stage that failed. Adding a stage to the
pipeline is a class and one entry in ``conf/pipeline.yaml``.
"""

from mmllm.stages.base import Marker, Stage, StageContext, config_diff, fingerprint, stage_dir
from mmllm.stages.runner import PlannedStage, StageError, StageStatus, build_stages, run_stages

__all__ = ["Marker", "PlannedStage", "Stage", "StageContext", "StageError", "StageStatus",
           "build_stages", "config_diff", "fingerprint", "run_stages", "stage_dir"]
