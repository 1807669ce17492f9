"""How a request reaches a node's agent. The seam the rest of nephele talks to (httpx-style):

    AgentTransport.call(request) -> response      one JSON request/response, see protocol.py
    LocalTransport      `nephele agent call` as a subprocess on this machine
    SSHTransport        the same command on the node over SSH (fabric), in ssh.py
    FakeTransport       a plain function request -> response, for tests

Transports move bytes and report reachability (NodeUnreachable, ProtocolError); turning a response
into a result or a RemoteError is protocol.result_of's job, done by Agent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Protocol, runtime_checkable

from nephele.agent import protocol
from nephele.agent.protocol import Request, Response
from nephele.errors import NodeUnreachable, ProtocolError

ProgressFn = Callable[[str], None]


def print_progress(line: str) -> None:
    """Default progress sink: the node's stderr lines go to ours."""
    print(line, file=sys.stderr, flush=True)


@runtime_checkable
class AgentTransport(Protocol):
    node: str

    def call(
        self, request: Request, *, timeout: float | None = None, progress: ProgressFn | None = None
    ) -> Response:
        """Send one request, return the node's response. Raises NodeUnreachable or ProtocolError."""
        ...

    def put_file(self, local: str | Path, remote: str) -> None:
        """Copy a file from this machine to the node."""
        ...

    def get_file(self, remote: str, local: str | Path) -> None:
        """Copy a file from the node to this machine."""
        ...

    def close(self) -> None: ...


class _SameMachineFiles:
    """File copies for a node whose files are on this machine (FakeTransport, LocalTransport)."""

    def put_file(self, local: str | Path, remote: str) -> None:
        shutil.copyfile(local, remote)

    def get_file(self, remote: str, local: str | Path) -> None:
        shutil.copyfile(remote, local)

    def put_file_at(
        self, local: str | Path, remote: str, offset: int, *, rate_mbit: float | None = None
    ) -> int:
        return copy_from_offset(local, remote, offset)  # no link here: nothing to cap

    def get_file_at(
        self, remote: str, local: str | Path, offset: int, *, rate_mbit: float | None = None
    ) -> int:
        return copy_from_offset(remote, local, offset)

    def close(self) -> None:
        pass


class FakeTransport(_SameMachineFiles):
    """A transport whose node is a function. The handler may raise NodeUnreachable to fake an outage."""

    def __init__(self, handler: Callable[[Request], Response], node: str = "fake") -> None:
        self.handler = handler
        self.node = node
        self.requests: list[Request] = []

    def call(
        self, request: Request, *, timeout: float | None = None, progress: ProgressFn | None = None
    ) -> Response:
        self.requests.append(request)
        return self.handler(request)


def agent_command() -> list[str]:
    """The node-side entry point run by LocalTransport: this interpreter's nephele."""
    return [sys.executable, "-m", "nephele", "agent", "call"]


class LocalTransport(_SameMachineFiles):
    """Runs `nephele agent call` on this machine: request on stdin, response on stdout, progress lines
    on stderr (forwarded as they come, so a long image build shows what it is waiting for)."""

    def __init__(
        self,
        node: str = "local",
        *,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.node = node
        self.env = dict(env or {})
        self.command = list(command or agent_command())
        self.timeout = timeout

    def call(
        self, request: Request, *, timeout: float | None = None, progress: ProgressFn | None = None
    ) -> Response:
        timeout = timeout if timeout is not None else self.timeout
        sink = progress or print_progress
        # stderr goes through our own pipe: communicate() must not read it too (it would race the
        # progress reader for lines).
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err_w,
                env={**os.environ, **self.env},
            )
        except OSError as exc:
            os.close(err_r)
            raise NodeUnreachable(
                f"cannot start the agent {self.command[0]!r}: {exc}", node=self.node
            ) from exc
        finally:
            os.close(err_w)
        stderr_tail: list[str] = []
        err_stream = os.fdopen(err_r, "rb")
        reader = threading.Thread(target=_pump_lines, args=(err_stream, sink, stderr_tail), daemon=True)
        reader.start()
        try:
            out, _ = proc.communicate(protocol.encode(request), timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise NodeUnreachable(f"the agent did not answer within {timeout:g} s", node=self.node) from None
        reader.join(timeout=5)
        err_stream.close()
        return _parse_reply(out, proc.returncode, stderr_tail, self.node)


def _pump_lines(stream: IO[bytes], sink: ProgressFn, tail: list[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        tail.append(line)
        del tail[:-20]
        sink(line)


def _parse_reply(out: bytes, returncode: int | None, stderr_tail: list[str], node: str) -> Response:
    if not out.strip():
        detail = "; ".join(line for line in stderr_tail[-5:] if line.strip()) or "no output"
        raise ProtocolError(f"the agent exited with status {returncode} and no response: {detail}", node=node)
    # The response is the last line: anything printed before it by a library is not ours to parse.
    last = out.strip().splitlines()[-1]
    return protocol.decode(last, what="the agent's response", node=node)


# ------------------------------------------------------------------------------- resumable copies


@runtime_checkable
class ResumableFiles(Protocol):
    """A transport that can complete a file copy from an offset (reconcile's resumable copies): the
    bytes of the source from `offset` on are written at `offset` of the destination, which already
    holds the first `offset` bytes (offset 0: the destination is created or truncated). Returns the
    bytes moved. `rate_mbit` caps the rate on the node's link (the manifest's maxBandwidthMbit). A
    transport without these methods copies whole files only."""

    def put_file_at(
        self, local: str | Path, remote: str, offset: int, *, rate_mbit: float | None = None
    ) -> int: ...

    def get_file_at(
        self, remote: str, local: str | Path, offset: int, *, rate_mbit: float | None = None
    ) -> int: ...


def copy_from_offset(src: str | Path, dst: str | Path, offset: int) -> int:
    """ResumableFiles for two paths on this machine."""
    with open(src, "rb") as fin, open(dst, "r+b" if offset else "wb") as fout:
        fin.seek(offset)
        fout.seek(offset)
        fout.truncate()
        moved = 0
        while chunk := fin.read(1 << 20):
            fout.write(chunk)
            moved += len(chunk)
    return moved
