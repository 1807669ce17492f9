"""SSHTransport: `nephele agent call` on a node over SSH, through fabric (the only fabric user).

One fabric Connection per node, opened on first use and reused for every later call (a fresh connect
costs ~200 ms, a call on an open one ~90 ms). The request goes to the remote command's stdin (closed
after it, so the agent sees EOF), the response comes back on stdout, and stderr lines are forwarded as
progress while the command runs. Host keys: with `known_hosts` given, only keys in that file are
accepted; without it, fabric's default (the user's known_hosts, new hosts added).

The read-only ops (protocol.RESIDENT_OPS: observe, the listings) go instead to one resident agent per
connection (`nephele agent serve`, session.py), opened on first use: no process start per call. A
session that dies or times out is dropped with the connection and the call fails as before
(NodeUnreachable); a node whose nephele has no `serve` gets one process per call.
"""

from __future__ import annotations

import io
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut

from nephele.agent import protocol
from nephele.agent.daemon import DAEMON_ENV, socket_path
from nephele.agent.protocol import Request, Response
from nephele.agent.session import NoResidentAgent, NotServed, ResidentSession
from nephele.agent.transport import ProgressFn, _parse_reply, print_progress
from nephele.errors import AgentError, NodeUnreachable
from nephele.node.store import DEFAULT_ROOT, ROOT_ENV

DEFAULT_AGENT_COMMAND = "nephele agent call"
DEFAULT_SERVE_COMMAND = "nephele agent serve"


class _LineSink(io.TextIOBase):
    """A text stream that hands complete lines to a progress function (fabric writes in chunks)."""

    def __init__(self, sink: ProgressFn, tail: list[str]) -> None:
        self.sink = sink
        self.tail = tail
        self.buf = ""

    def write(self, s: str) -> int:
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self.tail.append(line)
            del self.tail[:-20]
            self.sink(line)
        return len(s)

    def flush(self) -> None:
        pass


class _WholeRequest(io.StringIO):
    """The request as fabric's stdin. invoke reads a stream that is not a TTY one byte per 10 ms poll,
    which made every call cost ~10 ms per byte of its request (seconds for a handoff's); this stream
    hands over everything left on the first read, then EOF."""

    def read(self, size: int | None = -1) -> str:
        return super().read()


