"""The hypervisor layer: the only module of nephele that imports libvirt.

One Hypervisor per agent call: it registers libvirt's default event loop (needed for lifecycle
events and keepalives) in a daemon thread before opening the connection, turns libvirtError into
NodeError with a message naming the operation, and keeps libvirt from printing errors itself.

URI: `qemu:///system` unless NEPHELE_LIBVIRT_URI says otherwise (a cloudlet node's libvirtd answers
`qemu:///system` inside the node; a test may point at a private socket or at `test:///default`).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from nephele.errors import InvalidInput, NodeError
from nephele.model import PortMap
from nephele.node import domain as dx

URI_ENV = "NEPHELE_LIBVIRT_URI"
ACCEL_ENV = "NEPHELE_ACCEL"  # "tcg" or "kvm": skip the boot test
DEFAULT_URI = "qemu:///system"
ACCEL_CACHE = "accel.json"
XML_INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE  # the persistent definition, not the live state
BOOT_TEST_SECONDS = 10.0  # TCG prints the banner within ~1 s; a usable KVM sooner
BOOT_TEST_MARKER = b"Linux version"

_loop_lock = threading.Lock()
_loop_started = False

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "stopped",
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "stopped",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}


def _ignore_libvirt_error(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; nephele reports them itself."""


