"""The bootstrap that runs inside the sandbox, before and after the untrusted program.

It is never imported by the harness: :mod:`mmllm.sandbox.execute` reads this file's source and
passes it to ``python -I -S -B -c``, with one JSON argument (the keys of ``cfg`` below). It uses
the standard library only (the sandbox has no site-packages).

Order of work, and why:

1. rlimits while still privileged (hard limits, so the program cannot raise them back);
2. drop to the per-sample uid/gid when the harness gave one (a fresh kernel user with no other
   processes: ``RLIMIT_NPROC`` then bounds this sample alone and nothing else can be signalled);
3. read the program from the input pipe (its length first), leaving the nonce unread in the
   pipe: the nonce is not in this process's memory while the program runs;
4. install the audit hook (a second layer; the mounts and namespaces are the first);
5. ``exec`` the program as ``__main__``. Any exception, ``SystemExit`` included (``sys.exit(0)``,
   ``raise SystemExit`` in a ``finally``) ends the run *without* the nonce, so it is not a pass;
   ``os._exit``, signals and crashes never reach step 6 either;
6. only after the program's last statement (its tests) returned: read the nonce, write it to the
   result pipe, flush and ``os._exit(0)`` (``atexit`` handlers and stray threads cannot change
   the outcome afterwards).
"""

# This file exists to exec untrusted code and to survive whatever it does:
# ruff: noqa: BLE001, S102, S110
import json
import os
import resource
import struct
import sys
import traceback as _traceback  # before the program runs (it may break imports or sys.modules)

cfg = json.loads(sys.argv[1])
_write, _read, _exit, _close = os.write, os.read, os._exit, os.close  # bound before the program runs



def _fixed_fds(fds, first=3):
    """Moves the harness's pipe ends to ``first``, ``first + 1``, ...: the program then sees the
    same fd layout whatever fd numbers the harness process happened to have (a long-running
    harness can hold hundreds), and an attack on its inherited fds is tested the same everywhere.
    Done before RLIMIT_NOFILE is lowered."""
    import fcntl

    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in fds]  # parked clear of 3, 4
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(parked):
        os.dup2(fd, first + i, inheritable=False)
        os.close(fd)
    return [first + i for i in range(len(fds))]


cfg["program_fd"], cfg["result_fd"] = _fixed_fds([cfg["program_fd"], cfg["result_fd"]])

for _name, _value in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, _name), (_value, _value))
if cfg["uid"] is not None:
    os.setgroups([])
    os.setresgid(cfg["gid"], cfg["gid"], cfg["gid"])
    os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])


def _read_exactly(fd, n):
    """Reads exactly ``n`` bytes from ``fd`` (fewer only at end of file)."""
    chunks, left = [], n
    while left:
        chunk = _read(fd, min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


_program_fd, _result_fd = cfg["program_fd"], cfg["result_fd"]
(_length,) = struct.unpack("<Q", _read_exactly(_program_fd, 8))
_source = _read_exactly(_program_fd, _length).decode("utf-8", errors="replace")
sys.path[:0] = [os.getcwd(), *cfg["sys_path"]]

_root = os.path.realpath(os.getcwd())
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
            "os.fork", "os.forkpty", "pty.", "ctypes.", "os.kill", "os.killpg", "signal.pthread_kill",
            "os.chown", "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit",
            "webbrowser.", "urllib.Request", "http.client.")
_PATH_EVENTS = ("os.remove", "os.rmdir", "os.rename", "os.chmod", "os.truncate", "shutil.rmtree",
                "shutil.move", "os.link", "os.symlink", "os.mkdir", "os.utime")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def _inside(path):
    """Whether ``path`` (str/bytes; an int fd counts as inside) lies under the sandbox dir."""
    if isinstance(path, int) or path is None:
        return True
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(_root)
    except Exception:
        return False


_ALLOWED = tuple(cfg["hook_allows"])  # e.g. "ctypes." when packages such as numpy are granted


def _hook(event, args):
    if event.startswith(_BLOCKED) and event != "socket.gethostname" and not event.startswith(_ALLOWED or ("\0",)):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event in _PATH_EVENTS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
        raise PermissionError(f"sandbox: {event} outside the sandbox directory")
    if event == "open" and not _inside(args[0]):
        writes = args[1] not in (None, "r", "rb", "rt")
        if writes or (isinstance(args[2], int) and args[2] & _WRITE_FLAGS):
            raise PermissionError("sandbox: writing outside the sandbox directory")


def _finish(code, message):
    """Ends the run without the nonce: flushes what the program printed, reports, exits."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass
    if message:
        _write(2, message.encode("utf-8", errors="replace"))
    _exit(code)


if cfg["audit_hook"]:
    sys.addaudithook(_hook)
del _hook
sys.argv = ["program.py"]
_globals = {"__name__": "__main__", "__file__": os.path.join(_root, "program.py"),
            "__builtins__": __builtins__}
del cfg
try:
    exec(compile(_source, _globals["__file__"], "exec"), _globals)
except SystemExit as _e:
    _code = _e.code if isinstance(_e.code, int) else (0 if _e.code is None else 1)
    _finish(_code if 0 <= _code < 256 else 1, f"\nsandbox: SystemExit({_e.code!r}) before the program finished\n")
except BaseException as _e:
    _traceback.print_exception(type(_e), _e, _e.__traceback__.tb_next)  # from the program's frame on
    _finish(1, "")
_nonce = _read_exactly(_program_fd, 32)  # only now: the program's last statement has returned
_finish_flush = (sys.stdout, sys.stderr)
for _stream in _finish_flush:
    try:
        _stream.flush()
    except Exception:
        pass
_write(_result_fd, _nonce)
_exit(0)
