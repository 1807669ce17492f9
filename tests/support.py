"""Helpers shared by the integration tests and tests/conftest.py (import as `from support import ...`;
pytest puts tests/ on sys.path for the root conftest). Kept out of conftest.py so no test imports a
module named `conftest`, which is ambiguous when several directories have one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from nephele.agent import Agent
from nephele.cloudlet.core import CloudletNode
from nephele.cloudlet.guest import GuestFiles, cmdline

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


def wait_until(pred: Any, timeout: float, what: str, step: float = 0.3) -> Any:
    """Poll `pred` until it returns something true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def scripted_pause(node: CloudletNode, prefix: str, call: Any, ready: Any) -> Any:
    """Run `call` (a node op that boots a VM and waits for its pause) in a thread; pause the VM it starts
    (name prefix) once `ready(dom)` says so, through the node's libvirtd, as a user would in virt-manager."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = call()
        except Exception as exc:  # reported below
            outcome["error"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    conn = libvirt.open(node.libvirt_uri)
    try:

        def find() -> Any:
            if "error" in outcome:
                raise outcome["error"]
            for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if d.name().startswith(prefix):
                    return d
            return None

        dom = wait_until(find, 180, f"the {prefix} VM")
        wait_until(lambda: ready(dom), 180, f"{prefix} VM ready")
        dom.suspend()
    finally:
        conn.close()
    worker.join(300)
    assert not worker.is_alive(), f"{prefix}: the node op did not return after the pause"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def build_demo_artifacts(node: CloudletNode, agent: Agent, guest: GuestFiles, dest: Path) -> None:
    """On `node`: build the image `tiny` from the test guest and the snapshot `web` through scripted
    pauses, export both to `dest`/tiny.zip and `dest`/web.zip on the host, then remove them from the node
    (a manifest's apply brings them back from those source files)."""
    inbox = node.host_root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    desc = {
        "disk": str(guest.disk),
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": cmdline(fill_mib=8, dirty_mib=1, disk_kib=4),
        "memory_kib": 131072,
        "name": "tiny",
    }
    (inbox / "tiny.json").write_text(json.dumps(desc))

    def serial_ready(dom: Any) -> bool:
        src = ET.fromstring(dom.XMLDesc(0)).find("devices/serial/source")
        assert src is not None
        path = node.host_root / Path(str(src.get("path"))).relative_to(node.root)
        return path.is_file() and b"NEPHELE-READY" in path.read_bytes()

    image = scripted_pause(
        node,
        "nephele-build-",
        lambda: agent.call("image.build", {"path": f"{node.root}/inbox/tiny.json", "timeout": 300}),
        serial_ready,
    )
    started = time.monotonic()
    scripted_pause(
        node,
        "nephele-snap-",
        lambda: agent.call("snapshot.build", {"image": image["id"], "dest": "web", "timeout": 300}),
        lambda dom: time.monotonic() - started > 3,  # let the guest run (and change) a little
    )
    for kind, op_args in (("image", {"id": "tiny"}), ("snapshot", {"name": "web"})):
        remote = f"{node.root}/inbox/{kind}.zip"
        agent.call(f"{kind}.export", {**op_args, "dest": remote})
        agent.transport.get_file(remote, dest / ("tiny.zip" if kind == "image" else "web.zip"))
    agent.call("snapshot.rm", {"name": "web"})
    agent.call("image.rm", {"id": image["id"]})
