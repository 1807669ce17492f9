"""The controller's end of a resident agent (session.ResidentSession) on a local stand-in for an SSH
channel: a subprocess whose stdout and stderr arrive like a paramiko channel's (buffers, EOF, a
select()able fd). The SSH transport itself is tested on a cloudlet node in test_resident_ssh.py."""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from nephele.agent import protocol
from nephele.agent.session import NoResidentAgent, NotServed, ResidentSession
from nephele.errors import NodeUnreachable, ProtocolError


class PipeChannel:
    """The parts of paramiko.Channel a ResidentSession uses, over a local process."""

    def __init__(self) -> None:
        self.closed = False
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = {"out": bytearray(), "err": bytearray()}
        self._ended = {"out": False, "err": False}
        self._lock = threading.Lock()
        self._r, self._w = os.pipe()

    def exec_command(self, command: str) -> None:
        self.proc = subprocess.Popen(
            ["sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for key, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(key, stream), daemon=True).start()

    def _pump(self, key: str, stream: IO[bytes] | None) -> None:
        assert stream is not None
        for chunk in iter(lambda: os.read(stream.fileno(), 65536), b""):
            with self._lock:
                self._buf[key] += chunk
                os.write(self._w, b".")
        with self._lock:
            self._ended[key] = True
            os.write(self._w, b".")

    def _take(self, key: str, n: int) -> bytes:
        with self._lock:
            data = bytes(self._buf[key][:n])
            del self._buf[key][:n]
            if not self._buf["out"] and not self._buf["err"] and not self.eof_received:
                os.read(self._r, 1 << 16)  # nothing left to read: not readable until the next chunk
            return data

    def fileno(self) -> int:
        return self._r

    def sendall(self, data: bytes) -> None:
        # A channel takes data until it is closed, whether or not the remote process still reads.
        assert self.proc is not None and self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(data)
            self.proc.stdin.flush()

    def recv_ready(self) -> bool:
        return bool(self._buf["out"])

    def recv(self, n: int) -> bytes:
        return self._take("out", n)

    def recv_stderr_ready(self) -> bool:
        return bool(self._buf["err"])

    def recv_stderr(self, n: int) -> bytes:
        return self._take("err", n)

    @property
    def eof_received(self) -> bool:
        return self._ended["out"] and self._ended["err"]

    def exit_status_ready(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def recv_exit_status(self) -> int:
        assert self.proc is not None
        return self.proc.wait()

    def close(self) -> None:
        self.closed = True
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()


class LocalTransport:
    def __init__(self) -> None:
        self.channels: list[PipeChannel] = []

    def open_session(self, timeout: float | None = None) -> PipeChannel:
        chan = PipeChannel()
        self.channels.append(chan)
        return chan

    def is_active(self) -> bool:
        return True


@pytest.fixture
def transport() -> Iterator[LocalTransport]:
    t = LocalTransport()
    yield t
    for chan in t.channels:
        chan.close()
        if chan.proc is not None:
            chan.proc.kill()
            chan.proc.wait()


def session(transport: LocalTransport, script: str) -> ResidentSession:
    command = f"{sys.executable} -c {shlex.quote(textwrap.dedent(script))}"
    return ResidentSession(transport, command, node="n1", open_timeout=5)  # type: ignore[arg-type]


# A stand-in agent: the hello, then per request two progress lines on stderr and the response.
AGENT = """
    import json, os, sys, time
    ops = {ops!r}
    hello = {{"pid": os.getpid(), "ops": ops, "idle_timeout": {idle!r}}}
    print(json.dumps({{"v": 1, "serve": hello}}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "hang":
            time.sleep(60)
        if req["op"] == "die":
            sys.exit(3)
        if req["op"] not in ops:
            err = {{"kind": "unsupported", "message": "no", "temporary": False}}
            print(json.dumps({{"v": 1, "id": req["id"], "ok": False, "error": err}}), flush=True)
            continue
        for i in range(2):
            print(f"{{req['id']}} step {{i}}", file=sys.stderr, flush=True)
            time.sleep(0.01)
        print(json.dumps({{"v": 1, "id": req["id"], "ok": True, "result": os.getpid()}}), flush=True)
"""


def agent(ops: list[str] | None = None, idle: float | None = 120.0) -> str:
    return AGENT.format(ops=ops if ops is not None else ["ping", "observe", "hang", "die"], idle=idle)


def call(s: ResidentSession, op: str, progress: list[str] | None = None, timeout: float = 30) -> Any:
    seen = progress if progress is not None else []
    req = protocol.make_request(op)
    return protocol.result_of(s.call(req, timeout=timeout, progress=seen.append), req)


def test_one_process_many_calls_progress_before_each_answer(transport: LocalTransport) -> None:
    s = session(transport, agent())
    seen: list[str] = []
    pids = set()
    for _ in range(3):
        before = len(seen)
        pids.add(call(s, "ping", seen))
        # The progress lines of this call arrived before its answer returned.
        assert len(seen) - before == 2
    assert len(pids) == 1 and s.pid == pids.pop()
    assert s.calls == 3 and s.usable(transport)  # type: ignore[arg-type]
    assert all(" step " in line for line in seen)


def test_an_op_it_does_not_serve_is_not_served(transport: LocalTransport) -> None:
    s = session(transport, agent(ops=["ping"]))
    with pytest.raises(NotServed):  # sent before the hello came: its refusal is read and dropped
        call(s, "observe")
    assert isinstance(call(s, "ping"), int)
    with pytest.raises(NotServed):  # known from the hello: not even sent
        call(s, "observe")
    assert s.calls == 1


def test_no_hello_means_no_resident_agent(transport: LocalTransport) -> None:
    s = ResidentSession(
        transport,  # type: ignore[arg-type]
        "echo \"nephele agent: error: invalid choice: 'serve'\" >&2; exit 2",
        node="n1",
        open_timeout=5,
    )
    with pytest.raises(NoResidentAgent, match=r"status 2.*invalid choice"):
        call(s, "ping")


def test_a_stuck_agent_times_out(transport: LocalTransport) -> None:
    s = session(transport, agent())
    call(s, "ping")
    t0 = time.monotonic()
    with pytest.raises(NodeUnreachable, match="did not answer"):
        call(s, "hang", timeout=0.5)
    assert time.monotonic() - t0 < 5


def test_an_agent_that_dies_mid_call_is_unreachable_and_unusable(transport: LocalTransport) -> None:
    s = session(transport, agent())
    call(s, "ping")
    with pytest.raises(NodeUnreachable, match="ended before its response"):
        call(s, "die")
    deadline = time.monotonic() + 5
    while s.usable(transport) and time.monotonic() < deadline:  # type: ignore[arg-type]
        time.sleep(0.05)
    assert not s.usable(transport)  # type: ignore[arg-type]


def test_a_first_line_that_is_no_hello_is_a_protocol_error(transport: LocalTransport) -> None:
    s = session(transport, "print('Welcome to the node!', flush=True)\nimport time; time.sleep(30)")
    with pytest.raises(ProtocolError, match="hello"):
        call(s, "ping")


def test_an_idle_session_is_renewed_before_the_agent_leaves(transport: LocalTransport) -> None:
    s = session(transport, agent(idle=0.4))
    call(s, "ping")
    assert s.usable(transport)  # type: ignore[arg-type]
    time.sleep(0.3)  # over half its idle timeout
    assert not s.usable(transport)  # type: ignore[arg-type]


def test_the_real_resident_agent(transport: LocalTransport, tmp_path: Any) -> None:
    env = f"NEPHELE_ROOT={tmp_path} NEPHELE_LIBVIRT_URI=test:///default"
    s = ResidentSession(
        transport,  # type: ignore[arg-type]
        f"{env} {sys.executable} -m nephele agent serve",
        node="n1",
        open_timeout=5,
    )
    pids = {call(s, "node.info")["pid"] for _ in range(3)}
    assert pids == {s.pid}
    assert call(s, "observe")["reachable"] is True
    with pytest.raises(NotServed):
        call(s, "image.build")
