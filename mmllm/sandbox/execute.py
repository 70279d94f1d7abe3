"""Running one untrusted program, and many: pipes held by the harness, a nonce, bounded output.

Results the program cannot fake from outside its own process: the harness never reads a file
the program could reach; it reads the child's stdout/stderr and a separate result pipe, each
bounded, and calls a run *passed* only when the exit code is 0 **and** the result pipe carried
exactly this run's random nonce, which the bootstrap (:mod:`mmllm.sandbox.child`) writes only
after the program's last statement returned. See :mod:`mmllm.sandbox` for the residual risk.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import selectors
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mmllm.sandbox import isolation as iso

_KEEP = 8192  # bytes of stdout (head) and stderr (tail) kept in the result
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@dataclass
class ExecutionResult:
    """What one sandboxed run did.

    Attributes:
        status: ``"passed"`` (exit 0 and the harness saw the program finish), ``"failed"``,
            ``"timeout"`` or ``"error"`` (the harness itself failed on this sample).
        returncode: the exit code (negative: killed by that signal); None on timeout/error.
        stdout: the first 8 KiB of standard output.
        stderr: the last 8 KiB of standard error (the traceback).
        seconds: wall time.
        reason: why it did not pass ('' when it did).
        isolation: the layer it ran in (``"bwrap"`` or ``"none"``).
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    reason: str = ""
    isolation: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


class _Capture:
    """Keeps the head (or the tail) of a stream, at most ``limit`` bytes, and counts the rest."""

    def __init__(self, *, tail: bool, limit: int = _KEEP) -> None:
        self.tail, self.limit, self.total, self.buf = tail, limit, 0, bytearray()

    def add(self, data: bytes) -> None:
        self.total += len(data)
        if self.tail:
            self.buf += data[-self.limit:]
            del self.buf[:-self.limit]
        elif len(self.buf) < self.limit:
            self.buf += data[:self.limit - len(self.buf)]

    def text(self) -> str:
        return bytes(self.buf).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=1)
def _child_source() -> str:
    return (Path(__file__).parent / "child.py").read_text()


def run_program(program: str, *, timeout: float = 5.0, memory_mb: int = 1024, max_file_mb: int = 16,
                isolation: str = "auto", packages: Sequence[str] = (), max_processes: int = 16,
                max_open_files: int = 256, tmpfs_mb: int = 64, max_output_mb: float = 4.0) -> ExecutionResult:
    """Runs ``program`` (Python source) in the sandbox.

    Args:
        program: the whole program (e.g. prompt + completion + tests). It passes when it runs to
            its end without an exception (its tests ran) and exits 0.
        timeout: wall-clock seconds before everything it started is killed.
        memory_mb: address-space limit per process.
        max_file_mb: largest file it may write (``RLIMIT_FSIZE``).
        isolation: ``"auto"``, ``"bwrap"`` or ``"none"`` (see
            :func:`mmllm.sandbox.isolation.resolve_isolation`).
        packages: importable names it may use beyond the standard library (read-only binds).
        max_processes: processes and threads it may have at once (``RLIMIT_NPROC``; needs a
            per-sample uid or bwrap).
        max_open_files: ``RLIMIT_NOFILE``.
        tmpfs_mb: size of its writable directory (bwrap).
        max_output_mb: stdout + stderr beyond this kill the run (it fails).

    Returns:
        An :class:`ExecutionResult`.

    Raises:
        SandboxUnavailable: the isolation asked for cannot run here.
    """
    limits = {"timeout": timeout, "memory_mb": memory_mb, "max_file_mb": max_file_mb, "max_processes": max_processes,
              "max_open_files": max_open_files, "tmpfs_mb": tmpfs_mb, "max_output_mb": max_output_mb}
    if bad := {k: v for k, v in limits.items() if not v > 0}:
        raise ValueError(f"sandbox limits must be positive, got {bad}")
    layer = iso.resolve_isolation(isolation)
    uid = iso.allocate_uid() if layer == "bwrap" or iso.weak_can_drop_uid() else None
    try:
        return run_in_layer(program, layer=layer, uid=uid, timeout=timeout, memory_mb=memory_mb,
                            max_file_mb=max_file_mb, packages=packages, max_processes=max_processes,
                            max_open_files=max_open_files, tmpfs_mb=tmpfs_mb, max_output_mb=max_output_mb)
    finally:
        iso.release_uid(uid, sweep=layer != "bwrap")


