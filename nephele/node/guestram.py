"""A running instance's main RAM as the host sees it, for the handoff's switchover check.

Instances run with their RAM in a memfd (``<memoryBacking><source type='memfd'/>``, see domain.py), so
the node can read the guest's true memory while the VM is stopped for the final stop-and-copy, without
asking QEMU. The live handoff compares it with what QEMU's migration stream delivered: under TCG, QEMU 7.2
loses a guest write now and then (dirty tracking races the migration thread), and a destination that
resumes with a stale page crashes its kernel seconds later (docs/handoff.md).

    ram = open_main_ram(uuid)      # None: not a memfd-backed instance, or no QEMU of it in this netns
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

MEMFD_PREFIX = "/memfd:memory-backend-memfd"


@dataclass
class GuestRam:
    """An open read-only descriptor of the guest's main RAM block (offset 0 = the block's offset 0)."""

    fd: int
    size: int
    pid: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def _net_ns(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def qemu_pid(uuid: str, proc: Path = Path("/proc")) -> int | None:
    """The QEMU process of domain uuid in this process's network namespace. Nodes of a local cloudlet
    share the host's process table, and during a handoff both ends run a QEMU with the same uuid."""
    want = f"-uuid\0{uuid}\0".encode()
    mine = _net_ns("self")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if want in cmdline and b"qemu" in cmdline.split(b"\0", 1)[0] and _net_ns(entry.name) == mine:
            return int(entry.name)
    return None


def open_main_ram(uuid: str, proc: Path = Path("/proc")) -> GuestRam | None:
    pid = qemu_pid(uuid, proc)
    if pid is None:
        return None
    fds = proc / str(pid) / "fd"
    try:
        entries = list(fds.iterdir())
    except OSError:
        return None
    for e in entries:
        try:
            if not os.readlink(e).startswith(MEMFD_PREFIX):
                continue
            fd = os.open(e, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        return GuestRam(fd, os.fstat(fd).st_size, pid)
    return None
