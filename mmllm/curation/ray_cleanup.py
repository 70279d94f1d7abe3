"""Clean up after a private Ray instance whose driver died without stopping it (SIGKILL, OOM).

Ray shares fate with its driver only partly: when the driver is killed, the GCS and raylet die
with it but the dashboard and runtime-env agents (re-parented to init, renamed ``ray::...`` so their
command line no longer names the session) live on, and the session's temp dir stays on disk.

So every private instance started by :func:`mmllm.curation.executors.ray_session`:

* writes ``owner.json`` (driver pid + its start time, so a recycled pid is not mistaken for the
  owner) into its temp dir, and
* starts Ray with ``MMLLM_RAY_SESSION=<temp dir>`` in the environment, which every Ray process of
  that instance inherits (GCS, raylet, agents, workers).

Before starting a new instance, :func:`reap_dead_sessions` finds the ``mmray-*`` dirs of owners
that are no longer running, kills the processes that carry their marker (or still hold files
open in the dir) and removes the dir. Only the current user's processes are touched.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from loguru import logger

SESSION_PREFIX = "mmray-"
SESSION_ENV = "MMLLM_RAY_SESSION"
OWNER_FILE = "owner.json"
_TERM_WAIT_S = 3.0


@contextmanager
def owned_session(session_dir: str) -> Iterator[None]:
    """Record this process as the owner of ``session_dir`` and mark processes started inside.

    Args:
        session_dir: The private instance's temp dir (already created).
    """
    me = psutil.Process()
    owner = {"pid": me.pid, "create_time": me.create_time()}
    Path(session_dir, OWNER_FILE).write_text(json.dumps(owner))
    old = os.environ.get(SESSION_ENV)
    os.environ[SESSION_ENV] = session_dir
    try:
        yield
    finally:  # later children of the driver are not Ray's
        if old is None:
            os.environ.pop(SESSION_ENV, None)
        else:
            os.environ[SESSION_ENV] = old


def owner_alive(session_dir: str) -> bool:
    """Whether the process that started ``session_dir`` still runs (unknown owner: assume yes,
    unless the dir holds no Ray session at all)."""
    try:
        owner = json.loads(Path(session_dir, OWNER_FILE).read_text())
        proc = psutil.Process(int(owner["pid"]))
        return abs(proc.create_time() - float(owner["create_time"])) < 1.0
    except psutil.NoSuchProcess:
        return False
    except (OSError, ValueError, KeyError, TypeError):
        # No readable owner file: a dir of an older kit version or one being created right now.
        return True


def session_processes(session_dir: str) -> list[psutil.Process]:
    """This user's processes (not this one or its ancestors) that belong to ``session_dir``:
    they carry its marker in their environment, or name it in their command line or open files."""
    spare = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    uid, found = os.getuid(), []
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if proc.pid in spare or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if (proc.environ().get(SESSION_ENV) == session_dir
                    or any(session_dir in a for a in proc.info["cmdline"] or ())
                    or any(f.path.startswith(session_dir + "/") for f in proc.open_files())):
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or not ours to inspect
    return found


def kill_session_processes(session_dir: str) -> int:
    """SIGTERM the session's processes, SIGKILL those still alive after a short wait.

    Returns:
        How many processes were signalled.
    """
    procs = session_processes(session_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=_TERM_WAIT_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=_TERM_WAIT_S)
    return len(procs)


def reap_dead_sessions(parent: str) -> list[str]:
    """Kill the leftover processes and remove the temp dirs of dead owners under ``parent``.

    Args:
        parent: Directory holding ``mmray-*`` session dirs (``RAY_TMPDIR`` or ``/tmp``).

    Returns:
        The session dirs removed.
    """
    removed = []
    try:
        candidates = sorted(Path(parent).glob(f"{SESSION_PREFIX}*"))
    except OSError:
        return removed
    for d in map(str, candidates):
        if not os.path.isdir(d) or owner_alive(d):
            continue
        n = kill_session_processes(d)
        shutil.rmtree(d, ignore_errors=True)
        logger.warning(f"Removed Ray session {d} of a dead run ({n} leftover process(es) killed)")
        removed.append(d)
    return removed
