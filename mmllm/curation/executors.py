"""Executors and the Ray lifecycle.

* :func:`ray_session` starts a private local Ray instance (its own temp dir, stopped and removed
  on exit, so no workers are orphaned) or joins an existing cluster given by ``address`` /
  ``RAY_ADDRESS`` (and leaves it running). A run killed with SIGKILL cannot clean up, and Ray's
  agents outlive their raylet, so each private instance records its owner and marks its
  processes; the next session removes what a dead owner left (:mod:`mmllm.curation.ray_cleanup`).
* :func:`make_executor` gives the executor for a name: ``ray_data`` (NeMo Curator's
  ``RayDataExecutor``, made to leave a Ray instance it did not start running; works on 2 cores), ``xenna`` (batch mode; the streaming default wants more
  CPUs than small machines have) or ``local`` (:class:`LocalExecutor`, no Ray at all).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from nemo_curator.backends.base import BaseExecutor, BaseStageAdapter, NodeInfo, WorkerMetadata
from nemo_curator.backends.ray_data import RayDataExecutor as NemoRayDataExecutor
from nemo_curator.tasks import EmptyTask, Task
from tqdm.auto import tqdm

from mmllm.curation.ray_cleanup import (
    SESSION_PREFIX,
    kill_session_processes,
    owned_session,
    reap_dead_sessions,
)

if TYPE_CHECKING:
    from nemo_curator.stages.base import ProcessingStage

ExecutorName = Literal["ray_data", "xenna", "local"]


class LocalExecutor(BaseExecutor):
    """Run the stages one after another in this process, without Ray.

    Same stage semantics as the Ray executors (setup, batching, task ids through NeMo's
    ``BaseStageAdapter``); for debugging, notebooks and unit tests.
    """

    def execute(self, stages: list[ProcessingStage], initial_tasks: list[Task] | None = None,
                ) -> list[Task]:
        tasks: list[Task] = list(initial_tasks or [EmptyTask()])
        for stage in stages:
            stage.setup_on_node(NodeInfo(), WorkerMetadata())
            stage.setup(WorkerMetadata())
            adapter, size, out = BaseStageAdapter(stage), max(1, stage.batch_size or 1), []
            for i in tqdm(range(0, len(tasks), size), desc=stage.name, leave=False,
                          disable=len(tasks) < 8):
                out.extend(adapter.process_batch(tasks[i:i + size]))
            stage.teardown()
            tasks = out
        return tasks


class RayDataExecutor(NemoRayDataExecutor):
    """NeMo Curator's Ray Data executor that leaves a running Ray instance running.

    NeMo's ``execute`` ends with ``ray.shutdown()`` even when the caller started Ray (a notebook,
    a benchmark that sized the instance, a cluster joined once for several passes), so the next
    pass silently started a default-sized instance of its own. Here Ray is stopped only when this
    call started it.
    """

    def execute(self, stages: list[ProcessingStage], initial_tasks: list[Task] | None = None,
                ) -> list[Task]:
        import ray

        if not ray.is_initialized():
            return super().execute(stages, initial_tasks)
        shutdown = ray.shutdown
        ray.shutdown = lambda *args, **kwargs: None  # the caller owns the instance
        try:
            return super().execute(stages, initial_tasks)
        finally:
            ray.shutdown = shutdown


def make_executor(name: ExecutorName) -> BaseExecutor:
    """Executor for a name (see the module docstring).

    Raises:
        ValueError: For an unknown name.
    """
    if name == "local":
        return LocalExecutor()
    if name == "ray_data":
        return RayDataExecutor()
    if name == "xenna":
        from nemo_curator.backends.xenna import XennaExecutor

        return XennaExecutor(config={"execution_mode": "batch"})
    msg = f"Unknown executor {name!r}: expected 'ray_data', 'xenna' or 'local'"
    raise ValueError(msg)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def needs_dashboard(executor: BaseExecutor) -> bool:
    """Xenna queries Ray's state API, which the dashboard serves."""
    return type(executor).__name__ == "XennaExecutor"


def uses_ray(executor: BaseExecutor) -> bool:
    """Whether the executor needs a Ray instance."""
    return not isinstance(executor, LocalExecutor)


def _use_token_auth_if_available() -> None:
    """Ray >= 2.5x clusters started with ``ray start`` require a token by default, but a driver
    joining one only sends it with ``RAY_AUTH_MODE=token``: turn that on when a token exists."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    default = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or os.path.exists(
            os.environ.get("RAY_AUTH_TOKEN_PATH") or default):
        os.environ["RAY_AUTH_MODE"] = "token"


@contextmanager
def ray_session(*, address: str | None = None, num_cpus: int | None = None,
                temp_dir: str | None = None, dashboard: bool = False) -> Iterator[None]:
    """Start (and afterwards stop) a private local Ray instance, or join an existing cluster.

    Args:
        address: Cluster to join (``None`` falls back to ``RAY_ADDRESS``; if neither is set a
            local instance is started).
        num_cpus: CPUs of the local instance (``None`` = all).
        temp_dir: Parent of the instance's unique temp dir (default ``RAY_TMPDIR`` or ``/tmp``;
            keep it short: Ray's socket paths must fit in 107 bytes).
        dashboard: Start the dashboard (Xenna reads actor state through its API).

    Yields:
        Nothing; Ray is initialised inside the block.
    """
    import ray

    if ray.is_initialized():  # the caller owns the running instance
        yield
        return
    # Workers inherit the driver's environment: let them find this venv's tools.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    address = address or os.environ.get("RAY_ADDRESS") or None
    tmp = None
    if address:
        _use_token_auth_if_available()
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    else:
        parent = temp_dir or os.environ.get("RAY_TMPDIR") or "/tmp"
        reap_dead_sessions(parent)
        tmp = tempfile.mkdtemp(prefix=SESSION_PREFIX, dir=parent)
        # Ray's processes inherit the driver's environment: the marker names their session.
        with owned_session(tmp):
            ray.init(num_cpus=num_cpus, _temp_dir=tmp, include_dashboard=dashboard,
                     dashboard_port=_free_port() if dashboard else None, log_to_driver=False,
                     configure_logging=False)
    try:
        yield
    finally:
        # Disconnects from a joined cluster; kills the processes of a private instance.
        ray.shutdown()
        if tmp is not None:
            kill_session_processes(tmp)  # agents that ignore the shutdown
            shutil.rmtree(tmp, ignore_errors=True)
