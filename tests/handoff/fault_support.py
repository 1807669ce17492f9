"""Fault injection for the handoff fault matrix (tests/handoff/test_fault_matrix.py): a relay on the
node link that can flip one byte of one handoff channel, a watcher of a node's libvirt lifecycle events,
and what a node holds (domains, dirs, processes, listeners) to compare before and after a fault."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from nephele.cloudlet.core import CloudletNode
from nephele.handoff import channel as ch
from nephele.node.hypervisor import start_event_loop


class Relay:
    """A TCP relay on the host's cloudlet bridge address in front of a destination's handoff port (the
    source reaches it through ``perform(..., via=relay.address)``). ``flip=(channel, offset)``: XOR one
    byte, ``offset`` bytes after the hello, in the source->destination direction of that channel (the
    channel number is read from the cleartext hello)."""

    def __init__(
        self, listen_host: str, target: tuple[str, int], flip: tuple[int, int] | None = None
    ) -> None:
        self.listener = socket.create_server((listen_host, 0))
        self.address = (listen_host, self.listener.getsockname()[1])
        self.target = target
        self.flip = flip
        self.flipped: list[int] = []  # channels a byte was flipped on
        self.held: set[int] = set()  # channels whose destination->source bytes are dropped from now on
        self.dropped = 0
        self.channels: list[int] = []
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=10)
            except OSError:
                a.close()
                continue
            b.settimeout(None)
            self.socks += [a, b]
            link: list[int] = []  # the channel number, once the hello told it
            threading.Thread(target=self._pump, args=(b, a, False, link), daemon=True).start()
            threading.Thread(target=self._pump, args=(a, b, True, link), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool, link: list[int]) -> None:
        seen, channel = 0, None
        hello_end = ch.HELLO_LEN
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not upstream and link and link[0] in self.held:
                    self.dropped += len(data)  # as on a link that went dark in this direction
                    continue
                if upstream:
                    if channel is None and seen + len(data) > 5:
                        channel = data[5 - seen]  # HELLO: magic(4) version(1) channel(1)
                        self.channels.append(channel)
                        link.append(channel)
                    if self.flip is not None and channel == self.flip[0] and channel not in self.flipped:
                        at = hello_end + self.flip[1]
                        if seen <= at < seen + len(data):
                            buf = bytearray(data)
                            buf[at - seen] ^= 0x5A
                            data = bytes(buf)
                            self.flipped.append(channel)
                seen += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


class LifecycleWatch:
    """Calls ``on_event(event, detail)`` for lifecycle events of domain uuid on a node's libvirtd (from
    libvirt's event thread: keep it short)."""

    def __init__(self, node: CloudletNode, uuid: str, on_event: Callable[[int, int], None]) -> None:
        start_event_loop()
        self.conn = libvirt.open(node.libvirt_uri)

        def cb(_c: Any, dom: Any, event: int, detail: int, _o: Any) -> None:
            if dom.UUIDString() == uuid:
                on_event(event, detail)

        self.cb = self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)

    def close(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.domainEventDeregisterAny(self.cb)
        with contextlib.suppress(libvirt.libvirtError):
            self.conn.close()


def _netns_inode(node: CloudletNode) -> int:
    return os.stat(f"/run/netns/{node.netns}").st_ino


def processes(node: CloudletNode) -> dict[int, str]:
    """pid -> command line of every process in the node's network namespace."""
    ino = _netns_inode(node)
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.stat(d / "ns" / "net").st_ino != ino:
                continue
            out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return out


def listeners(node: CloudletNode) -> set[str]:
    """The TCP ports listening inside the node (address:port)."""
    proc = node.run(["ss", "-Hltn"], timeout=30)
    return {line.split()[3] for line in proc.stdout.splitlines() if len(line.split()) > 3}


def node_files(node: CloudletNode, *dirs: str) -> set[str]:
    """Entries of the node's directories as the node sees them (a test mount may hide the host's view)."""
    out: set[str] = set()
    for d in dirs:
        proc = node.run(["ls", "-A", f"{node.root}/{d}"], timeout=30)
        out |= {f"{d}/{n}" for n in proc.stdout.split()}
    return out


def libvirt_domains(node: CloudletNode) -> dict[str, str]:
    """uuid -> state name of every domain of the node's libvirtd."""
    conn = libvirt.open(node.libvirt_uri)
    try:
        names = {libvirt.VIR_DOMAIN_RUNNING: "running", libvirt.VIR_DOMAIN_PAUSED: "paused"}
        return {d.UUIDString(): names.get(d.state()[0], "other") for d in conn.listAllDomains()}
    finally:
        conn.close()


def snapshot(node: CloudletNode) -> dict[str, Any]:
    """What to compare before and after a fault: processes, listeners, files, domains."""
    return {
        "procs": processes(node),
        "listen": listeners(node),
        "files": node_files(node, "instances", "tmp"),
        "domains": libvirt_domains(node),
    }


DAEMONS = ("libvirtd", "sshd")  # restarted by some cells; sshd sessions come and go
# The resident agents (`nephele agent serve`: one per open SSH transport, or the node's agent daemon and
# its children, all for read-only ops) are the controller's, not leftovers of a handoff.
RESIDENT = "nephele agent serve"


def new_since(before: dict[str, Any], node: CloudletNode) -> list[str]:
    """What the node holds now and did not hold before (libvirt's own helpers excluded)."""
    now = snapshot(node)
    out = [
        f"process {p}: {c[:120]}"
        for p, c in now["procs"].items()
        if p not in before["procs"] and not any(d in c.split(" ")[0] for d in DAEMONS) and RESIDENT not in c
    ]
    out += [f"listener {a}" for a in sorted(now["listen"] - before["listen"])]
    out += [f"file {f}" for f in sorted(now["files"] - before["files"])]
    out += [f"domain {u} ({s})" for u, s in now["domains"].items() if u not in before["domains"]]
    return out
