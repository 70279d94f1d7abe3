"""How a sandboxed child is isolated: the bubblewrap command line, per-sample uids, packages.

Two layers exist:

* ``"bwrap"``: every run gets its own mount, PID, network, IPC, UTS (and cgroup) namespaces from
  bubblewrap. The root is an empty tmpfs holding read-only binds of ``/usr/lib``, ``/usr/lib64``
  and the Python installation (``sys.base_prefix``, its site-packages hidden), a fresh ``/proc``
  and ``/dev``, and one private writable tmpfs ``/sandbox`` (cwd, HOME, TMPDIR, size-capped).
  Nothing else of the host exists there: no project files, no home directories, no ``/work``,
  no venv, no ``/usr/bin`` (no shell to exec). When the harness is root, bwrap runs privileged
  (all mounts made as root) and the child drops to a uid of its own per sample (see
  :func:`allocate_uid`); as a normal user bwrap makes a user namespace instead (uid 65534).
* ``"none"``: the weak layer only (rlimits, audit hook, per-sample uid when root, ``unshare
  --net`` when allowed). A program can read what its uid may read on the host, and children it
  detaches with ``setsid`` are killed afterwards only when a per-sample uid was possible.

Why not bwrap's own user namespace when root: it maps the child to host uid 0, which the kernel
exempts from ``RLIMIT_NPROC`` (fork bombs) and which owns the host's files.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

SANDBOX_DIR = "/sandbox"
PACKAGES_DIR = "/opt/mmllm-packages"
ISOLATIONS = ("auto", "bwrap", "none")
ALLOW_WEAK_ENV = "MMLLM_SANDBOX_ALLOW_WEAK"

# Per-sample uids: a block far above any real account (and below 2**31, which some tools treat
# as signed). Each concurrent run in this process holds a distinct one.
_UID_BASE, _UID_SPAN = 1_700_000_000, 1 << 24
_uids_in_use: set[int] = set()
_uid_lock = threading.Lock()


class SandboxUnavailable(RuntimeError):
    """The requested isolation cannot be provided on this machine."""


def interpreter() -> str:
    """The real interpreter binary (a venv's ``python`` is a symlink to it)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def allocate_uid() -> int | None:
    """A uid no other run of this process holds (root only; None when not root).

    Returns:
        The uid (also used as gid); hand it back with :func:`release_uid`.
    """
    if os.geteuid() != 0:
        return None
    with _uid_lock:
        while True:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid


def release_uid(uid: int | None, *, sweep: bool = True) -> None:
    """Frees ``uid``; with ``sweep``, first kills whatever still runs as it (the weak layer's
    escaped children; bwrap runs need no sweep: their PID namespace is gone when they end)."""
    if uid is None:
        return
    for _ in range(100 if sweep else 0):  # each round kills everything seen; a dying process cannot fork
        pids = [p for p in _pids_of(uid)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    with _uid_lock:
        _uids_in_use.discard(uid)


def _pids_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``, read from /proc."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith(("Z", "X")):
            pids.append(int(entry.name))
    return pids


def package_binds(packages: Sequence[str]) -> list[tuple[str, str]]:
    """Read-only binds that make the named packages importable in the sandbox, and only those.

    Every top-level file or directory of the package's distribution is bound (e.g. ``numpy`` and
    its vendored ``numpy.libs``) under :data:`PACKAGES_DIR`; dependencies must be listed too.

    Args:
        packages: importable top-level names, e.g. ``["numpy"]``.

    Returns:
        (host path, sandbox path) pairs.

    Raises:
        ValueError: a name that is not installed, or is part of the standard library.
    """
    return list(_package_binds(tuple(packages))) if packages else []


@functools.lru_cache(maxsize=32)
def _package_binds(packages: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    dists = importlib.metadata.packages_distributions()
    binds: dict[str, str] = {}
    for name in packages:
        if not name.isidentifier():
            raise ValueError(f"sandbox packages are top-level import names (e.g. 'numpy'), got {name!r}")
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None and not spec.submodule_search_locations:
            raise ValueError(f"sandbox package {name!r} is not installed")
        if name in sys.stdlib_module_names:
            raise ValueError(f"{name!r} is in the standard library (always available)")
        found = False
        for dist_name in dists.get(name, []):
            dist = importlib.metadata.distribution(dist_name)
            for file in dist.files or []:
                top = file.parts[0]
                if ".." in file.parts or top.endswith((".dist-info", ".egg-info")) or top == "__pycache__":
                    continue
                host = Path(dist.locate_file(top))
                if host.exists():
                    binds[str(host)] = f"{PACKAGES_DIR}/{top}"
                    found = True
        if not found:  # not from a distribution (e.g. on PYTHONPATH): the package itself
            host = Path(spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin)
            binds[str(host)] = f"{PACKAGES_DIR}/{host.name}"
    return tuple(sorted(binds.items()))


@functools.lru_cache(maxsize=32)
def _read_only_view(packages: tuple[str, ...]) -> tuple[str, ...]:
    """bwrap arguments for the read-only part of the root: libraries, the interpreter, packages.

    bwrap creates missing parents of a mount point 0700 when run as root, which the child's own
    uid could not traverse, so every parent is made explicitly (0755) first.
    """
    prefix = os.path.realpath(sys.base_prefix)
    binds = [("/etc/ld.so.cache", "/etc/ld.so.cache"), ("/usr/lib", "/usr/lib"), ("/usr/lib64", "/usr/lib64")]
    if prefix == "/usr" or prefix.startswith("/usr/"):  # a system Python: stdlib in /usr/lib; not /usr/bin
        binds.append((interpreter(), interpreter()))
    else:  # pyenv, conda, /opt/python...: the whole installation
        binds.append((prefix, prefix))
    binds += package_binds(packages)
    args, made = [], {"/"}
    for host, inside in binds:
        if not os.path.exists(host):
            continue
        for parent in reversed(Path(inside).parents):
            if str(parent) not in made and not any(str(parent).startswith(d + "/") for _, d in binds[1:]):
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", host, inside]
    # The installation's own site-packages (and Debian's dist-packages) stay hidden.
    for site in {sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix}),
                 "/usr/lib/python3/dist-packages"}:
        if os.path.isdir(site):
            args += ["--tmpfs", os.path.realpath(site)]
    return tuple(args + ["--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64"])


def bwrap_command(*, tmpfs_bytes: int, packages: Sequence[str] = ()) -> list[str]:
    """The bubblewrap prefix for one run (the interpreter command follows it).

    Args:
        tmpfs_bytes: size of the writable ``/sandbox`` tmpfs.
        packages: importable names to bind read-only (see :func:`package_binds`).

    Returns:
        argv up to and including ``--``.
    """
    cmd = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
           "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--clearenv"]
    if os.geteuid() == 0:  # privileged bwrap; the child drops to its own uid (child.py)
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        cmd += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
    cmd += _read_only_view(tuple(packages))
    cmd += ["--proc", "/proc", "--dev", "/dev", "--perms", "0777", "--size", str(tmpfs_bytes),
            "--tmpfs", SANDBOX_DIR, "--chdir", SANDBOX_DIR, "--"]
    return cmd