class _QuickAckSocket(socket.socket):
    """A socket that acknowledges what it receives at once. sshd writes two small packets in a row after
    the login (its hostkeys notice, then the answer to the first channel open): Nagle holds the second
    until the first is acknowledged, and this end, with nothing to send while it waits, delayed that
    ACK by 40 ms: the first call on every new connection took ~45 ms longer than the next."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


def _nodelay_socket(conn: Connection, timeout: float) -> socket.socket:
    """The TCP connection for paramiko, with Nagle off. paramiko leaves it on, and its handshake writes
    two small packets in a row (NEWKEYS, then the userauth service request): the second waited for the
    node's delayed ACK, ~40 ms of every connect (to a cloudlet node: 70-115 ms before, 36-53 ms after)."""
    plain = socket.create_connection((conn.host, conn.port), timeout=timeout)
    sock = _QuickAckSocket(plain.family, plain.type, plain.proto, fileno=plain.detach())
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class SSHTransport:
    def __init__(
        self,
        host: str,
        *,
        node: str | None = None,
        user: str = "root",
        port: int = 22,
        key: str | Path | None = None,
        known_hosts: str | Path | None = None,
        connect_timeout: float = 10.0,
        timeout: float | None = None,
        agent_command: str = DEFAULT_AGENT_COMMAND,
        serve_command: str | None = DEFAULT_SERVE_COMMAND,
        env: dict[str, str] | None = None,
        daemon: bool = True,
    ) -> None:
        self.host = host
        self.node = node or host
        self.user = user
        self.port = port
        self.key = str(key) if key else None
        self.known_hosts = str(known_hosts) if known_hosts else None
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.agent_command = agent_command
        self.serve_command = serve_command  # None: one process per call for every op
        self.daemon = daemon  # reach the node's agent daemon first (daemon.py); False: a `serve` each
        self.env = dict(env or {})
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._session: ResidentSession | None = None
        self._no_serve_on: Connection | None = None  # the connection whose node has no `serve`

    def __repr__(self) -> str:
        return f"SSHTransport({self.user}@{self.host}:{self.port})"

    # ------------------------------------------------------------------------------- connection

    def _connection(self) -> Connection:
        if self._conn is not None and self._conn.is_connected:
            return self._conn
        connect_kwargs: dict[str, Any] = {
            "banner_timeout": self.connect_timeout,
            "auth_timeout": self.connect_timeout,
        }
        if self.key:
            connect_kwargs.update(key_filename=self.key, look_for_keys=False, allow_agent=False)
        conn = Connection(
            self.host,
            user=self.user,
            port=self.port,
            connect_timeout=self.connect_timeout,
            connect_kwargs=connect_kwargs,
        )
        if self.known_hosts:
            conn.client.load_host_keys(self.known_hosts)
            conn.client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            if not conn.gateway:
                conn.connect_kwargs = {
                    **conn.connect_kwargs,
                    "sock": _nodelay_socket(conn, self.connect_timeout),
                }
            conn.open()
        except paramiko.AuthenticationException as exc:
            raise AgentError(f"SSH login as {self.user} refused: {exc}", node=self.node) from None
        except paramiko.BadHostKeyException as exc:
            raise AgentError(f"SSH host key mismatch: {exc}", node=self.node) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise AgentError(
                    f"unknown SSH host key ({self.known_hosts}): {exc}", node=self.node
                ) from None
            raise NodeUnreachable(f"SSH to {self.host}:{self.port} failed: {exc}", node=self.node) from None
        except (TimeoutError, OSError) as exc:
            raise NodeUnreachable(
                f"cannot reach {self.host}:{self.port} over SSH: {exc}", node=self.node
            ) from None
        self._conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            self._close_session()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # ------------------------------------------------------------------------------------- calls

    def _command(self, command: str | None = None) -> str:
        prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{prefix} {command or self.agent_command}".strip()

    def _resident_commands(self) -> list[str]:
        """The commands a resident session may start with, in order: `socat` to the node's agent daemon
        (daemon.py) when its socket exists, else a `serve` of its own, asked (DAEMON_ENV, which an older
        nephele ignores) to start the daemon for the next connections; then, when the first ended
        without a hello (a stale socket: the daemon died), that `serve` alone. A command is followed by
        the next only when it never said hello, so a request runs at most once."""
        assert self.serve_command
        if not self.daemon:
            return [self._command(self.serve_command)]
        env = {**self.env, DAEMON_ENV: "1"}
        exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in sorted(env.items()))
        # The node's root as the node's agent will see it: ours if we pass one, else its environment's.
        sock = '"' + socket_path(f"${{{ROOT_ENV}:-{DEFAULT_ROOT}}}") + '"'
        attach = f"[ -S {sock} ] && exec socat -t 0 - UNIX-CONNECT:{sock}; "
        serve = f"exec {self.serve_command}"
        return [exports + attach + serve, exports + serve]

    def call(
        self, request: Request, *, timeout: float | None = None, progress: ProgressFn | None = None
    ) -> Response:
        timeout = timeout if timeout is not None else self.timeout
        tail: list[str] = []
        with self._lock:
            conn = self._connection()  # reconnects when the kept connection has died
            if (
                self.serve_command
                and request.get("op") in protocol.RESIDENT_OPS
                and self._no_serve_on is not conn
            ):
                response = self._call_resident(conn, request, timeout, progress)
                if response is not None:
                    return response
            try:
                result = conn.run(
                    self._command(),
                    in_stream=_WholeRequest(protocol.encode(request).decode()),
                    hide="stdout",
                    err_stream=_LineSink(progress or print_progress, tail),
                    warn=True,
                    timeout=timeout,
                )
            except CommandTimedOut:
                self._drop()
                raise NodeUnreachable(
                    f"the agent did not answer within {timeout:g} s", node=self.node
                ) from None
            except (paramiko.SSHException, EOFError, OSError) as exc:
                # Not retried: the op may have run, and ops such as run are not idempotent.
                self._drop()
                raise NodeUnreachable(f"SSH session to {self.host} failed: {exc}", node=self.node) from None
        return _parse_reply(result.stdout.encode(), result.exited, tail, self.node)

    def _call_resident(
        self, conn: Connection, request: Request, timeout: float | None, progress: ProgressFn | None
    ) -> Response | None:
        """The call through the connection's resident agent, or None when it must run in a process
        of its own (the agent does not serve the op, or the node has no resident agent)."""
        sess = self._session
        if sess is not None and not sess.usable(conn.transport):
            self._close_session()
            sess = None
        show = progress or print_progress
        try:
            if sess is not None:
                return sess.call(request, timeout=timeout, progress=show)
            *first, last = self._resident_commands()
            for command in first:
                try:
                    return self._open_session(conn, command).call(request, timeout=timeout, progress=show)
                except NoResidentAgent:
                    self._close_session()  # it never read the request: the next command may run it
            return self._open_session(conn, last).call(request, timeout=timeout, progress=show)
        except NotServed:
            return None
        except NoResidentAgent:
            self._close_session()
            self._no_serve_on = conn
            return None
        except AgentError:  # dead, stuck or out of step: the next call starts afresh
            self._drop()
            raise
        except (paramiko.SSHException, EOFError, OSError) as exc:
            self._drop()
            raise NodeUnreachable(f"SSH session to {self.host} failed: {exc}", node=self.node) from None

    def _open_session(self, conn: Connection, command: str) -> ResidentSession:
        self._session = ResidentSession(
            conn.transport, command, node=self.node, open_timeout=self.connect_timeout
        )
        return self._session

    @property
    def resident_pid(self) -> int | None:
        """The process id, on the node, of the resident agent this transport has open (None: none)."""
        return self._session.pid if self._session is not None else None

    def _close_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None

    def _drop(self) -> None:
        self._close_session()
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    # ------------------------------------------------------------------------------------- files

    def put_file(self, local: str | Path, remote: str) -> None:
        with self._lock:
            try:
                self._connection().put(str(local), remote)
            except (paramiko.SSHException, OSError) as exc:
                raise AgentError(
                    f"copy {local} -> {self.host}:{remote} failed: {exc}", node=self.node
                ) from None

    def get_file(self, remote: str, local: str | Path) -> None:
        with self._lock:
            try:
                self._connection().get(remote, str(local))
            except (paramiko.SSHException, OSError) as exc:
                raise AgentError(
                    f"copy {self.host}:{remote} -> {local} failed: {exc}", node=self.node
                ) from None

    # --------------------------------------------------------------------------- resumable files

    # A transfer that moves no byte for this long is a cut link (None: connect_timeout): it fails
    # with NodeUnreachable, so the reconciler retries it and the copy resumes where it stopped.
    stall_timeout: float | None = None

    def put_file_at(
        self, local: str | Path, remote: str, offset: int, *, rate_mbit: float | None = None
    ) -> int:
        """Write local[offset:] at `offset` of the remote file (ResumableFiles)."""
        return self._transfer_at(local, remote, offset, upload=True, rate_mbit=rate_mbit)

    def get_file_at(
        self, remote: str, local: str | Path, offset: int, *, rate_mbit: float | None = None
    ) -> int:
        """Write remote[offset:] at `offset` of the local file (ResumableFiles)."""
        return self._transfer_at(local, remote, offset, upload=False, rate_mbit=rate_mbit)

    def _transfer_at(
        self, local: str | Path, remote: str, offset: int, *, upload: bool, rate_mbit: float | None = None
    ) -> int:
        what = f"{local} -> {self.host}:{remote}" if upload else f"{self.host}:{remote} -> {local}"
        mode = "r+b" if offset else "wb"
        stall = self.stall_timeout or self.connect_timeout
        watch: _StallWatch | None = None
        with self._lock:
            try:
                conn = self._connection()
                sftp = conn.sftp()
                channel = sftp.get_channel()
                assert channel is not None
                channel.settimeout(stall)
                # paramiko retries a full socket forever: only closing the transport ends the wait.
                watch = _StallWatch(stall, conn.transport)
                try:
                    if upload:
                        with open(local, "rb") as src, sftp.open(remote, mode) as dst:
                            dst.set_pipelined(True)
                            return _pump(src, dst, offset, watch.tick, rate_mbit)
                    with sftp.open(remote, "rb") as src, open(local, mode) as dst:
                        src.seek(offset)
                        src.prefetch()  # pipelined reads from `offset` on
                        return _pump(src, dst, offset, watch.tick, rate_mbit)
                finally:
                    watch.stop()
                    channel.settimeout(None)
            except (TimeoutError, ConnectionError, EOFError, paramiko.SSHException, OSError) as exc:
                stalled = watch is not None and watch.fired
                if not stalled and not isinstance(
                    exc, (TimeoutError, ConnectionError, EOFError, paramiko.SSHException)
                ):
                    raise AgentError(f"copy {what} failed: {exc}", node=self.node) from None
                self._drop()  # the session is dead or stuck: the next call reconnects
                why = f"no byte moved for {stall:g} s" if stalled else str(exc) or type(exc).__name__
                raise NodeUnreachable(f"copy {what} broke off: {why}", node=self.node) from None


