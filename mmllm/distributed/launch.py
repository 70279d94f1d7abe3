"""Launch helpers: one Hydra run directory per run (not per rank) under torchrun and SLURM.

Hydra names a run directory after ``${now:...}`` (conf/hydra/default.yaml). When Lightning spawns
the ranks itself (``devices=N`` on one node), it passes rank 0's directory to its children. Under
``torchrun`` or ``srun`` every rank starts Hydra on its own, so ranks that start in different
seconds would each create a directory (and rank > 0 would not find ``ckpt_path=last``).

:func:`rank_overrides` returns Hydra overrides, added by ``mmllm.train.main`` before Hydra parses
the command line, that make all ranks agree without communicating:

* the run directory is ``${paths.log_dir}/${task_name}/runs/<run id>`` where the run id is
  ``$MMLLM_RUN_ID`` if set, else ``slurm-<job>[-<step>]`` under srun, else
  ``torchrun-<rendezvous id>`` under torchrun (``--standalone`` draws a fresh uuid; multi-node
  jobs pass ``--rdzv-id``); an explicit ``hydra.run.dir=`` on the command line always wins;
* ranks > 0 write no ``.hydra/`` config copy and log to ``<task>_rank<r>.log`` (rank 0 writes
  the config and ``train.log``), as Lightning does for the processes it spawns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

RUN_DIR = "${paths.log_dir}/${task_name}/runs/"


def external_rank(env: Mapping[str, str] = os.environ) -> int | None:
    """Global rank given by an external launcher (torchrun: RANK, srun: SLURM_PROCID), else None.

    Processes spawned by Lightning itself (LOCAL_RANK only) return None: Lightning already hands
    them rank 0's run directory.
    """
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    return None


def run_id(env: Mapping[str, str] = os.environ) -> str | None:
    """A run id shared by all ranks of one launch, or None (see the module docstring).

    Args:
        env: the environment (``os.environ``).

    Returns:
        ``MMLLM_RUN_ID``, ``slurm-<job>[-<step>]``, ``torchrun-<rdzv id>`` or None.
    """
    if env.get("MMLLM_RUN_ID"):
        return env["MMLLM_RUN_ID"]
    if "SLURM_JOB_ID" in env and external_rank(env) is not None:
        step = env.get("SLURM_STEP_ID")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f"-{step}" if step else "")
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none" and external_rank(env) is not None:
        return f"torchrun-{rdzv}"
    return None


def _given(argv: Sequence[str], key: str) -> bool:
    return any(a.lstrip("+~").startswith(key + "=") for a in argv)


def rank_overrides(argv: Sequence[str], env: Mapping[str, str] = os.environ) -> list[str]:
    """Hydra overrides that give all ranks of one launch the same run directory.

    Args:
        argv: the command-line overrides already given (``sys.argv[1:]``).
        env: the environment.

    Returns:
        Overrides to append (empty for a plain single-process run).
    """
    out = []
    rid = run_id(env)
    rank = external_rank(env)
    if rid is not None and not _given(argv, "hydra.run.dir"):
        out.append(f"hydra.run.dir='{RUN_DIR}{rid}'")
    elif rank == 0 and not _given(argv, "hydra.run.dir"):
        log.warning("launched by torchrun/srun without a shared run id: ranks may create "
                    "separate run directories; set MMLLM_RUN_ID or torchrun --rdzv-id")
    if rank:
        if not _given(argv, "hydra.output_subdir"):
            out.append("hydra.output_subdir=null")
        if not _given(argv, "hydra.job.name"):
            out.append(f"hydra.job.name=train_rank{rank}")
    return out
