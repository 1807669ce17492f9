"""The agent protocol: one JSON request in, one JSON response out (see docs/agent-protocol.md).

    request  {"v": 1, "id": "...", "op": "image.ls", "args": {...}}
    response {"v": 1, "id": "...", "ok": true,  "result": ...}
             {"v": 1, "id": "...", "ok": false, "error": {"kind": ..., "message": ..., "temporary": bool}}

The version is checked on both ends: a node never guesses what a newer controller meant, and a
controller never reads a newer node's answer as if it were its own. Errors raised on the node are
NodeError subclasses; their `kind` travels in the response and becomes a RemoteError here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from nephele.errors import NepheleError, ProtocolError, RemoteError

PROTOCOL_VERSION = 1
# The largest request or response either end reads. Requests are a few hundred bytes; responses are
# tens of KiB, the largest `node.logs` with lines=0 (the whole log: up to 25 MiB, escaped). The bound
# keeps a runaway or hostile peer from exhausting memory.
MAX_MESSAGE = 64 << 20

# Error kinds a node may send. Anything else is passed through as-is (a newer node may know more).
ERROR_KINDS = (
    "not_found",
    "conflict",
    "invalid_input",
    "no_space",
    "unsupported",
    "protocol",
    "internal",
    "node",
)

# The ops a resident agent (`nephele agent serve`, one process answering many requests) runs: read-only
# ones that start no thread, process or signal handler of their own, take no lock and keep nothing
# between requests, so the next request finds the process as the last one left it (libvirt's event loop
# thread, started once per process by the first op that opens libvirt, is shared by design). Any other op
# (building, importing, running, a handoff...) gets a fresh `nephele agent call` process.
RESIDENT_OPS = frozenset(
    {
        "ping",
        "node.info",
        "node.logs",
        "observe",
        "image.ls",
        "snapshot.ls",
        "instance.ls",
        "handoff.history",
    }
)

Request = dict[str, Any]
Response = dict[str, Any]


def make_request(op: str, args: Mapping[str, Any] | None = None, *, request_id: str | None = None) -> Request:
    return {
        "v": PROTOCOL_VERSION,
        "id": request_id or uuid.uuid4().hex[:12],
        "op": op,
        "args": dict(args or {}),
    }


def ok_response(request_id: Any, result: Any) -> Response:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_response(request_id: Any, kind: str, message: str, *, temporary: bool = False) -> Response:
    return {
        "v": PROTOCOL_VERSION,
        "id": request_id,
        "ok": False,
        "error": {"kind": kind, "message": message, "temporary": temporary},
    }


def error_response_for(request_id: Any, exc: NepheleError) -> Response:
    kind = str(getattr(exc, "kind", "internal"))
    return error_response(request_id, kind, str(exc), temporary=exc.temporary)


def encode(message: Mapping[str, Any]) -> bytes:
    return (json.dumps(message, separators=(",", ":"), sort_keys=True) + "\n").encode()


def decode(data: bytes | str, *, what: str, node: str | None = None) -> dict[str, Any]:
    """Parse one JSON object; anything else is a ProtocolError naming what was being read."""
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{what} is larger than {MAX_MESSAGE} bytes", node=node)
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    if not text.strip():
        raise ProtocolError(f"empty {what} (the agent printed nothing)", node=node)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        snippet = text.strip().splitlines()[0][:120] if text.strip() else ""
        raise ProtocolError(
            f"{what} is not JSON ({exc.msg} at char {exc.pos}): {snippet!r}", node=node
        ) from None
    except RecursionError:  # json's scanner recurses per nesting level: `[[[[...` exhausts the stack
        raise ProtocolError(f"{what} is nested too deeply to be a protocol message", node=node) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} is not a JSON object but {type(value).__name__}", node=node)
    return value


def check_version(message: Mapping[str, Any], *, what: str, node: str | None = None) -> None:
    v = message.get("v")
    if v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} speaks agent protocol version {v!r}, this nephele speaks {PROTOCOL_VERSION} "
            "(install the same nephele version on the controller and the node)",
            node=node,
        )


def validate_request(message: Mapping[str, Any]) -> tuple[Any, str, dict[str, Any]]:
    """Return (id, op, args) of a well-formed request, or raise ProtocolError."""
    check_version(message, what="request")
    op = message.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError("request has no 'op' string")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(f"request 'args' must be an object, not {type(args).__name__}")
    return message.get("id"), op, args


def result_of(response: Mapping[str, Any], request: Mapping[str, Any], *, node: str | None = None) -> Any:
    """The result of a response to `request`; a node-side error becomes RemoteError."""
    check_version(response, what="the agent's response", node=node)
    if response.get("id") != request.get("id"):
        raise ProtocolError(
            f"response id {response.get('id')!r} does not match request id {request.get('id')!r}", node=node
        )
    ok = response.get("ok")
    if ok is True:
        return response.get("result")
    if ok is False:
        err = response.get("error")
        if not isinstance(err, dict) or not isinstance(err.get("message"), str):
            raise ProtocolError("error response without an error object", node=node)
        raise RemoteError(
            str(err.get("kind", "internal")),
            err["message"],
            node=node,
            temporary=bool(err.get("temporary", False)),
        )
    raise ProtocolError("response has no boolean 'ok'", node=node)