def _rlimits(*, timeout: float, memory_mb: int, max_file_mb: int, max_processes: int,
             max_open_files: int, count_processes: bool) -> dict[str, int]:
    limits = {"RLIMIT_AS": int(memory_mb * 2**20), "RLIMIT_CPU": int(timeout) + 1,
              "RLIMIT_FSIZE": int(max_file_mb * 2**20),
              "RLIMIT_CORE": 0, "RLIMIT_NOFILE": max_open_files}
    if count_processes:  # otherwise NPROC would count every process of the caller's uid
        limits["RLIMIT_NPROC"] = max_processes
    return limits


def run_in_layer(program: str, *, layer: str, uid: int | None, timeout: float = 5.0, memory_mb: int = 1024,
                 max_file_mb: int = 16, packages: Sequence[str] = (), max_processes: int = 16,
                 max_open_files: int = 256, tmpfs_mb: int = 64, max_output_mb: float = 4.0) -> ExecutionResult:
    """One run in an already resolved layer, as a given uid (see :func:`run_program`)."""
    rlimits = _rlimits(timeout=timeout, memory_mb=memory_mb, max_file_mb=max_file_mb, max_processes=max_processes,
                       max_open_files=max_open_files, count_processes=uid is not None or layer == "bwrap")
    workdir = None if layer == "bwrap" else tempfile.mkdtemp(prefix="mmllm-sandbox-")
    (prog_r, prog_w), (res_r, res_w) = os.pipe(), os.pipe()
    info_r, info_w = os.pipe() if layer == "bwrap" else (None, None)  # bwrap reports its namespace's init pid
    child_ends = [fd for fd in (prog_r, res_w, info_w) if fd is not None]
    try:
        prefix, sys_path, cwd, env = _layer(layer, uid=uid, packages=packages, tmpfs_mb=tmpfs_mb, workdir=workdir)
        if info_w is not None:
            prefix[1:1] = ["--info-fd", str(info_w)]
        cfg = {"program_fd": prog_r, "result_fd": res_w, "rlimits": rlimits, "uid": uid, "gid": uid,
               "sys_path": sys_path, "audit_hook": True,
               "hook_allows": ["ctypes."] if packages else []}  # numpy & co. load their libraries with ctypes
        cmd = [*prefix, iso.interpreter(), "-I", "-S", "-B", "-c", _child_source(), json.dumps(cfg)]
        nonce = secrets.token_hex(16).encode()
        payload = program.encode("utf-8", errors="replace")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, pass_fds=child_ends, start_new_session=True)
    except BaseException:
        for fd in (*child_ends, prog_w, res_r, info_r):
            if fd is not None:
                os.close(fd)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    for fd in child_ends:  # the child holds them now; EOF then means every holder is gone
        os.close(fd)
    try:
        out = _Exchange(proc, prog_w=prog_w, res_r=res_r, info_r=info_r, max_output=int(max_output_mb * 2**20))
        out.run(struct.pack("<Q", len(payload)) + payload + nonce, deadline=start + timeout)
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(out, nonce=nonce, seconds=time.monotonic() - start, layer=layer, timeout=timeout)


