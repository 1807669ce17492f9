"""Disk-space checks made before a node writes something large (an imported image or snapshot): refuse
up front, with the numbers, instead of failing half-way with ENOSPC and a half-written staging dir.

Needed = what the operation will write (the sizes recorded in the export) + a margin for what the
numbers do not show (file system metadata, meta.json, the log). Free = statvfs f_bavail, the space an
unprivileged writer may use, on the file system that will hold the files (the store's tmp/, where
imports are staged before they are renamed into place on the same file system).
"""

from __future__ import annotations

import os
from pathlib import Path

from nephele.errors import NoSpace

MARGIN_BYTES = 8 << 20
MARGIN_FRACTION = 0.01


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def margin(needed: int) -> int:
    return MARGIN_BYTES + int(needed * MARGIN_FRACTION)


def human(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def require(path: Path, needed: int, *, what: str, node: str, detail: str = "") -> int:
    """Raise NoSpace unless `path`'s file system has room for `needed` bytes plus the margin.
    Returns the free bytes found."""
    total = needed + margin(needed)
    free = free_bytes(path)
    if free < total:
        why = f"{human(needed)} {detail}".strip() + f" + {human(margin(needed))} margin"
        raise NoSpace(
            f"{what}: not enough disk space on node {node}: {path} has {human(free)} ({free} bytes) free, "
            f"{human(total)} ({total} bytes) needed ({why}); nothing was written",
            path=str(path),
            needed=total,
            free=free,
        )
    return free
