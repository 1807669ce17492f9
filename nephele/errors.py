"""The one exception tree of nephele. Every error a user can see is a NepheleError whose str() is the
message to print; the CLI maps the tree to exit codes and never shows a traceback for these.

    NepheleError
    ├── ManifestError            the manifest is invalid; .problems lists every FILE:LINE:COL problem
    ├── PlanError                a plan cannot be made or a saved plan cannot be applied
    │   └── StalePlanError       live state no longer matches a saved plan's preconditions
    ├── AgentError               reaching a node or talking to its agent failed
    │   ├── NodeUnreachable      (temporary) the node did not answer in time
    │   ├── ProtocolError        the agent answered something that is not the protocol
    │   └── RemoteError          the node ran the request and reported a typed error (.kind)
    ├── NodeError                raised on a node; travels back as RemoteError
    │   ├── NotFound             unknown image, snapshot or instance
    │   ├── Conflict             port in use, name taken, ambiguous title, lock held
    │   ├── InvalidInput         a file or argument that cannot be used as given
    │   └── NoSpace              the node's disk cannot hold what an operation would write (checked first)
    ├── DeltaError               the delta engine refused a stream or an image
    │   ├── StreamCorrupt        bytes do not parse; .offset says where in the stream
    │   ├── StreamTruncated      the stream ended before its trailer
    │   └── VerificationFailed   the rebuilt bytes do not match the sender's hashes
    ├── VmStateError             a QEMU migration stream or libvirt save image cannot be parsed
    ├── HandoffError             a handoff failed; the VM is still on the source (.detail says why)
    ├── LockHeld                 another apply holds the manifest's lock (message names the holder)
    └── CloudletError            the local test cloudlet cannot be set up or torn down

Retry policy is a property, not a class: `temporary` is True for errors worth retrying with backoff
(kopf's TemporaryError/PermanentError split, without a parallel tree).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class NepheleError(Exception):
    """Root of every error nephele raises on purpose. str(err) is the user-facing message."""

    temporary: bool = False
    exit_code: int = 1


@dataclass(frozen=True, order=True)
class Problem:
    """One problem found in a manifest, located in its source file."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ManifestError(NepheleError):
    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PlanError(NepheleError):
    pass


class StalePlanError(PlanError):
    pass


class AgentError(NepheleError):
    def __init__(self, message: str, *, node: str | None = None) -> None:
        self.node = node
        super().__init__(f"node {node}: {message}" if node else message)


class NodeUnreachable(AgentError):
    temporary = True


class ProtocolError(AgentError):
    pass


class RemoteError(AgentError):
    """A typed error raised on a node and carried back through the agent protocol."""

    def __init__(self, kind: str, message: str, *, node: str | None = None, temporary: bool = False) -> None:
        self.kind = kind
        self.temporary = temporary
        super().__init__(message, node=node)


class NodeError(NepheleError):
    """Raised by node-side code; `kind` is its wire name in the agent protocol."""

    kind = "node"


class NotFound(NodeError):
    kind = "not_found"


class Conflict(NodeError):
    kind = "conflict"


class InvalidInput(NodeError):
    kind = "invalid_input"


class NoSpace(NodeError):
    """Refused before writing: `path`'s file system has `free` bytes, the operation needs `needed`."""

    kind = "no_space"

    def __init__(self, message: str, *, path: str = "", needed: int = 0, free: int = 0) -> None:
        self.path, self.needed, self.free = path, needed, free
        super().__init__(message)


class DeltaError(NepheleError):
    pass


class StreamCorrupt(DeltaError):
    def __init__(self, message: str, *, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(f"{message} (at stream byte {offset})" if offset is not None else message)


class StreamTruncated(StreamCorrupt):
    pass


class VerificationFailed(DeltaError):
    pass


class VmStateError(NepheleError):
    pass


class HandoffError(NepheleError):
    pass


class CloudletError(NepheleError):
    pass


class LockHeld(NepheleError):
    """Another apply (or a crashed one) holds the lock; the message names it and how to break it."""