def _layer(layer: str, *, uid: int | None, packages: Sequence[str], tmpfs_mb: int,
           workdir: str | None) -> tuple[list[str], list[str], str, dict[str, str]]:
    """The command prefix, extra sys.path, cwd and environment of one run in ``layer``."""
    if layer == "bwrap":
        prefix = iso.bwrap_command(tmpfs_bytes=int(tmpfs_mb * 2**20), packages=packages)
        env = {**_ENV, "HOME": iso.SANDBOX_DIR, "TMPDIR": iso.SANDBOX_DIR}
        prefix[-1:-1] = [a for k, v in env.items() for a in ("--setenv", k, v)]  # before the closing "--"
        return prefix, [iso.PACKAGES_DIR] if packages else [], "/", {}
    assert workdir is not None
    if uid is not None:
        os.chown(workdir, uid, uid)
    sys_path = sorted({str(Path(host).parent) for host, _ in iso.package_binds(packages)})
    return list(iso.weak_prefix()), sys_path, workdir, {**_ENV, "HOME": workdir, "TMPDIR": workdir}


def _verdict(out: _Exchange, *, nonce: bytes, seconds: float, layer: str, timeout: float) -> ExecutionResult:
    """Decides passed/failed/timeout from what the harness itself saw."""
    code = None if out.timed_out else out.returncode
    result = bytes(out.result.buf)
    if out.timed_out:
        status, reason = "timeout", f"no result within {timeout:g} s"
    elif out.output_limited:
        status, reason = "failed", f"printed more than {out.max_output} bytes"
    elif result and result != nonce or out.result.total > len(nonce):
        status, reason = "failed", "the result channel was written by the program"
    elif code != 0:
        status = "failed"
        reason = f"killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exit code {code}"
    elif result != nonce:
        status, reason = "failed", "exited with code 0 before the program finished"
    else:
        status, reason = "passed", ""
    return ExecutionResult(status=status, returncode=code, stdout=out.stdout.text(), stderr=out.stderr.text(),
                           seconds=seconds, reason=reason, isolation=layer)


