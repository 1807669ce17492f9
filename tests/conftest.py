"""Shared pytest fixtures for integration tests (mark such tests `@pytest.mark.integration`).

Fixtures
--------
guest (session)
    `nephele.cloudlet.guest.GuestFiles` of the test guest (kernel, initrd, pristine base disk), built on
    first use from Debian packages and cached under $NEPHELE_GUEST_CACHE or /var/cache/nephele/guest.
    Never boot `guest.disk` itself: copy it, or put a qcow2 overlay on it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from nephele.cloudlet.guest import GuestFiles, ensure_guest


def require(*, root: bool = True, tools: tuple[str, ...] = ()) -> None:
    """Fail (never skip) when an integration prerequisite is missing: a hidden skip would pass CI green
    without testing anything."""
    problems = []
    if root and os.geteuid() != 0:
        problems.append("integration tests must run as root (namespaces, libvirtd, sshd)")
    problems += [
        f"'{t}' not found on PATH (run tools/bootstrap.sh)" for t in tools if shutil.which(t) is None
    ]
    if problems:
        pytest.fail("integration prerequisites missing: " + "; ".join(problems), pytrace=False)


@pytest.fixture(scope="session")
def guest() -> Iterator[GuestFiles]:
    require(tools=("qemu-system-x86_64", "mke2fs", "debugfs", "cpio", "depmod", "apt-get"))
    yield ensure_guest()
