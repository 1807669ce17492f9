"""libvirt's side of a live handoff (the only handoff code that touches libvirt).

The source libvirtd drives a peer-to-peer live migration whose three TCP paths all end on this node's
loopback, where nephele's handoff proxies listen (reference LIBVIRT-PROXY.md has the measurements):

    memory   VIR_MIGRATE_PARAM_URI = tcp://127.0.0.1:P, LISTEN_ADDRESS 127.0.0.1 (the destination QEMU
             listens on 127.0.0.1:P inside the destination node)
    disk     NON_SHARED_INC + DISKS_URI tcp://127.0.0.1:P2 (NBD mirror of the qcow2 overlay; the base is
             on both nodes). DISKS_URI, not DISKS_PORT: the latter leaks its port reservation in 9.0.
    control  dconnuri qemu+tcp://127.0.0.1:P3/system, forwarded to the destination libvirtd's unix socket

Flags that would change the stream into something the proxies cannot parse (compression, multifd,
postcopy, TLS) are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from nephele.errors import HandoffError, NodeError
from nephele.node.hypervisor import Hypervisor

BASE_FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_INC
)
REFUSED_FLAGS = {
    libvirt.VIR_MIGRATE_COMPRESSED: "COMPRESSED (xbzrle/compress records)",
    libvirt.VIR_MIGRATE_PARALLEL: "PARALLEL (multifd connections)",
    libvirt.VIR_MIGRATE_POSTCOPY: "POSTCOPY (page requests on the return path)",
    libvirt.VIR_MIGRATE_TLS: "TLS (an encrypted stream)",
}
DEFAULT_SOCKET = "/run/libvirt/libvirt-sock"
# % of vCPU time taken away at the first throttle (QEMU: 20; a WAN needs it sooner)
AUTO_CONVERGE_INITIAL = 40
AUTO_CONVERGE_INCREMENT = 20  # % more each time the guest still outpaces the link (QEMU: 10)


def check_flags(flags: int) -> None:
    bad = [name for f, name in REFUSED_FLAGS.items() if flags & f]
    if bad:
        raise HandoffError(f"migration flags the handoff proxies cannot carry: {', '.join(bad)}")


def libvirt_socket(uri: str) -> str:
    """The unix socket of a qemu:///system URI (its ?socket= parameter, or libvirt's default)."""
    q = parse_qs(urlparse(uri).query)
    return q.get("socket", [DEFAULT_SOCKET])[0]


def disk_virtual_size(path: str) -> int:
    proc = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", path], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NodeError(f"cannot read the instance disk {path}: {proc.stderr.strip()}")
    return int(json.loads(proc.stdout)["virtual-size"])


def create_overlay(path: Path, backing: Path, size: int) -> None:
    """The destination disk for NON_SHARED_INC: an empty overlay on the local base at the same path."""
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(path), str(size)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise NodeError(f"cannot create the destination disk {path}: {proc.stderr.strip()}")


def create_sparse(path: Path, size: int) -> None:
    """The destination disk of a raw (not overlay) instance disk: NBD copies all of it."""
    with open(path, "wb") as f:
        f.truncate(size)


def platform_of(domain_xml: str) -> dict[str, str]:
    """What a destination must offer to run this domain: arch, machine type (libvirt's expanded name in
    a live XML), virt type (qemu = TCG, kvm) and the CPU mode/model ('' when the XML has no <cpu>)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(domain_xml)
    ostype = root.find("os/type")
    cpu = root.find("cpu")
    model = cpu.find("model") if cpu is not None else None
    return {
        "arch": (ostype.get("arch") if ostype is not None else None) or "x86_64",
        "machine": (ostype.get("machine") if ostype is not None else None) or "",
        "virt_type": root.get("type") or "qemu",
        "cpu_mode": (cpu.get("mode") or "custom") if cpu is not None else "",
        "cpu_model": (model.text or "").strip() if model is not None else "",
    }


def boot_files(domain_xml: str) -> list[str]:
    """The files outside the instance directory a domain boots from (direct kernel boot)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(domain_xml)
    return [
        str(e.text).strip()
        for tag in ("os/kernel", "os/initrd")
        if (e := root.find(tag)) is not None and e.text
    ]