def start_event_loop() -> None:
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.registerErrorHandler(_ignore_libvirt_error, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@contextmanager
def libvirt_errors(what: str) -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise NodeError(f"{what}: {exc.get_error_message() or exc}") from None


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    state: str  # running | paused | stopped
    tags: dict[str, str]
    xml: str
    memory_kib: int
    persistent: bool


class Hypervisor:
    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or os.environ.get(URI_ENV) or DEFAULT_URI
        start_event_loop()
        try:
            self.conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            err = NodeError(f"cannot connect to libvirt at {self.uri}: {exc.get_error_message() or exc}")
            err.temporary = True  # libvirtd restarting is worth a retry
            raise err from None
        if self.conn is None:  # pragma: no cover - old bindings returned None
            raise NodeError(f"cannot connect to libvirt at {self.uri}")

    def close(self) -> None:
        with suppress(libvirt.libvirtError):
            self.conn.close()

    def describe(self) -> dict[str, Any]:
        with libvirt_errors("libvirt version query"):
            return {
                "uri": self.uri,
                "driver": self.conn.getType(),
                "libvirt": self.conn.getLibVersion(),
                "hypervisor_version": self.conn.getVersion(),
            }

    # ------------------------------------------------------------------------------- accelerator

    def domain_type(self, cache_dir: Path, *, kernel: str | None = None, initrd: str | None = None) -> str:
        """'kvm' if a guest kernel boots under KVM in time, else 'qemu' (TCG). Decided once per node by
        booting, not by looking for /dev/kvm (which may exist and be unusable); the result is cached."""
        forced = os.environ.get(ACCEL_ENV, "").lower()
        if forced in ("tcg", "qemu"):
            return "qemu"
        if forced == "kvm":
            return "kvm"
        if self.conn.getType() == "Test":
            return "test"
        cache = cache_dir / ACCEL_CACHE
        if cache.is_file():
            try:
                return str(json.loads(cache.read_text())["domain_type"])
            except (ValueError, KeyError):
                pass
        try:
            self.conn.getDomainCapabilities(None, "x86_64", None, "kvm")
            kvm_offered = True
        except libvirt.libvirtError:
            kvm_offered = False
        if not kvm_offered:
            result, why = "qemu", "libvirt offers no kvm domain type"
        elif kernel is None:
            return "qemu"  # cannot test without a kernel; do not cache a guess
        else:
            ok, seconds = self._kvm_boot_test(cache_dir, kernel, initrd)
            result = "kvm" if ok else "qemu"
            why = f"kvm boot test {'passed' if ok else 'failed'} after {seconds:.1f} s"
        from nephele.node.store import atomic_write_json  # local: store must not import libvirt users

        atomic_write_json(
            cache, {"domain_type": result, "why": why, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )
        return result

    def _kvm_boot_test(self, work: Path, kernel: str, initrd: str | None) -> tuple[bool, float]:
        """Boot the kernel under KVM with no disk and wait for its first console line."""
        work.mkdir(parents=True, exist_ok=True)
        log = work / "kvm-boot-test.log"
        log.unlink(missing_ok=True)
        spec = dx.DomainSpec(
            name=f"nephele-boottest-{uuidlib.uuid4().hex[:8]}",
            uuid=str(uuidlib.uuid4()),
            title="nephele kvm boot test",
            disk="",
            disk_format="raw",
            serial_log=str(log),
            memory_kib=128 * 1024,
            cpus=1,
            boot=dx.Boot(kernel, initrd, "console=ttyS0 panic=-1"),
            domain_type="kvm",
        )
        xml = dx.build_xml(spec)
        t0 = time.monotonic()
        try:
            dom = self.conn.createXML(xml, 0)
        except libvirt.libvirtError:
            return False, time.monotonic() - t0
        try:
            while time.monotonic() - t0 < BOOT_TEST_SECONDS:
                if log.is_file() and BOOT_TEST_MARKER in log.read_bytes():
                    return True, time.monotonic() - t0
                time.sleep(0.2)
            return False, time.monotonic() - t0
        finally:
            with suppress(libvirt.libvirtError):
                dom.destroy()

    # ----------------------------------------------------------------------------------- domains

    def create(self, xml: str, what: str) -> Any:
        with libvirt_errors(f"cannot start {what}"):
            return self.conn.createXML(xml, 0)

    def lookup(self, uuid: str) -> Any:
        try:
            return self.conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return None

    def info(self, dom: Any) -> DomainInfo:
        with libvirt_errors("cannot read domain"):
            xml = dom.XMLDesc(0)
            state = dom.state()[0]
            return DomainInfo(
                name=dom.name(),
                uuid=dom.UUIDString(),
                state=STATE_NAMES.get(state, "stopped"),
                tags=dx.read_tags(xml) or {},
                xml=xml,
                memory_kib=int(dom.info()[2]),
                persistent=bool(dom.isPersistent()),
            )

    def nephele_domains(self, role: str | None = None) -> list[DomainInfo]:
        with libvirt_errors("cannot list domains"):
            doms = self.conn.listAllDomains(0)
        out = []
        for dom in doms:
            try:
                info = self.info(dom)
            except NodeError:
                continue  # vanished while we looked
            if info.tags and (role is None or info.tags.get("role") == role):
                out.append(info)
        return out

    def set_tags(self, dom: Any, tags: dict[str, str]) -> None:
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE if dom.isActive() else 0
        if dom.isPersistent():
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        with libvirt_errors("cannot tag domain"):
            dom.setMetadata(
                libvirt.VIR_DOMAIN_METADATA_ELEMENT, dx.tag_xml(tags), dx.NEPHELE_PREFIX, dx.NEPHELE_NS, flags
            )

    def state(self, dom: Any) -> str:
        """running | paused | stopped; a transient domain that is gone counts as stopped."""
        try:
            return STATE_NAMES.get(dom.state()[0], "stopped")
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "stopped"
            raise NodeError(f"cannot read domain state: {exc.get_error_message()}") from None

    def suspend(self, dom: Any) -> None:
        with libvirt_errors(f"cannot pause {dom.name()}"):
            dom.suspend()

    def resume(self, dom: Any) -> None:
        with libvirt_errors(f"cannot resume {dom.name()}"):
            dom.resume()

    def start(self, dom: Any) -> None:
        with libvirt_errors(f"cannot start {dom.name()}"):
            dom.create()

    def destroy(self, dom: Any) -> None:
        """Stop a domain now; a domain that is already gone (a transient one after save) is fine."""
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return  # not running, or no longer exists
            raise NodeError(f"cannot stop {dom.name()}: {exc.get_error_message()}") from None

    def undefine(self, dom: Any) -> None:
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                return
            raise NodeError(f"cannot undefine {dom.name()}: {exc.get_error_message()}") from None

    def define(self, xml: str) -> Any:
        with libvirt_errors("cannot define domain"):
            return self.conn.defineXML(xml)

    def save(self, dom: Any, path: Path) -> None:
        """Save the domain's memory state to a file; the domain stops (its disk is then quiescent)."""
        with libvirt_errors(f"cannot save the memory of {dom.name()}"):
            dom.save(str(path))

    def saved_xml(self, path: Path) -> str:
        with libvirt_errors(f"cannot read the domain in memory state {path}"):
            return str(self.conn.saveImageGetXMLDesc(str(path), 0))

    def restore(self, path: Path, xml: str | None = None, *, running: bool = True) -> None:
        flags = libvirt.VIR_DOMAIN_SAVE_RUNNING if running else libvirt.VIR_DOMAIN_SAVE_PAUSED
        with libvirt_errors(f"cannot restore memory state {path}"):
            self.conn.restoreFlags(str(path), xml, flags)

    def hostfwd(self, dom: Any, *, add: Sequence[PortMap], remove: Sequence[PortMap], address: str) -> None:
        """Change a live domain's user-net port forwards (QEMU HMP hostfwd_add/hostfwd_remove)."""
        flags = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        for verb, ports in (("hostfwd_remove", remove), ("hostfwd_add", add)):
            for p in ports:
                rule = dx.hostfwd_rule(p, address)
                if verb == "hostfwd_remove":
                    rule = rule.rsplit("-", 1)[0]  # remove takes [tcp|udp]:[hostaddr]:hostport
                with libvirt_errors(f"cannot {verb} {p} on {dom.name()}"):
                    out = str(libvirt_qemu.qemuMonitorCommand(dom, f"{verb} {dx.NIC_ID} {rule}", flags))
                # QEMU answers an add with nothing, a remove with "host forwarding rule for ... removed".
                ok = "removed" in out if verb == "hostfwd_remove" else not out.strip()
                if not ok:
                    raise NodeError(f"{verb} {p} on {dom.name()}: {out.strip() or 'no answer'}")

    # ------------------------------------------------------------------------------------ events

    def wait_paused(
        self, dom: Any, *, timeout: float | None = None, on_ready: Callable[[], None] | None = None
    ) -> None:
        """Block until the domain is paused by anyone (virsh suspend, virt-manager, a test), woken by
        libvirt lifecycle events. Raises NodeError if it stops instead, InvalidInput on timeout."""
        uuid = dom.UUIDString()
        woke = threading.Event()
        seen: list[int] = []
        wanted = {
            libvirt.VIR_DOMAIN_EVENT_SUSPENDED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED,
            libvirt.VIR_DOMAIN_EVENT_SHUTDOWN,
            libvirt.VIR_DOMAIN_EVENT_CRASHED,
        }

        def on_event(_conn: Any, d: Any, event: int, _detail: int, _opaque: Any) -> None:
            if d.UUIDString() == uuid and event in wanted:
                seen.append(event)
                woke.set()

        with libvirt_errors("cannot listen for domain events"):
            cb = self.conn.domainEventRegisterAny(dom, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_event, None)
        try:
            if on_ready:
                on_ready()
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                # The state check after registering closes the race with a pause that came first.
                state = self.state(dom)
                if state == "paused":
                    return
                if state == "stopped":
                    raise NodeError(f"{dom.name()} stopped before it was paused; nothing was captured")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise InvalidInput(
                        f"{dom.name()} was not paused within {timeout:g} s; nothing was captured"
                    )
                # Woken by an event; the timeout only bounds a lost event (connection trouble).
                woke.wait(timeout=30.0 if left is None else min(30.0, left))
                woke.clear()
        finally:
            with suppress(libvirt.libvirtError):
                self.conn.domainEventDeregisterAny(cb)


EVENT_NAMES = (
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
)
SUSPENDED_DETAILS = ("paused", "migrated", "ioerror", "watchdog", "restored", "from_snapshot", "api_error")
STOPPED_DETAILS = ("shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "from_snapshot")


def event_name(event: int, detail: int) -> str:
    """A lifecycle event as text: 'suspended:paused' (a user pause), 'stopped:saved', 'undefined', ..."""
    name = EVENT_NAMES[event] if 0 <= event < len(EVENT_NAMES) else f"event{event}"
    details = {"suspended": SUSPENDED_DETAILS, "stopped": STOPPED_DETAILS}.get(name)
    if details is None:
        return name
    return f"{name}:{details[detail] if 0 <= detail < len(details) else detail}"


def watch_lifecycle(hv: Hypervisor, uuid: str, on_event: Callable[[str], None]) -> Callable[[], None]:
    """Call on_event(event_name) for every lifecycle event of one domain (from libvirt's event thread).
    Returns the function that stops watching."""

    def cb(_conn: Any, d: Any, event: int, detail: int, _opaque: Any) -> None:
        if d.UUIDString() == uuid:
            on_event(event_name(event, detail))

    with libvirt_errors("cannot listen for domain events"):
        cb_id = hv.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)

    def stop() -> None:
        with suppress(libvirt.libvirtError):
            hv.conn.domainEventDeregisterAny(cb_id)

    return stop


def qemu_pid(domain_name: str) -> int | None:
    """The QEMU process of a domain, found by its `-name guest=NAME` argument (works whatever mount
    namespace libvirtd keeps its pid files in)."""
    needle = f"guest={domain_name},".encode()
    needle_end = f"guest={domain_name}\0".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"qemu" in cmd and (needle in cmd or needle_end in cmd):
            return int(entry.name)
    return None
