"""Hostile programs for the sandbox, each with the outcome the sandbox must give it.

Sources are :class:`string.Template` s: ``$escape`` (a host directory the program must not
touch; every attack that "escapes" leaves a file there), ``$victim`` (a host file that must stay
intact), ``$repo_canary`` / ``$home_canary`` / ``$secret`` (what must not be readable),
``$tcp_port`` / ``$tcp6_port`` / ``$unix_path`` / ``$abstract`` (harness-side listeners that must
receive nothing), ``$victim_pid`` / ``$harness_pid`` (host processes that must survive) and
``$marker`` (in the command line of every process an attack leaves behind, so survivors can be
found on the host).

``SPAWN`` is a prelude that starts a fresh interpreter through ``_posixsubprocess`` (no audit
event): that child has no audit hook, so attacks using it test the OS layer alone.
"""

from __future__ import annotations

from dataclasses import dataclass

SPAWN = r'''
import _posixsubprocess, os, sys
def spawn(code, *, setsid=False, wait=True):
    """Runs `code` in a new interpreter without the audit hook; returns its wait status or pid."""
    r, w = os.pipe()
    args = [sys.executable, "-I", "-S", "-c", code, "$marker"]
    pid = _posixsubprocess.fork_exec(args, [os.fsencode(sys.executable)], True, (w,), None, None,
                                     -1, -1, -1, -1, -1, -1, r, w, True, setsid, -1, None, None,
                                     None, -1, None, False)
    os.close(w)
    err = os.read(r, 1000)
    os.close(r)
    assert not err, err
    return os.waitpid(pid, 0)[1] if wait else pid
'''


@dataclass(frozen=True)
class Attack:
    """One hostile program.

    Attributes:
        name: test id.
        source: the program (a Template; see the module docstring).
        expect: the status it must get: ``"failed"``, ``"timeout"``, ``"not passed"`` (failed or
            timeout) or ``"contained"`` (any status: the program may finish, its effects are
            checked on the host).
        absent: strings that must not appear in its stdout/stderr (secrets it tried to read).
    """

    name: str
    source: str
    expect: str
    absent: tuple[str, ...] = ()


def _spawned(body: str) -> str:
    """A program that runs ``body`` in a hook-less child and waits for it."""
    return SPAWN + f"print('child status', spawn({body!r}))\n"


SECRETS = ("$secret",)