def platform_problem(hv: Hypervisor, want: dict[str, str]) -> str | None:
    """Why this node cannot run a domain of platform ``want`` (``platform_of``), or None. From libvirt's
    domain capabilities for that arch, machine type and virt type: no such QEMU/machine/accelerator
    here, or the CPU mode/model is not usable here."""
    import xml.etree.ElementTree as ET

    arch, machine, vt = want.get("arch") or "x86_64", want.get("machine") or None, want.get("virt_type")
    try:
        caps = hv.conn.getDomainCapabilities(None, arch, machine, vt or "qemu", 0)
    except libvirt.libvirtError as exc:
        return (
            f"it cannot run arch {arch}, machine type {machine or '(default)'} with virt type {vt} "
            f"({exc.get_error_message()})"
        )
    root = ET.fromstring(caps)
    mode = want.get("cpu_mode") or ""
    if not mode:
        return None
    m = root.find(f"cpu/mode[@name='{mode}']")
    if m is None or m.get("supported") != "yes":
        return f"it does not support CPU mode {mode}"
    model = want.get("cpu_model") or ""
    if mode == "custom" and model:
        usable = {e.text: e.get("usable") for e in m.findall("model")}
        if usable.get(model, "no") == "no":
            return f"CPU model {model} is not usable there"
    return None


def free_bytes(path: Path) -> tuple[int, int]:
    """(bytes free for an unprivileged writer, device id) of the file system holding path (statvfs)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, os.stat(path).st_dev


def allocated_bytes(path: str) -> int:
    """The bytes a disk file occupies (what a copy of its allocated blocks needs), 0 if unreadable."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


@dataclass
class LifecycleMark:
    stopped: float | None = None  # source: paused for the switchover
    resumed: float | None = None  # destination: running after the migration
    events: list[tuple[float, str]] | None = None


def watch_lifecycle(
    hv: Hypervisor, uuid: str, mark: LifecycleMark, on_stop: Callable[[float], None] | None = None
) -> Callable[[], None]:
    """Record the wall-clock time of the migration pause (source) and of the resume (destination) of
    domain uuid from libvirt lifecycle events (on_stop is called at the pause, from libvirt's event
    thread). Returns the function that stops watching."""
    mark.events = []

    def on_event(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if dom.UUIDString() != uuid:
            return
        now = time.time()
        assert mark.events is not None
        mark.events.append((now, f"{event}/{detail}"))
        if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and mark.stopped is None:
            mark.stopped = now
            if on_stop is not None:
                on_stop(now)
        elif (
            event == libvirt.VIR_DOMAIN_EVENT_RESUMED
            and mark.resumed is None
            and detail
            in (libvirt.VIR_DOMAIN_EVENT_RESUMED_MIGRATED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED)
        ):
            mark.resumed = now

    try:
        cb = hv.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
    except libvirt.libvirtError as exc:
        raise NodeError(f"cannot listen for domain events: {exc.get_error_message()}") from None

    def stop() -> None:
        with contextlib.suppress(libvirt.libvirtError):
            hv.conn.domainEventDeregisterAny(cb)

    return stop


def domain_state(hv: Hypervisor, uuid: str) -> str | None:
    """running | paused | stopped, or None when no such domain exists."""
    dom = hv.lookup(uuid)
    if dom is None:
        return None
    try:
        return hv.state(dom)
    except NodeError:
        return None


def is_persistent(hv: Hypervisor, uuid: str) -> bool:
    dom = hv.lookup(uuid)
    try:
        return bool(dom is not None and dom.isPersistent())
    except libvirt.libvirtError:
        return False


def remove_domain(hv: Hypervisor, uuid: str) -> bool:
    """Destroy and undefine domain uuid if it exists and is not running; True if something was removed."""
    dom = hv.lookup(uuid)
    if dom is None:
        return False
    with contextlib.suppress(NodeError):
        hv.destroy(dom)
    with contextlib.suppress(NodeError):
        hv.undefine(dom)
    return True


def has_job(hv: Hypervisor, uuid: str) -> bool:
    """Whether libvirt runs a job (a migration) on domain uuid."""
    dom = hv.lookup(uuid)
    try:
        return bool(dom is not None and dom.jobInfo()[0])
    except libvirt.libvirtError:
        return False


def qmp(dom: Any, command: str, **arguments: Any) -> Any:
    """One QMP command on the domain's QEMU (read-only queries and job clean-up only: libvirt owns the
    rest of the monitor). Returns its "return" value."""
    req: dict[str, Any] = {"execute": command}
    if arguments:
        req["arguments"] = arguments
    try:
        out = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(req), 0)
    except libvirt.libvirtError as exc:
        raise NodeError(f"QMP {command} failed: {exc.get_error_message()}") from None
    return json.loads(out).get("return")


