"""The attack suite: hostile programs in one parallel batch, judged by canaries on the host.

Every attack must end with the status it is listed with (:mod:`sandbox_attacks`), and the
batch as a whole must leave the host untouched: the escape directory holds exactly what it held,
the victim file is intact, no process an attack started survives, the host victim process and
the harness live, and no listener got a connection. One test shows the canaries would catch an
escape (the weak layer lets a hook-less child write outside).
"""

from __future__ import annotations

import os
import secrets
import select
import socket
import subprocess
import warnings
from pathlib import Path
from string import Template

import pytest
from sandbox_attacks import ATTACKS, Attack, _spawned

from mmllm.sandbox import isolation as iso
from mmllm.sandbox import run_program, run_programs

pytestmark = pytest.mark.skipif(bool(iso.bwrap_error()), reason=f"bubblewrap unusable: {iso.bwrap_error()}")
REPO = Path(__file__).resolve().parents[2]


class Host:
    """Canaries and listeners on the host, created for the suite and removed after."""

    def __init__(self, tmp: Path) -> None:
        token = secrets.token_hex(8)
        self.secret = f"mmllm-secret-{token}"
        self.marker = f"mmllm-attack-{token}"
        self.escape = tmp / "escape"
        self.escape.mkdir()
        self.escape.chmod(0o777)  # writable by anyone: only the mounts keep attacks out
        self.victim = self.escape / "victim.txt"
        self.victim.write_text("intact\n")
        self.victim.chmod(0o666)
        self.before = sorted(os.listdir(self.escape))
        self.repo_canary = REPO / f".sandbox-canary-{token}"
        self.home_canary = Path.home() / f".mmllm-sandbox-canary-{token}"
        for path in (self.repo_canary, self.home_canary):
            path.write_text(self.secret)
            path.chmod(0o644)
        self.tcp = socket.create_server(("127.0.0.1", 0))
        try:
            self.tcp6 = socket.create_server(("::1", 0), family=socket.AF_INET6)
        except OSError:  # no IPv6 on this host: the attack then meets no listener at all
            self.tcp6 = None
        self.unix_path = str(tmp / "listener.sock")
        self.unix = socket.socket(socket.AF_UNIX)
        self.unix.bind(self.unix_path)
        self.unix.listen()
        self.abstract = f"mmllm-canary-{token}"
        self.abstract_sock = socket.socket(socket.AF_UNIX)
        self.abstract_sock.bind("\0" + self.abstract)
        self.abstract_sock.listen()
        self.victim_proc = subprocess.Popen(["sleep", "300"])
        self.interfaces = [name for _, name in socket.if_nameindex() if name != "lo"]

    def values(self) -> dict[str, str]:
        return {"escape": str(self.escape), "victim": str(self.victim), "secret": self.secret,
                "marker": self.marker, "repo_canary": str(self.repo_canary),
                "home_canary": str(self.home_canary), "tcp_port": str(self.tcp.getsockname()[1]),
                "tcp6_port": str(self.tcp6.getsockname()[1] if self.tcp6 else 9),
                "unix_path": self.unix_path, "abstract": self.abstract,
                "victim_pid": str(self.victim_proc.pid), "harness_pid": str(os.getpid())}

    def source(self, attack: Attack) -> str:
        return Template(attack.source).substitute(self.values())

    def absent(self, attack: Attack) -> list[str]:
        out = []
        for text in attack.absent:
            out += self.interfaces if text == "$host_interfaces" else [Template(text).substitute(self.values())]
        return out

    def survivors(self) -> list[str]:
        """Host processes whose command line carries the attacks' marker."""
        found = []
        for entry in os.scandir("/proc"):
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if self.marker.encode() in cmdline and entry.name != str(os.getpid()):
                found.append(f"{entry.name}: {cmdline!r}")
        return found

    def connections(self) -> list[str]:
        listeners = [s for s in (self.tcp, self.tcp6, self.unix, self.abstract_sock) if s is not None]
        readable, _, _ = select.select(listeners, [], [], 0)
        return [str(s) for s in readable]

    def close(self) -> None:
        self.victim_proc.kill()
        self.victim_proc.wait()
        for s in (self.tcp, self.tcp6, self.unix, self.abstract_sock):
            if s is not None:
                s.close()
        for path in (self.repo_canary, self.home_canary):
            path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory.mktemp("sandbox-host"))
    os.environ["MMLLM_SANDBOX_CANARY"] = h.secret  # must not reach any program
    try:
        yield h
    finally:
        os.environ.pop("MMLLM_SANDBOX_CANARY", None)
        h.close()


