"""Sandboxed execution of untrusted (model-written) Python programs.

The parent never ``exec``s or ``eval``s the program: it writes it to a fresh temp dir and runs a
separate ``python -I -B`` in it with

* a wall-clock timeout (the whole process group is killed) and an ``RLIMIT_CPU`` backstop;
* ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (files written), ``RLIMIT_CORE`` = 0, set by the
  child's bootstrap before the program runs (no ``preexec_fn``: the parent may run threads);
* no network: a new network namespace (``unshare --net``) when the kernel allows it, and in
  every case an audit hook (``sys.addaudithook``, which the program cannot remove) that refuses
  sockets, subprocesses, ``fork``/``exec``, signals to other processes, ``ctypes`` and writes or
  deletions outside the temp dir;
* an unprivileged user (``setpriv`` to nobody) when the parent is root;
* a minimal environment and the temp dir as cwd and HOME.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

# Runs inside the child before the program: argv = [program path, memory bytes, cpu s, file bytes].
_BOOTSTRAP = r'''
import os, resource, sys
_mem, _cpu, _fsize = (int(x) for x in sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_AS, (_mem, _mem))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_root = os.path.realpath(os.getcwd())
_blocked = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill",
            "os.chown", "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit",
            "webbrowser.", "urllib.Request", "http.client.")
_path_events = ("os.remove", "os.rmdir", "os.rename", "os.chmod", "os.truncate", "shutil.rmtree",
                "shutil.move", "os.link", "os.symlink", "os.mkdir", "os.utime")
def _inside(p):
    try:
        p = os.fsdecode(p) if not isinstance(p, int) else None
    except Exception:
        return False
    return p is None or os.path.realpath(p).startswith(_root)
def _hook(event, args):
    if event.startswith(_blocked) and event != "socket.gethostname":
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event in _path_events and args and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the sandbox directory")
    if event == "open" and args[1] not in (None, "r", "rb", "rt") and not _inside(args[0]):
        raise PermissionError("sandbox: writing outside the sandbox directory")
    if event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR) and not _inside(args[0]):
        raise PermissionError("sandbox: writing outside the sandbox directory")
sys.addaudithook(_hook)
del _hook
import runpy
sys.argv = sys.argv[1:2]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@dataclass
class ExecutionResult:
    """What one sandboxed run did.

    Attributes:
        status: ``"passed"`` (exit code 0), ``"failed"`` or ``"timeout"``.
        returncode: the exit code (negative: killed by that signal); None on timeout.
        stdout: the first 8 KiB of standard output.
        stderr: the last 8 KiB of standard error (the traceback).
        seconds: wall time.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _works(prefix: list[str]) -> bool:
    try:
        return subprocess.run(prefix + [sys.executable, "-I", "-c", "pass"], timeout=30,
                              capture_output=True, check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.lru_cache(maxsize=1)
def isolation_prefix() -> tuple[str, ...]:
    """The command prefix that isolates the child: network namespace and/or unprivileged user.

    Probed once per process; layers the kernel or container refuses are left out (the audit hook
    in the child still blocks sockets).
    """
    layers: list[list[str]] = []
    if shutil.which("unshare"):
        layers.append(["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"])
    if os.geteuid() == 0 and shutil.which("setpriv"):
        layers.append(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
    prefix: list[str] = []
    for layer in layers:
        if _works(prefix + layer):
            prefix += layer
    return tuple(prefix)


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024,
                max_file_mb: int = 16) -> ExecutionResult:
    """Runs ``program`` (Python source) in a sandboxed subprocess.

    Args:
        program: the whole program (e.g. prompt + completion + tests); exit code 0 means passed.
        timeout: wall-clock seconds before the process group is killed.
        memory_mb: address-space limit.
        max_file_mb: largest file the program may write (in its temp dir).

    Returns:
        An :class:`ExecutionResult`.
    """
    with tempfile.TemporaryDirectory(prefix="mmllm-sandbox-") as tmp:
        os.chmod(tmp, 0o777)  # the unprivileged user must be able to work in it
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(program)
        out_path, err_path = os.path.join(tmp, ".stdout"), os.path.join(tmp, ".stderr")
        limits = [str(memory_mb * 2**20), str(int(timeout) + 1), str(max_file_mb * 2**20)]
        cmd = [*isolation_prefix(), sys.executable, "-I", "-B", "-c", _BOOTSTRAP, path, *limits]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            try:
                code: int | None = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)
        seconds = time.monotonic() - start
        stdout = _read(out_path, head=True)
        stderr = _read(err_path, head=False)
    status = "timeout" if code is None else ("passed" if code == 0 else "failed")
    return ExecutionResult(status=status, returncode=code, stdout=stdout, stderr=stderr, seconds=seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kills the child's whole session (anything it spawned before the hook stopped it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read(path: str, *, head: bool, limit: int = 8192) -> str:
    """The first (``head``) or last ``limit`` bytes of a file, decoded."""
    with open(path, "rb") as f:
        if not head:
            f.seek(max(0, os.path.getsize(path) - limit))
        return f.read(limit).decode("utf-8", errors="replace")


def run_programs(programs: Sequence[str], *, n_workers: int = 2, progress: bool = True,
                 **kwargs) -> list[ExecutionResult]:
    """Runs many programs, ``n_workers`` at a time (threads waiting on subprocesses).

    Args:
        programs: Python sources.
        n_workers: concurrent subprocesses.
        progress: show a tqdm bar.
        **kwargs: passed to :func:`run_program` (timeout, memory_mb, max_file_mb).

    Returns:
        One result per program, in order.
    """
    isolation_prefix()  # probe once before the threads start
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        futures = [pool.submit(run_program, p, **kwargs) for p in programs]
        return [f.result() for f in tqdm(futures, desc="executing", disable=not progress, leave=False)]
