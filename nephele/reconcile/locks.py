"""The apply lock: one apply at a time per manifest (Terraform's state lock).

The lock is a file in the manifest's state directory, created with O_EXCL so that two applies racing
for it cannot both win. It records who holds it (user@host, pid, since, operation) and an id; a second
apply fails at once with a message naming the holder. A lock left by a crashed apply stays until
`nephele force-unlock LOCK_ID -f MANIFEST` removes it: nephele never breaks a lock by itself, but it
says when the holder's process is gone (same host, pid not running), so the user knows it is stale.

Scope: the lock lives on the controller, so it serialises applies that share a state directory (the
normal case: one checkout of the manifest's repo, or one $NEPHELE_STATE_DIR). The nodes run no lock op.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nephele.errors import LockHeld, NepheleError
from nephele.node.procs import pid_alive
from nephele.reconcile import statedir

FILE = "lock.json"


@dataclass(frozen=True)
class LockInfo:
    id: str
    holder: str  # user@host
    pid: int
    host: str
    since: str  # ISO 8601, UTC
    operation: str
    manifest: str

    def describe(self) -> str:
        return f"lock {self.id} held by {self.holder} (pid {self.pid}, {self.operation}) since {self.since}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LockInfo:
        return cls(
            id=str(d["id"]),
            holder=str(d.get("holder", "?")),
            pid=int(d.get("pid", 0)),
            host=str(d.get("host", "?")),
            since=str(d.get("since", "?")),
            operation=str(d.get("operation", "?")),
            manifest=str(d.get("manifest", "?")),
        )


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read(directory: Path) -> LockInfo | None:
    data = statedir.read_json(directory / FILE, "lock file")
    if data is None:
        return None
    try:
        return LockInfo.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise NepheleError(
            f"{directory / FILE}: unreadable lock file ({exc}); remove it if no apply is running"
        ) from exc


def is_stale(info: LockInfo) -> bool:
    """True when the holder certainly died: it ran on this host and its pid is gone."""
    return info.host == socket.gethostname() and not pid_alive(info.pid)


def _held_message(info: LockInfo, directory: Path) -> str:
    stale = (
        f"; its process {info.pid} is no longer running, so the lock is stale"
        if is_stale(info)
        else "; wait for it to finish"
    )
    return (
        f"another apply holds the lock for manifest {info.manifest}: {info.describe()}{stale}. "
        f"If no apply is running, break it with: nephele force-unlock {info.id} -f MANIFEST "
        f"(lock file {directory / FILE})"
    )


def acquire(directory: Path, manifest: str, operation: str = "apply") -> LockInfo:
    """Take the lock or raise LockHeld naming its holder."""
    statedir.ensure(directory)
    host = socket.gethostname()
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    info = LockInfo(
        id=uuid.uuid4().hex[:12],
        holder=f"{user}@{host}",
        pid=os.getpid(),
        host=host,
        since=_now(),
        operation=operation,
        manifest=manifest,
    )
    path = directory / FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        held = read(directory)
        if held is None:  # released between our open and our read: try once more
            return acquire(directory, manifest, operation)
        raise LockHeld(_held_message(held, directory)) from None
    except OSError as exc:
        raise NepheleError(f"{path}: cannot create the lock: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(asdict(info), indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    statedir.fsync_dir(directory)
    return info


def release(directory: Path, info: LockInfo) -> None:
    """Remove the lock if it is still ours (a force-unlock may have given it to someone else)."""
    current = read(directory)
    if current is not None and current.id == info.id:
        (directory / FILE).unlink(missing_ok=True)


def force_unlock(directory: Path, lock_id: str) -> LockInfo:
    """Remove the lock with this id (the id guards against breaking a newer, live lock)."""
    current = read(directory)
    if current is None:
        raise NepheleError(f"no lock is held (no {directory / FILE})")
    if current.id != lock_id:
        raise NepheleError(f"the lock held is {current.id}, not {lock_id}: {current.describe()}")
    (directory / FILE).unlink(missing_ok=True)
    return current
