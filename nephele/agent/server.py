"""The node side of the protocol (docs/agent-protocol.md), two ways:

`nephele agent call` (serve_one): one request on stdin, one response line on stdout, then exit. Every op
runs this way unless listed below.

`nephele agent serve` (serve): a resident agent for one controller connection. It first writes a hello
line, then answers newline-delimited requests, one response line each, until EOF, SIGHUP/SIGTERM or
`idle_timeout` seconds without a request. It answers only protocol.RESIDENT_OPS, the read-only ops that
leave nothing behind in a long-lived process; any other op is refused (`unsupported`) without running.

Both: progress goes to stderr; nothing else may touch stdout, so library prints are redirected to stderr
while an op runs. NodeError subclasses keep their kind (not_found, conflict, invalid_input, node); any
other NepheleError is `node`; an unexpected exception is `internal`, logged with its traceback in
<root>/nephele.log, and never crashes the agent without a response.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import IO, Any

from nephele import __version__
from nephele.agent import protocol
from nephele.errors import NepheleError, NodeError, ProtocolError
from nephele.node.hypervisor import Hypervisor
from nephele.node.ops import OPS, Op
from nephele.node.runtime import NodeContext

log = logging.getLogger("nephele.agent")

# A resident agent nobody talks to exits after this long: a controller that vanished without closing
# its SSH connection (a cut link), or keeps a connection open it no longer uses, would otherwise keep a
# Python process (~35 MiB) on the node until TCP gives up, hours later. Controllers call in bursts (a plan,
# an apply, a watch run) and renew a session idle for half this long.
IDLE_TIMEOUT = 120.0


def lookup(op: str) -> Op | None:
    """The implementation of a wire op. The handoff ops are imported only when one is asked for: their
    package loads the controller side of a handoff (channels, cryptography), ~20 ms of every start-up."""
    fn = OPS.get(op)
    if fn is None and op.startswith("handoff."):
        from nephele.handoff.ops import HANDOFF_OPS

        fn = HANDOFF_OPS.get(op)
    return fn


def _known_ops() -> list[str]:
    from nephele.handoff.ops import HANDOFF_OPS

    return sorted({*OPS, *HANDOFF_OPS})


def handle(
    message: Mapping[str, Any],
    *,
    progress: Any = None,
    ops: Mapping[str, Op] | None = None,
    context: Callable[[str | None, Any], NodeContext] | None = None,
) -> protocol.Response:
    """Run one request (already decoded) and return its response. Never raises for a bad request.
    `ops` replaces the node's op table; `context(root, progress)` makes the op's NodeContext."""
    rid = message.get("id")
    try:
        rid, op, args = protocol.validate_request(message)
    except ProtocolError as exc:
        return protocol.error_response(rid, "protocol", str(exc))
    fn = lookup(op) if ops is None else ops.get(op)
    if fn is None:
        known = ", ".join(_known_ops() if ops is None else sorted(ops))
        return protocol.error_response(rid, "unsupported", f"unknown op {op!r} (this node knows: {known})")
    args = dict(args)
    root = args.pop("root", None)
    if root is not None and (not isinstance(root, str) or not root or "\0" in root):
        # "" would be the agent's working directory; only a real path or the default will do.
        why = f"request 'args.root' must be a path, not {root!r:.80}"
        return protocol.error_response(rid, "protocol", why)
    try:
        ctx = NodeContext(root, progress=progress) if context is None else context(root, progress)
    except OSError as exc:
        return protocol.error_response(rid, "node", f"cannot use node root {root or '(default)'}: {exc}")
    try:
        return protocol.ok_response(rid, fn(ctx, args))
    except NepheleError as exc:
        ctx.log.info("%s failed: %s", op, exc)
        kind = exc.kind if isinstance(exc, NodeError) else "node"
        return protocol.error_response(rid, kind, str(exc), temporary=exc.temporary)
    except Exception as exc:
        ctx.log.error("%s: internal error\n%s", op, traceback.format_exc())
        return protocol.error_response(
            rid,
            "internal",
            f"internal error in {op}: {type(exc).__name__}: {exc} (traceback in {ctx.store.log_file})",
        )
    finally:
        ctx.close()


def _raise_on_signal(signum: int, _frame: Any) -> None:
    # The controller went away (SSH closed) or asked us to stop: unwind so `finally` blocks clean up.
    raise KeyboardInterrupt(f"signal {signum}")


def _stop_on_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)


def _write(stdout: IO[bytes], message: Mapping[str, Any]) -> bool:
    """Write one line; False when the controller has gone (nobody left to answer)."""
    try:
        stdout.write(protocol.encode(message))
        stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.close(stdout.fileno())
        return False
    return True


def _answer(message: Mapping[str, Any], stderr: IO[str], **kw: Any) -> tuple[protocol.Response, bool]:
    """handle() with stray prints sent to stderr; (response, whether a signal interrupted the op)."""

    def progress(line: str) -> None:
        print(line, file=stderr, flush=True)

    real_stdout = sys.stdout
    sys.stdout = stderr  # keep stray prints out of the response channel
    try:
        return handle(message, progress=progress, **kw), False
    except KeyboardInterrupt as exc:
        return protocol.error_response(message.get("id"), "interrupted", f"interrupted ({exc})"), True
    finally:
        sys.stdout = real_stdout


def serve_one(stdin: IO[bytes], stdout: IO[bytes], stderr: IO[str]) -> int:
    """Read one request, write one response. Exit status 0 whenever a response was written."""
    _stop_on_signals()
    data = stdin.read(protocol.MAX_MESSAGE + 1)  # a bigger request is refused unread, not buffered
    try:
        message = protocol.decode(data, what="request")
    except ProtocolError as exc:
        response = protocol.error_response(None, "protocol", str(exc))
    else:
        response, _ = _answer(message, stderr)
    return 0 if _write(stdout, response) else 1


# --------------------------------------------------------------------------------- resident agent


class _TooLong:
    """A request line longer than protocol.MAX_MESSAGE (its bytes are skipped up to its newline)."""


class LineReader:
    """Newline-delimited requests from a file descriptor, each at most `limit` bytes. Reads the fd
    directly (no buffered file object), so waiting for the next line can time out with select."""

    def __init__(self, fd: int, limit: int = protocol.MAX_MESSAGE) -> None:
        self.fd = fd
        self.limit = limit
        self.buf = bytearray()
        self.scanned = 0  # no newline in buf[:scanned]
        self.skipping = False  # inside an over-long line: drop bytes up to its newline
        self.eof = False

    def readline(self, timeout: float | None) -> bytes | type[_TooLong] | None:
        """The next line without its newline (the last may lack one), _TooLong, or None at EOF.
        Raises TimeoutError when no complete line came within `timeout` seconds."""
        while True:
            nl = self.buf.find(b"\n", self.scanned)
            if nl >= 0:
                line = bytes(self.buf[:nl])
                del self.buf[: nl + 1]
                self.scanned = 0
                if self.skipping:
                    self.skipping = False
                    continue
                return line
            self.scanned = len(self.buf)
            if self.skipping:
                self.buf.clear()
                self.scanned = 0
            elif len(self.buf) > self.limit:
                self.buf.clear()
                self.scanned = 0
                self.skipping = True
                return _TooLong
            if self.eof:
                if self.buf and not self.skipping:
                    line = bytes(self.buf)
                    self.buf.clear()
                    self.scanned = 0
                    return line
                return None
            ready, _, _ = select.select([self.fd], [], [], timeout)
            if not ready:
                raise TimeoutError
            chunk = os.read(self.fd, 1 << 16)
            if chunk:
                self.buf += chunk
            else:
                self.eof = True


class _SharedHypervisor:
    """One libvirt connection for all requests of a resident agent, reopened when it has died (libvirtd
    restarted). Opening one costs the node a round trip and libvirtd a client set-up per request."""

    def __init__(self) -> None:
        self.hv: Hypervisor | None = None

    def get(self) -> Hypervisor:
        if self.hv is not None and not _alive(self.hv):
            self.close()
        if self.hv is None:
            self.hv = Hypervisor()
        return self.hv

    def close(self) -> None:
        if self.hv is not None:
            self.hv.close()
            self.hv = None


def _alive(hv: Hypervisor) -> bool:
    try:
        return bool(hv.conn.isAlive())
    except Exception:  # libvirt raises its own error type for a closed connection
        return False


class _ResidentContext(NodeContext):
    """A NodeContext whose hypervisor belongs to the serve loop: used, never closed, by the op."""

    def __init__(self, root: str | None, progress: Any, shared: _SharedHypervisor) -> None:
        super().__init__(root, progress=progress)
        self._shared = shared

    @property
    def hv(self) -> Hypervisor:
        return self._shared.get()


def resident_ops() -> dict[str, Op]:
    table = {}
    for name in sorted(protocol.RESIDENT_OPS):
        fn = lookup(name)
        if fn is not None:
            table[name] = fn
    return table


def _parse_line(line: bytes, table: Mapping[str, Op]) -> tuple[Mapping[str, Any], protocol.Response | None]:
    """(request, None) for a request to run; (_, answer) for a line the resident agent must not run:
    malformed, or an op it does not serve."""
    message: Mapping[str, Any] = {}
    try:
        message = protocol.decode(line, what="request")
        rid, op, _ = protocol.validate_request(message)
    except ProtocolError as exc:
        return message, protocol.error_response(message.get("id"), "protocol", str(exc))
    if op in table:
        return message, None
    if lookup(op) is None:
        why = f"unknown op {op!r} (this node knows: {', '.join(_known_ops())})"
    else:
        why = f"op {op!r} is not served by a resident agent (`nephele agent call` runs it)"
    return message, protocol.error_response(rid, "unsupported", why)


def serve(
    stdin: IO[bytes],
    stdout: IO[bytes],
    stderr: IO[str],
    *,
    idle_timeout: float | None = IDLE_TIMEOUT,
    ops: Mapping[str, Op] | None = None,
    keep_hypervisor: bool = True,
) -> int:
    """The resident agent's loop (module docstring). Returns 0 at EOF, on SIGHUP/SIGTERM and after
    `idle_timeout`; 1 when the controller stopped reading."""
    _stop_on_signals()
    table = resident_ops() if ops is None else dict(ops)
    hello = {
        "v": protocol.PROTOCOL_VERSION,
        "serve": {
            "pid": os.getpid(),
            "nephele": __version__,
            "ops": sorted(table),
            "idle_timeout": idle_timeout,
        },
    }
    shared = _SharedHypervisor()

    def context(root: str | None, progress: Any) -> NodeContext:
        if keep_hypervisor:
            return _ResidentContext(root, progress, shared)
        return NodeContext(root, progress=progress)

    reader = LineReader(stdin.fileno())
    try:
        if not _write(stdout, hello):
            return 1
        while True:
            try:
                line = reader.readline(idle_timeout)
            except TimeoutError:
                return 0
            if line is None:
                return 0
            if line is _TooLong:
                response = protocol.error_response(
                    None, "protocol", f"request is larger than {protocol.MAX_MESSAGE} bytes"
                )
                stopped = False
            else:
                assert isinstance(line, bytes)
                message, refusal = _parse_line(line, table)
                if refusal is None:
                    response, stopped = _answer(message, stderr, ops=table, context=context)
                else:
                    response, stopped = refusal, False
            if not _write(stdout, response):
                return 1
            if stopped:
                return 0
    except KeyboardInterrupt:  # a signal while waiting for the next request
        return 0
    finally:
        with contextlib.suppress(Exception):
            shared.close()