def block_state(hv: Hypervisor, uuid: str) -> dict[str, Any]:
    """What QEMU's block layer holds for the domain beyond its own disks: block jobs (any state) and
    filter nodes a job inserted (mirror_top). A failed handoff must leave neither: libvirt's next disk
    mirror then fails with "Need a root block node"."""
    dom = hv.lookup(uuid)
    if dom is None:
        return {"jobs": [], "filters": []}
    jobs = qmp(dom, "query-jobs") or []
    nodes = qmp(dom, "query-named-block-nodes", flat=True) or []
    filters = [n.get("node-name") for n in nodes if n.get("drv") in ("mirror_top", "commit_top")]
    return {
        "jobs": [{"id": j.get("id"), "type": j.get("type"), "status": j.get("status")} for j in jobs],
        "filters": filters,
    }


def dismiss_concluded(hv: Hypervisor, uuid: str, state: dict[str, Any]) -> list[str]:
    """Dismiss the ended ("concluded") jobs listed in block_state(): libvirt starts its mirrors with
    auto-dismiss off and dismisses them itself, unless it lost track after a failure."""
    dom = hv.lookup(uuid)
    done: list[str] = []
    for job in state["jobs"]:
        if dom is not None and job.get("status") == "concluded" and job.get("id"):
            with contextlib.suppress(NodeError):
                qmp(dom, "job-dismiss", id=job["id"])
                done.append(str(job["id"]))
    return done


def resume_if_paused(hv: Hypervisor, uuid: str) -> str | None:
    """After a failed migration: make sure the source runs (libvirt normally resumes it itself)."""
    dom = hv.lookup(uuid)
    if dom is None:
        return None
    with contextlib.suppress(libvirt.libvirtError, NodeError):
        state, _reason = dom.state()
        if state == libvirt.VIR_DOMAIN_PAUSED and not dom.jobInfo()[0]:
            dom.resume()
    return domain_state(hv, uuid)


class SourceMigration:
    """One p2p migration of a running domain, driven in a thread of its own."""

    def __init__(
        self,
        hv: Hypervisor,
        uuid: str,
        *,
        control_port: int,
        memory_port: int,
        disk_port: int,
        downtime_ms: int,
        flags: int = BASE_FLAGS,
        auto_converge: bool = True,
    ) -> None:
        check_flags(flags)
        dom = hv.lookup(uuid)
        if dom is None:
            raise NodeError(f"no domain {uuid} on this node")
        self.dom = dom
        self.hv = hv
        self.dconnuri = f"qemu+tcp://127.0.0.1:{control_port}/system"
        self.params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://127.0.0.1:{memory_port}",
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: "127.0.0.1",
            libvirt.VIR_MIGRATE_PARAM_DISKS_URI: f"tcp://127.0.0.1:{disk_port}",
        }
        if auto_converge:
            # QEMU slows the guest's vCPUs (40 %, then +20 %) while it dirties memory faster
            # than half of what is sent: over a slow link the dirty set otherwise never shrinks below
            # what the downtime budget allows, and the handoff runs forever.
            flags |= libvirt.VIR_MIGRATE_AUTO_CONVERGE
            self.params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = AUTO_CONVERGE_INITIAL
            self.params[libvirt.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = AUTO_CONVERGE_INCREMENT
        self.flags = flags
        self.downtime_ms = downtime_ms
        self.error: str | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="handoff-migrate", daemon=True)

    def start(self) -> None:
        try:
            self.dom.migrateSetMaxDowntime(self.downtime_ms, 0)
        except libvirt.libvirtError as exc:
            raise NodeError(f"cannot set the downtime limit: {exc.get_error_message()}") from None
        self.thread.start()

    def _run(self) -> None:
        try:
            self.dom.migrateToURI3(self.dconnuri, self.params, self.flags)
        except libvirt.libvirtError as exc:
            self.error = exc.get_error_message() or str(exc)
        finally:
            self.done.set()

    def job(self) -> dict[str, Any]:
        try:
            stats: dict[str, Any] = self.dom.jobStats()
            return stats
        except libvirt.libvirtError:
            return {}

    def throttle_pct(self, stats: dict[str, Any]) -> int:
        """How much of the guest's CPU auto-converge takes away now (0: none)."""
        return int(stats.get(libvirt.VIR_DOMAIN_JOB_AUTO_CONVERGE_THROTTLE, 0) or 0)

    def set_downtime(self, ms: int) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.migrateSetMaxDowntime(ms, 0)

    def abort(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.abortJob()
