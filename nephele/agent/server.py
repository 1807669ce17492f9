"""The node side of the protocol: `nephele agent call` reads one request on stdin, runs the op in
nephele.node and writes one response line on stdout. Progress goes to stderr; nothing else may touch
stdout, so library prints are redirected to stderr while the op runs.

Errors: NodeError subclasses keep their kind (not_found, conflict, invalid_input, node); any other
NepheleError is `node`; an unexpected exception is `internal`, logged with its traceback in
<root>/nephele.log, and never crashes the agent without a response.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Mapping
from typing import IO, Any

from nephele.agent import protocol
from nephele.errors import NepheleError, NodeError, ProtocolError
from nephele.handoff.ops import HANDOFF_OPS
from nephele.node.ops import OPS, Op
from nephele.node.runtime import NodeContext

log = logging.getLogger("nephele.agent")


def handle(
    message: Mapping[str, Any],
    *,
    progress: Any = None,
    ops: Mapping[str, Op] | None = None,
) -> protocol.Response:
    """Run one request (already decoded) and return its response. Never raises for a bad request."""
    table = {**OPS, **HANDOFF_OPS} if ops is None else ops
    rid = message.get("id")
    try:
        rid, op, args = protocol.validate_request(message)
    except ProtocolError as exc:
        return protocol.error_response(rid, "protocol", str(exc))
    fn = table.get(op)
    if fn is None:
        known = ", ".join(sorted(table))
        return protocol.error_response(rid, "unsupported", f"unknown op {op!r} (this node knows: {known})")
    args = dict(args)
    root = args.pop("root", None)
    if root is not None and (not isinstance(root, str) or not root or "\0" in root):
        # "" would be the agent's working directory; only a real path or the default will do.
        why = f"request 'args.root' must be a path, not {root!r:.80}"
        return protocol.error_response(rid, "protocol", why)
    try:
        ctx = NodeContext(root, progress=progress)
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


def serve_one(stdin: IO[bytes], stdout: IO[bytes], stderr: IO[str]) -> int:
    """Read one request, write one response. Exit status 0 whenever a response was written."""

    def progress(line: str) -> None:
        print(line, file=stderr, flush=True)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_on_signal)
    data = stdin.read(protocol.MAX_MESSAGE + 1)  # a bigger request is refused unread, not buffered
    try:
        message = protocol.decode(data, what="request")
    except ProtocolError as exc:
        response = protocol.error_response(None, "protocol", str(exc))
    else:
        real_stdout = sys.stdout
        sys.stdout = stderr  # keep stray prints out of the response channel
        try:
            response = handle(message, progress=progress)
        except KeyboardInterrupt as exc:
            response = protocol.error_response(message.get("id"), "interrupted", f"interrupted ({exc})")
        finally:
            sys.stdout = real_stdout
    try:
        stdout.write(protocol.encode(response))
        stdout.flush()
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            os.close(stdout.fileno())
        return 1
    return 0