_PROBE = "import os\nassert os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK), 'stdlib unreadable'\n"


def _probe(layer: str, uid: int | None) -> str:
    """Runs a tiny program in ``layer``; returns '' when it passed, else why not."""
    from mmllm.sandbox.execute import run_in_layer

    try:
        res = run_in_layer(_PROBE, layer=layer, uid=uid, timeout=60.0)
    except OSError as e:
        return str(e)
    return "" if res.passed else f"{res.reason}: {res.stderr.strip()[-300:]}"


@functools.lru_cache(maxsize=1)
def bwrap_error() -> str:
    """Why bubblewrap cannot isolate here ('' when it can). Probed once per process."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (bwrap) is not installed (apt-get install bubblewrap; scripts/setup.sh does)"
    uid = allocate_uid()
    try:
        return _probe("bwrap", uid)
    finally:
        release_uid(uid)


@functools.lru_cache(maxsize=1)
def weak_prefix() -> tuple[str, ...]:
    """The weak layer's command prefix: a new network namespace when the kernel allows it."""
    net = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--net", "--map-root-user"]
    if shutil.which("unshare") and subprocess.run([*net, "true"], capture_output=True, check=False).returncode == 0:
        return tuple(net)
    return ()


@functools.lru_cache(maxsize=1)
def weak_can_drop_uid() -> bool:
    """Whether a per-sample uid can run the interpreter (not when it lies in a 0700 home)."""
    uid = allocate_uid()
    try:
        return uid is not None and _probe("none", uid) == ""
    finally:
        release_uid(uid)


@functools.lru_cache(maxsize=4)
def resolve_isolation(isolation: str) -> str:
    """Turns ``auto``/``bwrap``/``none`` into the layer that will be used.

    ``auto`` (the default) is bwrap when it works; otherwise it refuses, unless the environment
    sets ``MMLLM_SANDBOX_ALLOW_WEAK=1``, which falls back to ``none``. ``none`` warns once.

    Raises:
        SandboxUnavailable: bwrap was required (or ``auto`` without the opt-in) and cannot run.
        ValueError: an unknown value.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"sandbox isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation != "none":
        error = bwrap_error()
        if not error:
            return "bwrap"
        if isolation == "bwrap" or os.environ.get(ALLOW_WEAK_ENV) != "1":
            raise SandboxUnavailable(
                f"the code sandbox needs bubblewrap: {error}. Install it, or run with the weaker "
                f"in-process layer only via isolation='none' (or {ALLOW_WEAK_ENV}=1 with 'auto').")
    warnings.warn("mmllm sandbox: running untrusted code WITHOUT bubblewrap (rlimits and an audit "
                  "hook only); a hostile program can read host files and outlive its run.", stacklevel=3)
    return "none"
