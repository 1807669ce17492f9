"""The controller's end of a resident agent: one `nephele agent serve` process on a node, on its own
channel of an open SSH connection, answering the read-only ops (protocol.RESIDENT_OPS) one JSON line
each. A call then costs the node one op, not a Python start-up, an import of nephele and an SSH exec.

    session = ResidentSession(paramiko_transport, "nephele agent serve", node="edge-a")
    session.call(request, timeout=30, progress=print)  -> response
        NotServed         the node's agent does not serve this op (nothing ran: use `agent call`)
        NoResidentAgent   the node has no `serve` (an older nephele: the command ended at once; nothing ran)
        NodeUnreachable   the session died or timed out (the op may have run): drop it, open a new one
        ProtocolError     the session's output is not this protocol: drop it

The node writes a hello line before it reads any request, so a session that ends without one never saw
the request: the fallback to one process per call is safe even for the request already sent.
"""

from __future__ import annotations

import contextlib
import select
import time
from typing import Any

import paramiko

from nephele.agent import protocol
from nephele.agent.protocol import Request, Response
from nephele.agent.transport import ProgressFn
from nephele.errors import NodeUnreachable, ProtocolError


class NotServed(Exception):
    """The resident agent does not run this op; it was not run."""


class NoResidentAgent(Exception):
    """The node's nephele has no resident agent (no hello); the request was not run."""


class ResidentSession:
    def __init__(
        self, transport: paramiko.Transport, command: str, *, node: str, open_timeout: float
    ) -> None:
        self.node = node
        self.transport = transport
        self.chan = transport.open_session(timeout=open_timeout)
        self.chan.exec_command(command)
        self.hello: dict[str, Any] | None = None
        self.calls = 0
        self.last_used = time.monotonic()
        self._out = bytearray()
        self._err = bytearray()
        self.stderr_tail: list[str] = []

    @property
    def pid(self) -> int | None:
        return self.hello.get("pid") if self.hello else None

    def usable(self, transport: paramiko.Transport | None) -> bool:
        """Whether the next call may go through this session: same live connection, agent still
        running, and not idle for so long that the agent may be about to leave (its idle timeout)."""
        if transport is not self.transport or not transport.is_active():
            return False
        if self.chan.closed or self.chan.eof_received or self.chan.exit_status_ready():
            return False
        idle = self.hello.get("idle_timeout") if self.hello else None
        return not (isinstance(idle, int | float) and time.monotonic() - self.last_used > idle / 2)

    def close(self) -> None:
        # EOF on its stdin ends the agent (and closing the channel tells sshd to end the session).
        with contextlib.suppress(Exception):  # already broken: nothing left to close
            self.chan.close()

    # ------------------------------------------------------------------------------------- calls

    def call(self, request: Request, *, timeout: float | None, progress: ProgressFn) -> Response:
        op = request.get("op")
        if self.hello is not None and op not in self.hello["ops"]:
            raise NotServed(op)
        deadline = None if timeout is None else time.monotonic() + timeout
        self.last_used = time.monotonic()
        try:
            self.chan.sendall(protocol.encode(request))
        except (OSError, EOFError, paramiko.SSHException) as exc:
            if self.hello is None:  # it ended before reading anything, or never started
                raise NoResidentAgent(f"cannot send to the resident agent: {exc}") from None
            raise NodeUnreachable(f"resident agent session failed: {exc}", node=self.node) from None
        if self.hello is None:
            self.hello = self._read_hello(deadline, progress)
            if op not in self.hello["ops"]:
                self._read_line(deadline, progress, what="response")  # its refusal: the op did not run
                raise NotServed(op)
        line = self._read_line(deadline, progress, what="response")
        self.calls += 1
        self.last_used = time.monotonic()
        response = protocol.decode(line, what="the agent's response", node=self.node)
        if "serve" in response and "id" not in response:
            # A second hello: the node's connector fell back to a new agent after this one broke off.
            raise NodeUnreachable("the resident agent ended in the middle of the call", node=self.node)
        return response

    def _read_hello(self, deadline: float | None, progress: ProgressFn) -> dict[str, Any]:
        try:
            line = self._read_line(deadline, progress, what="hello")
        except NodeUnreachable:
            if self.chan.eof_received or self.chan.closed:
                status = self._exit_status(wait=1.0)
                said = "; ".join(x for x in self.stderr_tail[-3:] if x.strip()) or "no output"
                raise NoResidentAgent(f"exited with status {status}: {said}") from None
            raise
        message = protocol.decode(line, what="the resident agent's hello", node=self.node)
        protocol.check_version(message, what="the resident agent", node=self.node)
        hello = message.get("serve")
        if not isinstance(hello, dict) or not isinstance(hello.get("ops"), list):
            raise ProtocolError(
                f"the resident agent's first line is not a hello: {line[:120]!r}", node=self.node
            )
        return hello

    def _exit_status(self, wait: float) -> int | None:
        # The exit status may come just after the EOF.
        deadline = time.monotonic() + wait
        while not self.chan.exit_status_ready():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        return int(self.chan.recv_exit_status())

    def _read_line(self, deadline: float | None, progress: ProgressFn, *, what: str) -> bytes:
        """The next stdout line; stderr lines go to `progress` as they come. NodeUnreachable when the
        session ends or the deadline passes first."""
        chan = self.chan
        while True:
            nl = self._out.find(b"\n")
            if nl >= 0:
                line = bytes(self._out[:nl])
                del self._out[: nl + 1]
                return line
            self._drain_stderr(progress)
            if chan.recv_ready():
                self._out += chan.recv(1 << 16)
                if len(self._out) > protocol.MAX_MESSAGE:
                    raise ProtocolError(f"{what} is larger than {protocol.MAX_MESSAGE} bytes", node=self.node)
                continue
            if chan.eof_received or chan.closed:
                self._drain_stderr(progress)
                raise NodeUnreachable(f"the resident agent ended before its {what}", node=self.node)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise NodeUnreachable(
                    f"the resident agent did not answer within the timeout ({what})", node=self.node
                )
            # The channel's fd is readable while it holds stdout or stderr data, or has ended.
            select.select([chan], [], [], remaining)

    def _drain_stderr(self, progress: ProgressFn) -> None:
        while self.chan.recv_stderr_ready():
            self._err += self.chan.recv_stderr(1 << 16)
        while (nl := self._err.find(b"\n")) >= 0:
            line = self._err[:nl].decode(errors="replace")
            del self._err[: nl + 1]
            self.stderr_tail.append(line)
            del self.stderr_tail[:-20]
            progress(line)
