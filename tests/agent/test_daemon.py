"""The node's agent daemon (nephele/agent/daemon.py) on this machine, without SSH: it serves each unix-socket
connection from a child of its own, one daemon per socket (a second leaves, a stale socket is replaced),
and it leaves when idle, on SIGTERM, or when its socket is taken away; another uid gets nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nephele.agent import protocol
from nephele.agent.daemon import socket_path, start_in_background

START = (
    "import sys; from nephele.agent.daemon import run; "
    "sys.exit(run(sys.argv[1], idle=float(sys.argv[2]), check_every=0.1))"
)


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NEPHELE_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("NEPHELE_LIBVIRT_URI", "test:///default")
    return tmp_path / "root"


@pytest.fixture
def daemon(root: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(idle: float = 60.0, wait: bool = True) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-c", START, socket_path(root), str(idle)])
        started.append(p)
        if wait:
            until(lambda: Path(socket_path(root)).is_socket() and listening(root), "the daemon to listen")
        return p

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def until(pred: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def listening(root: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(socket_path(root))
        return True
    except OSError:
        return False


class Client:
    def __init__(self, root: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(socket_path(root))
        self.file = self.sock.makefile("rwb")
        self.hello = json.loads(self.file.readline())["serve"]

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.file.write(protocol.encode(protocol.make_request(op, args, request_id="r1")))
        self.file.flush()
        return dict(json.loads(self.file.readline()))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_each_connection_is_served_by_a_child_of_the_daemon(root: Path, daemon: Any) -> None:
    d = daemon()
    a, b = Client(root), Client(root)
    try:
        assert a.hello["pid"] != b.hello["pid"]
        assert ppid(a.hello["pid"]) == d.pid == ppid(b.hello["pid"])
        assert "observe" in a.hello["ops"]
        assert a.call("ping")["result"]["pong"] is True
        assert b.call("node.info")["result"]["pid"] == b.hello["pid"]
        # Not read-only: refused unrun, as by any resident agent.
        assert a.call("instance.stop", instance="x")["error"]["kind"] == "unsupported"
    finally:
        a.close()
        b.close()
    until(lambda: gone(a.hello["pid"]) and gone(b.hello["pid"]), "the children to end at EOF")
    assert d.poll() is None
    lock = Path(socket_path(root) + ".lock").read_text().split()
    assert lock == [str(d.pid)]
    assert os.stat(socket_path(root)).st_mode & 0o777 == 0o600
    assert os.stat(root / "run").st_mode & 0o777 == 0o700


def test_one_daemon_per_socket(root: Path, daemon: Any) -> None:
    first = daemon()
    second = daemon(wait=False)
    assert second.wait(timeout=10) == 0  # found the lock taken
    assert first.poll() is None
    c = Client(root)
    assert ppid(c.hello["pid"]) == first.pid
    c.close()


def test_a_stale_socket_is_replaced(root: Path, daemon: Any) -> None:
    old = daemon()
    old.kill()
    old.wait()
    assert Path(socket_path(root)).is_socket() and not listening(root)
    new = daemon()
    c = Client(root)
    assert ppid(c.hello["pid"]) == new.pid
    c.close()


def test_it_leaves_when_idle(root: Path, daemon: Any) -> None:
    d = daemon(idle=0.5)
    Client(root).close()
    assert d.wait(timeout=10) == 0
    assert not Path(socket_path(root)).exists()
    assert "leaving: idle" in Path(socket_path(root) + ".log").read_text()


def test_it_leaves_on_sigterm_and_when_its_socket_is_removed(root: Path, daemon: Any) -> None:
    d = daemon()
    d.send_signal(signal.SIGTERM)
    assert d.wait(timeout=5) == 0
    assert not Path(socket_path(root)).exists()
    d = daemon()
    os.unlink(socket_path(root))
    assert d.wait(timeout=10) == 0
    log = Path(socket_path(root) + ".log").read_text()
    assert "leaving: SIGTERM" in log and "leaving: socket removed or replaced" in log


def test_another_uid_gets_nothing(root: Path, daemon: Any) -> None:
    daemon()
    pid = os.fork()
    if pid == 0:  # a nobody process: refused by the directory's mode, else by the peer check
        code = 3
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(socket_path(root))
                code = 1 if s.recv(100) else 0
            except OSError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_start_in_background_detaches_one_daemon(root: Path) -> None:
    if not any(Path(p, "socat").exists() for p in os.environ["PATH"].split(":")):
        pytest.fail("socat not found: the agent daemon is reached through it (tools/bootstrap.sh)")
    t0 = time.monotonic()
    start_in_background(root)
    start_in_background(root)
    assert time.monotonic() - t0 < 2  # returns at once: the caller serves its own connection meanwhile
    until(lambda: listening(root), "the background daemon to listen")
    pid = int(Path(socket_path(root) + ".lock").read_text())
    try:
        assert ppid(pid) != os.getpid() and os.getsid(pid) != os.getsid(0)  # detached: a session of its own
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "nephele-agentd"
        assert not any(  # nothing of the caller's (its stdin, a pipe) held open
            os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:") for fd in os.listdir(f"/proc/{pid}/fd")
        )
        c = Client(root)
        assert ppid(c.hello["pid"]) == pid
        c.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        until(lambda: gone(pid), "the daemon to leave")
    assert "listening" in Path(socket_path(root) + ".log").read_text()
