"""Shared pytest fixtures for integration tests (mark such tests `@pytest.mark.integration`).

Integration prerequisites (root, qemu, libvirtd, sshd, iproute2: tools/bootstrap.sh installs them) are
checked by the fixtures, which FAIL with a message naming what is missing; they never skip.

Fixtures
--------
guest (session)
    `nephele.cloudlet.guest.GuestFiles` of the test guest (kernel, initrd, pristine 64 MiB raw base disk),
    built on first use from Debian packages and cached under $NEPHELE_GUEST_CACHE or
    /var/cache/nephele/guest/<recipe hash>/. Never boot `guest.disk` itself: copy it, or put a qcow2
    overlay on it. Kernel command line for its workload: `nephele.cloudlet.guest.cmdline(...)`.

cloudlet (session)
    A `nephele.cloudlet.Cloudlet` of 2 nodes (edge-a, edge-b) with 20 Mbit/s links, up for the whole
    session and removed at its end. Its name is `pt<pid>` and its subnet the first free 10.201.X.0/24, so
    parallel test sessions do not collide; read addresses from it, never hard-code them. Per node
    (`cloudlet.nodes[i]`, a `CloudletNode`): `.address`, `.libvirt_uri` (host side, for libvirt-python or
    virsh), `.host_root` (its /var/nephele on the host), `.ssh_command(cmd)` / `.ssh_key` / `.known_hosts`
    (root login on port 22), `.run([...])` (a command inside the node). Faults: `cloudlet.stop_sshd(node)`
    / `start_sshd(node)`, `cut_link(node)` / `restore_link(node)`, `set_link(rate_mbit)`; a WAN delay for
    one TCP port pair: `cloudlet.start_delay_proxy(node, port, (host, port))`. Tests that break a node must
    restore it before they end (the fixture is shared). Cloudlets of dead sessions are reaped at start.

cloudlet_factory (function)
    `make(nodes=1, **kw) -> Cloudlet`: a private cloudlet for tests that need to break or remove one; every
    cloudlet it made is torn down when the test ends.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import CLOUDLET_DAEMONS, CLOUDLET_TOOLS, cloudlet_workdir, require

from nephele.cloudlet import Cloudlet, reap_orphans
from nephele.cloudlet.guest import GuestFiles, ensure_guest

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def guest() -> Iterator[GuestFiles]:
    require(tools=("qemu-system-x86_64", "mke2fs", "debugfs", "cpio", "depmod", "apt-get"))
    yield ensure_guest()


@pytest.fixture(scope="session")
def cloudlet(guest: GuestFiles) -> Iterator[Cloudlet]:
    require(tools=CLOUDLET_TOOLS, files=CLOUDLET_DAEMONS)
    reap_orphans(cloudlet_workdir())
    c = Cloudlet.up(
        f"pt{os.getpid()}", 2, rate_mbit=20, delay_ms=20, workdir=cloudlet_workdir(), owner_pid=os.getpid()
    )
    try:
        yield c
    finally:
        c.down()


@pytest.fixture
def cloudlet_factory() -> Iterator[Callable[..., Cloudlet]]:
    require(tools=CLOUDLET_TOOLS, files=CLOUDLET_DAEMONS)
    made: list[Cloudlet] = []

    def make(nodes: int = 1, **kw: Any) -> Cloudlet:
        name = kw.pop("name", f"pf{os.getpid() % 100000}{next(_counter)}")
        kw.setdefault("workdir", cloudlet_workdir())
        kw.setdefault("owner_pid", os.getpid())
        c = Cloudlet.up(name, nodes, **kw)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.down()
