"""Test helpers: an image of the test guest on both nodes of a cloudlet, instances run from it, and
the guest's HTTP state. Everything goes through the nodes' agents over SSH, as the controller does."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

from nephele.agent.client import Agent
from nephele.agent.ssh import SSHTransport
from nephele.cloudlet import Cloudlet
from nephele.cloudlet.core import CloudletNode
from nephele.cloudlet.guest import GuestFiles, cmdline
from nephele.model import NodeSpec


class _ClosingAgent(Agent):
    """An agent whose SSH connection ends with each call. Tests make one per call, often from several
    threads at once; a kept connection would live (with the node's resident agent behind it) until the
    process ends: dozens per fault-matrix run."""

    def call(self, op: str, args: Any = None, **kw: Any) -> Any:
        try:
            return super().call(op, args, **kw)
        finally:
            self.transport.close()


def agent(node: CloudletNode) -> Agent:
    return _ClosingAgent(
        SSHTransport(
            node.address, node=node.name, key=node.ssh_key, known_hosts=node.known_hosts, timeout=None
        )
    )


def spec(node: CloudletNode) -> NodeSpec:
    return NodeSpec(name=node.name, address=node.address, ssh_key=str(node.ssh_key))


def build_image(c: Cloudlet, guest: GuestFiles, *, fill: int = 32, dirty: int = 1, mem_mib: int = 256) -> str:
    """Build the test guest's image on the first node (boot, wait for READY, pause: the node captures
    it), copy it to every other node; returns its content id."""
    a = c.nodes[0]
    desc = Path("/tmp") / f"nephele-handoff-guest-{c.name}.json"
    desc.write_text(
        json.dumps(
            {
                "name": "handoff-test",
                "disk": str(guest.disk),
                "kernel": str(guest.kernel),
                "initrd": str(guest.initrd),
                "cmdline": cmdline(fill_mib=fill, dirty_mib=dirty, disk_kib=64),
                "memory_kib": mem_mib * 1024,
            }
        )
    )
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = agent(a).call(
                "image.build", {"path": str(desc), "timeout": 300}, progress=lambda s: None
            )
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    conn = libvirt.open(a.libvirt_uri)
    try:
        deadline = time.monotonic() + 240
        paused = False
        while not paused and t.is_alive():
            assert time.monotonic() < deadline, "the build VM never became ready"
            for log in (a.host_root / "tmp").glob("build-*/serial.log"):
                if b"NEPHELE-READY" in log.read_bytes():
                    time.sleep(2)
                    for d in conn.listAllDomains():
                        if d.name().startswith("nephele-build-") and d.isActive():
                            d.suspend()
                            paused = True
            time.sleep(0.5)
        t.join(180)
    finally:
        conn.close()
    if "e" in out:
        raise out["e"]
    cid = str(out["r"]["content_id"])
    for n in c.nodes[1:]:
        dst = n.host_root / "images" / cid
        if not dst.exists():
            shutil.copytree(a.host_root / "images" / cid, dst)
    return cid


def guest_state(node: CloudletNode, port: int, path: str = "/cgi-bin/md5") -> dict[str, str]:
    with urllib.request.urlopen(f"http://{node.address}:{port}{path}", timeout=15) as r:
        text = r.read().decode()
    return dict(kv.split("=", 1) for kv in text.split())


def wait_guest(node: CloudletNode, port: int, timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return guest_state(node, port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def domains(node: CloudletNode) -> list[str]:
    conn = libvirt.open(node.libvirt_uri)
    try:
        return [d.UUIDString() for d in conn.listAllDomains()]
    finally:
        conn.close()


@contextmanager
def running_instance(c: Cloudlet, image: str, title: str, port: int) -> Iterator[dict[str, Any]]:
    """An instance of `image` on the first node, its port 80 forwarded to `port`; removed afterwards from
    whichever node it ended on."""
    a, b = c.nodes[:2]
    r = agent(a).call("instance.run", {"snapshot": image, "title": title, "ports": f"{port}:80"})
    try:
        yield r
    finally:
        for n in (a, b):
            for i in agent(n).call("instance.ls"):
                if i["uuid"] == r["uuid"]:
                    agent(n).call("instance.rm", {"instance": i["uuid"]})