@pytest.fixture(scope="module")
def results(host):
    """Runs every attack once, 4 at a time, with short limits."""
    res = run_programs([host.source(a) for a in ATTACKS], n_workers=4, timeout=3.0, memory_mb=512,
                       max_output_mb=1.0, progress=False, isolation="bwrap")
    return dict(zip([a.name for a in ATTACKS], res))


def test_at_least_30_distinct_attacks():
    names = [a.name for a in ATTACKS]
    assert len(set(names)) == len(names) and sum(not n.startswith("control") for n in names) >= 30


@pytest.mark.parametrize("attack", ATTACKS, ids=lambda a: a.name)
def test_attack_outcome(attack, results, host):
    res = results[attack.name]
    detail = f"{res.status} ({res.reason}); stdout={res.stdout[:300]!r} stderr={res.stderr[-600:]!r}"
    assert res.isolation == "bwrap" and res.status != "error", detail
    allowed = {"failed": {"failed"}, "timeout": {"timeout"}, "not passed": {"failed", "timeout"},
               "passed": {"passed"}, "contained": {"passed", "failed", "timeout"}}[attack.expect]
    assert res.status in allowed, detail
    for text in host.absent(attack):
        assert text not in res.stdout and text not in res.stderr, f"{text!r} leaked: {detail}"
    assert len(res.stdout) <= 8192 and len(res.stderr) <= 8192


def test_the_host_is_untouched(results, host):
    """After the whole batch: no file outside, no survivor, no connection, victims alive."""
    assert len(results) == len(ATTACKS)
    assert sorted(os.listdir(host.escape)) == host.before
    assert host.victim.read_text() == "intact\n"
    assert host.survivors() == []
    assert host.connections() == []
    assert host.victim_proc.poll() is None
    assert host.repo_canary.read_text() == host.secret


def test_siblings_cannot_see_or_signal_each_other(host):
    """A killer runs kill(-1) in a loop and scans /proc beside two sleepers; both still pass."""
    sleeper = f"import time\ntime.sleep(1.5)\nprint('{host.marker}-sleeper')\n"
    killer = _spawned("import os, time\nseen = set()\nend = time.time() + 1.5\nwhile time.time() < end:\n"
                      "    for p in filter(str.isdigit, os.listdir('/proc')):\n"
                      "        try: seen.add(open(f'/proc/{p}/cmdline', 'rb').read())\n"
                      "        except OSError: pass\n"
                      "    try: os.kill(-1, 9)\n    except OSError: pass\n"
                      "print(len(seen), [c for c in seen if b'sleeper' in c])")
    res = run_programs([Template(killer).substitute(host.values()), sleeper, sleeper], n_workers=3,
                       timeout=10.0, progress=False, isolation="bwrap")
    assert [r.status for r in res[1:]] == ["passed", "passed"], [r.stderr[-300:] for r in res]
    assert res[0].status != "passed"  # kill(-1) took down the killer's own sandbox, nothing else


def test_canaries_catch_an_escape_from_the_weak_layer(host):
    """Without bubblewrap the same hook-less write lands on the host: the canaries can fail."""
    path = host.escape / "weak-escape"
    attack = _spawned(f"open('{path}', 'w').write('x')")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_program(Template(attack).substitute(host.values()), isolation="none", timeout=10.0)
    try:
        assert path.exists()
    finally:
        path.unlink(missing_ok=True)


def test_known_residual_a_program_aimed_at_this_harness_can_forge_a_pass():
    """Documented limit (mmllm.sandbox docstring): the tests share the program's process, so a
    program that knows the protocol can take the nonce from its input pipe and forge the
    epilogue. Were this ever to fail, the protocol got stronger: update the docs."""
    # The child's pipe ends sit at fixed fds: 3 (program + nonce in), 4 (result out).
    forger = "import os\nos.write(4, os.read(3, 32))\nos._exit(0)\nassert False\n"
    assert run_program(forger, isolation="bwrap").passed


def test_fd_attacks_see_the_same_layout_when_the_harness_holds_many_fds():
    """The child moves its pipe ends to fds 3 and 4: an attack on inherited fds is judged the same
    in a long-running harness (CI's pytest holds >60 fds) as in a fresh one."""
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(120)]
    try:
        tamper = next(a for a in ATTACKS if a.name == "write_every_fd")
        assert run_program(tamper.source, timeout=20).status == "failed"
        assert run_program("assert 1 + 1 == 2\n", timeout=20).status == "passed"
    finally:
        for fd in held:
            os.close(fd)
