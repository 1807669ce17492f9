"""Helpers shared by the integration tests and tests/conftest.py (import as `from support import ...`;
pytest puts tests/ on sys.path for the root conftest). Kept out of conftest.py so no test imports a
module named `conftest`, which is ambiguous when several directories have one."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

CLOUDLET_TOOLS = ("qemu-system-x86_64", "ip", "tc", "nsenter", "unshare", "virsh", "ssh", "ssh-keygen")
CLOUDLET_DAEMONS = ("/usr/sbin/libvirtd", "/usr/sbin/sshd")


def require(*, root: bool = True, tools: tuple[str, ...] = (), files: tuple[str, ...] = ()) -> None:
    """Fail (never skip) when an integration prerequisite is missing: a hidden skip would pass CI green
    without testing anything."""
    problems = []
    if root and os.geteuid() != 0:
        problems.append("integration tests must run as root (namespaces, libvirtd, sshd)")
    problems += [f"'{t}' not found on PATH" for t in tools if shutil.which(t) is None]
    problems += [f"{f} not found" for f in files if not os.path.exists(f)]
    if problems:
        pytest.fail(
            "integration prerequisites missing: " + "; ".join(problems) + " (run tools/bootstrap.sh as root)",
            pytrace=False,
        )


def cloudlet_workdir() -> Path:
    # Short and stable: libvirt's unix socket path must stay under 108 bytes.
    return Path(tempfile.gettempdir()) / "nephele-test-cloudlets"