ATTACKS = [
    # --- the file system: writes, deletes, truncations outside; dir_fd; sqlite; fifo; links
    Attack("write_outside", "open('$escape/write', 'w').write('x')\n", "failed"),
    Attack("write_outside_nohook", _spawned("open('$escape/write2', 'w').write('x')"), "contained"),
    Attack("dir_fd_create", "import os\nfd = os.open('$escape', os.O_RDONLY)\n"
           "os.write(os.open('dirfd', os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'x')\n", "failed"),
    Attack("dir_fd_unlink_victim", "import os\nfd = os.open('/', os.O_RDONLY)\n"
           "os.unlink('$victim'.lstrip('/'), dir_fd=fd)\n", "failed"),
    Attack("truncate_victim", "import os\nos.open('$victim', os.O_RDONLY | os.O_TRUNC)\n", "failed"),
    Attack("truncate_victim_nohook", _spawned("import os; os.truncate('$victim', 0)"), "contained"),
    Attack("delete_victim_nohook", _spawned("import os; os.unlink('$victim')"), "contained"),
    Attack("rmtree_escape_dir_nohook", _spawned("import shutil; shutil.rmtree('$escape')"), "contained"),
    Attack("sqlite_outside", "import sqlite3\nsqlite3.connect('$escape/db.sqlite').execute('create table t(x)')\n",
           "failed"),
    Attack("mkfifo_outside", "import os\nos.mkfifo('$escape/fifo')\n", "failed"),
    Attack("hardlink_victim", _spawned("import os; os.link('$victim', 'stolen')"), "contained"),
    Attack("read_repo_canary", "print(open('$repo_canary').read())\n", "failed", SECRETS),
    Attack("read_home_canary", "print(open('$home_canary').read())\n", "failed", SECRETS),
    Attack("list_host_dirs", "import os\nfor d in ('/work', '/home', '/root', '/etc', '/tmp'):\n"
           "    try:\n        print(d, os.listdir(d))\n    except OSError as e:\n        print(d, e)\n"
           "print(open('/etc/passwd').read())\n", "failed", ("root:x:0:0", ".venv", ".bashrc")),
    Attack("write_sandbox_root_nohook", _spawned(
        "for d in ('/', '/dev', '/dev/shm', '/etc', '/usr/lib', '/root', '/proc'):\n"
        "    try: open(d + '/x', 'wb').write(b'x'); print(d, 'WRITABLE')\n    except OSError as e: print(d, e)"),
        "contained", ("WRITABLE",)),
    Attack("fill_tmpfs", "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n    i += 1\n",
           "failed"),
    # --- processes by every route; detached children; bombs
    Attack("os_system", "import os\nos.system('touch $escape/system')\n", "failed"),
    Attack("subprocess_run", "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'touch $escape/sp'])\n", "failed"),
    Attack("os_fork", "import os\nif os.fork() == 0:\n    open('$escape/fork', 'w')\n", "failed"),
    Attack("posix_spawn", "import os, sys\nos.posix_spawn(sys.executable, [sys.executable, '-c', 'pass'], {})\n",
           "failed"),
    Attack("ctypes_libc_system", "import ctypes\nctypes.CDLL(None).system(b'touch $escape/ctypes')\n", "failed"),
    Attack("posixsubprocess_exec_sh", "import _posixsubprocess, os\nr, w = os.pipe()\n"
           "_posixsubprocess.fork_exec([b'/bin/sh', b'-c', b'touch $escape/sh'], [b'/bin/sh'], True, (w,), None, "
           "None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)\n"
           "os.close(w)\nassert not os.read(r, 1000), 'exec failed'\n", "failed"),
    Attack("setsid_daemon", SPAWN + "spawn('import os, time; time.sleep(60); open(\"$escape/daemon\", \"w\")', "
           "setsid=True, wait=False)\nprint('left a daemon')\n", "contained"),
    Attack("double_fork_daemon", _spawned(
        "import os, time\nif os.fork(): os._exit(0)\nos.setsid()\nif os.fork(): os._exit(0)\n"
        "time.sleep(60)\nopen('$escape/double', 'w')"), "contained"),
    Attack("fork_bomb", _spawned("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"),
           "not passed"),
    Attack("memory_bomb", "x = bytearray(64 << 30)\n", "failed"),
    Attack("output_bomb", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "failed"),
    Attack("stderr_bomb_nohook", _spawned("import os\nwhile True: os.write(2, b'e' * 65536)"), "failed"),
    # --- sockets of every family
    Attack("inet_connect", "import socket\nsocket.create_connection(('127.0.0.1', $tcp_port), timeout=1)\n",
           "failed"),
    Attack("inet_connect_nohook", _spawned("import socket; socket.create_connection(('127.0.0.1', $tcp_port), "
                                           "timeout=1)"), "contained"),
    Attack("inet6_connect_nohook", _spawned("import socket; socket.create_connection(('::1', $tcp6_port), "
                                            "timeout=1)"), "contained"),
    Attack("internet_nohook", _spawned("import socket; socket.create_connection(('1.1.1.1', 53), timeout=1)"),
           "contained"),
    Attack("unix_connect_nohook", _spawned("import socket; s = socket.socket(socket.AF_UNIX); "
                                           "s.connect('$unix_path'); s.send(b'x')"), "contained"),
    Attack("abstract_unix_nohook", _spawned("import socket; s = socket.socket(socket.AF_UNIX); "
                                            "s.connect('\\0$abstract'); s.send(b'x')"), "contained"),
    Attack("netlink_nohook", _spawned("import socket; print(socket.if_nameindex()); "
                                      "s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0); s.bind((0, 0))"),
           "contained", ("$host_interfaces",)),
    # --- signals to the harness, to host processes, to everything
    Attack("kill_harness", "import os, signal\nos.kill($harness_pid, signal.SIGKILL)\n", "failed"),
    Attack("kill_harness_nohook", _spawned("import os; os.kill($harness_pid, 9)"), "contained"),
    Attack("kill_victim_nohook", _spawned("import os; os.kill($victim_pid, 9)"), "contained"),
    Attack("kill_minus_one_nohook", _spawned("import os; os.kill(-1, 9)"), "not passed"),
    # --- secrets in the environment and in /proc
    Attack("environment", "import os\nprint(dict(os.environ))\nprint(open('/proc/1/environ', 'rb').read())\n",
           "contained", SECRETS),
    Attack("proc_harness_environ", "print(open('/proc/$harness_pid/environ', 'rb').read())\n", "failed", SECRETS),
    # --- tampering with the harness: its files, inherited fds, the result channel
    Attack("write_every_fd", "import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'0' * 32)\n"
           "    except OSError: pass\n", "failed"),
    Attack("guess_nonce", "import os, secrets\nfor fd in range(3, 64):\n"
           "    try: os.write(fd, secrets.token_hex(16).encode())\n    except OSError: pass\n", "failed"),
    Attack("close_std_streams", "import os\nos.close(1)\nos.close(2)\nimport sys\nsys.exit(0)\n", "failed"),
    Attack("delete_own_dir_and_tmp", "import os, shutil\nshutil.rmtree(os.getcwd(), ignore_errors=True)\n"
           "try:\n    shutil.rmtree('/tmp')\nexcept OSError:\n    pass\n", "passed"),  # harmless: its own tmpfs
    # --- controls in the same batch: ordinary programs still pass next to the attacks
    Attack("control_tests_pass", "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\nprint('ok')\n",
           "passed"),
    Attack("control_own_files", "open('f.txt', 'w').write('hi')\nassert open('f.txt').read() == 'hi'\n", "passed"),
    # --- faking a pass (each would pass if the harness trusted the exit code)
    Attack("sys_exit_0", "import sys\nsys.exit(0)\nassert False\n", "failed"),
    Attack("os_exit_0", "import os\nos._exit(0)\nassert False\n", "failed"),
    Attack("atexit_exit_0", "import atexit, os\natexit.register(lambda: os._exit(0))\nassert False\n", "failed"),
    Attack("system_exit_in_finally", "try:\n    assert False\nfinally:\n    raise SystemExit(0)\n", "failed"),
    Attack("kill_self", "import signal\nsignal.raise_signal(signal.SIGKILL)\n", "failed"),
    Attack("thread_exit_0", "import os, threading, time\nthreading.Thread(target=lambda: os._exit(0)).start()\n"
           "time.sleep(5)\n", "failed"),
    Attack("alarm_exit_0", "import os, signal\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
           "signal.alarm(1)\nwhile True: pass\n", "failed"),
    Attack("excepthook", "import sys, os\nsys.excepthook = lambda *a: os._exit(0)\nassert False\n", "failed"),
    Attack("print_pass", "print('passed')\nprint('PASS: all tests passed')\nimport os\nos._exit(0)\n", "failed"),
]