class _StallWatch:
    """Closes an SSH transport when a transfer moves no byte for `stall` seconds (a cut link)."""

    def __init__(self, stall: float, transport: Any) -> None:
        self.stall = stall
        self.transport = transport
        self.last = time.monotonic()
        self.fired = False
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="nephele-stall-watch", daemon=True).start()

    def tick(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(0.5, self.stall / 4)):
            if time.monotonic() - self.last > self.stall:
                self.fired = True
                self.transport.close()
                return


def _pump(
    src: Any,
    dst: Any,
    offset: int,
    tick: Callable[[], None],
    rate_mbit: float | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Copy src[offset:] to dst at offset, at most `rate_mbit` on average from the start (a cap:
    each chunk waits until the bytes so far fit the rate)."""
    src.seek(offset)
    dst.seek(offset)
    dst.truncate(offset)
    moved = 0
    t0 = clock()
    chunk_size = 256 << 10
    if rate_mbit:  # small chunks under a cap, so that it holds over short stretches too
        chunk_size = max(4 << 10, min(chunk_size, int(rate_mbit * 1e6 / 8 / 10)))
    while chunk := src.read(chunk_size):
        if rate_mbit:
            ahead = (moved + len(chunk)) * 8 / (rate_mbit * 1e6) - (clock() - t0)
            if ahead > 0:
                sleep(ahead)
        dst.write(chunk)
        moved += len(chunk)
        tick()
    return moved