class _Exchange:
    """Feeds the program to the child and reads its three pipes until it exits or time is up."""

    def __init__(self, proc: subprocess.Popen, *, prog_w: int, res_r: int, info_r: int | None,
                 max_output: int) -> None:
        self.proc, self.prog_w, self.max_output = proc, prog_w, max_output
        self.stdout, self.stderr = _Capture(tail=False), _Capture(tail=True)
        self.result = _Capture(tail=False, limit=64)
        self.res_r, self.info_r = res_r, info_r
        self.info = _Capture(tail=False, limit=4096)
        self.readers = {proc.stdout.fileno(): self.stdout, proc.stderr.fileno(): self.stderr, res_r: self.result}
        if info_r is not None:
            self.readers[info_r] = self.info
        self.init_pidfd: int | None = None  # the sandbox's PID-namespace init, once bwrap named it
        self.timed_out = self.output_limited = False
        self.returncode: int | None = None

    def run(self, payload: bytes, *, deadline: float) -> None:
        """Runs the exchange; always leaves the child (and its whole group) dead and reaped."""
        sel = selectors.DefaultSelector()
        try:
            self._loop(sel, memoryview(payload), deadline)
        finally:
            sel.close()
            self._kill()
            self._drain()
            for fd in (self.res_r, self.prog_w, self.info_r, self.init_pidfd):
                if fd is not None:
                    os.close(fd)
            self.proc.stdout.close()
            self.proc.stderr.close()

    def _loop(self, sel: selectors.BaseSelector, pending: memoryview, deadline: float) -> None:
        for fd in self.readers:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        os.set_blocking(self.prog_w, False)
        sel.register(self.prog_w, selectors.EVENT_WRITE)
        pidfd = os.pidfd_open(self.proc.pid) if hasattr(os, "pidfd_open") else None
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        try:
            while pidfd is not None or self.proc.poll() is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timed_out = True
                    return
                for key, _ in sel.select(min(left, 0.05) if pidfd is None else left):
                    if key.fd == pidfd:
                        return
                    if key.fd == self.prog_w:
                        pending = self._feed(sel, pending)
                    elif not self._read(key.fd):
                        sel.unregister(key.fd)
                    elif key.fd == self.info_r:
                        self._watch_init()
                if self.stdout.total + self.stderr.total > self.max_output:
                    self.output_limited = True
                    return
        finally:
            if pidfd is not None:
                os.close(pidfd)

    def _feed(self, sel: selectors.BaseSelector, pending: memoryview) -> memoryview:
        """Writes the next chunk of the program; closes the pipe when all is written."""
        try:
            pending = pending[os.write(self.prog_w, pending[:1 << 16]):]
        except BlockingIOError:
            return pending
        except OSError:  # the child closed its end (it crashed or closed fd 3): nothing more to send
            pending = pending[:0]
        if not pending:
            sel.unregister(self.prog_w)
        return pending

    def _read(self, fd: int) -> bool:
        """Reads what is there from ``fd``; False at end of file."""
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if data:
            self.readers[fd].add(data)
        return bool(data)

    def _drain(self) -> None:
        """After the child is dead: takes what is left in the pipes (bounded, never blocks)."""
        budget = self.max_output + (1 << 16)
        for fd, capture in self.readers.items():
            while budget > 0:
                try:
                    data = os.read(fd, 1 << 16)
                except OSError:
                    break
                if not data:
                    break
                budget -= len(data)
                capture.add(data)

    def _watch_init(self) -> None:
        """Holds a pidfd on the namespace's init as soon as bwrap's info names it (no pid reuse)."""
        if self.init_pidfd is not None or self.info_r is None or not self.info.buf.rstrip().endswith(b"}"):
            return
        try:
            pid = int(json.loads(bytes(self.info.buf))["child-pid"])
            self.init_pidfd = os.pidfd_open(pid)
        except (ValueError, KeyError, OSError, AttributeError):
            pass

    def _kill(self) -> None:
        """Kills everything the child started and reaps it.

        With bwrap: SIGKILL to the namespace's init; the kernel then kills every process in the
        namespace and bwrap exits only after reaping that init, so once :meth:`wait` returns
        nothing of the run is left. Otherwise (or as a fallback): SIGKILL to the whole session.
        """
        if self.info_r is not None:
            self._read(self.info_r)
            self._watch_init()
        if self.init_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.returncode = self.proc.wait(timeout=30)
                return
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.returncode = self.proc.wait()


def run_programs(programs: Sequence[str], *, n_workers: int = 2, progress: bool = True,
                 **kwargs) -> list[ExecutionResult]:
    """Runs many programs, ``n_workers`` at a time (threads waiting on subprocesses).

    A sample whose run breaks the harness (an OSError, say) gets status ``"error"``; the batch
    always completes.

    Args:
        programs: Python sources.
        n_workers: concurrent sandboxes.
        progress: show a tqdm bar.
        **kwargs: passed to :func:`run_program`.

    Returns:
        One result per program, in order.

    Raises:
        SandboxUnavailable: before anything runs, when the isolation cannot be provided.
    """
    layer = iso.resolve_isolation(kwargs.get("isolation", "auto"))  # probe once, before the threads
    if layer == "none":
        iso.weak_can_drop_uid()
    with ThreadPoolExecutor(max_workers=max(1, n_workers)) as pool:
        futures = [pool.submit(_run_safely, p, kwargs) for p in programs]
        return [f.result() for f in tqdm(futures, desc="executing", disable=not progress, leave=False)]


def _run_safely(program: str, kwargs: dict) -> ExecutionResult:
    start = time.monotonic()
    try:
        return run_program(program, **kwargs)
    except Exception as e:  # noqa: BLE001 (one sample must never abort the batch)
        return ExecutionResult(status="error", returncode=None, stdout="", stderr=repr(e),
                               seconds=time.monotonic() - start, reason=f"sandbox error: {e!r}")
