"""Domain XML, built and rewritten by nephele (pure: no libvirt, no I/O), and the nephele metadata tag.

A nephele domain:
  * `<domain type='qemu'>` (TCG) or 'kvm', chosen by the node's boot test;
  * boots a kernel+initrd directly (the test guest) or a disk image's boot loader;
  * one virtio disk (vda) and a serial console written to a log file;
  * a user-mode NIC given on the QEMU command line (`<qemu:commandline>`), because libvirt's own
    `<interface type='user'>` cannot forward host ports. The device sits at a fixed PCI address with a
    fixed MAC, so a memory state captured with one set of forwards restores with another: only the
    netdev (host side) changes, never the guest-visible device;
  * a `<nephele:domain>` metadata element (role, title, image, snapshot, ports, ...) so `virsh list`
    shows an ordinary domain and observation finds nephele's own.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nephele.model import PortMap

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NEPHELE_NS = "https://nephele.dev/ns/domain/1"
NEPHELE_PREFIX = "nephele"
NIC_ID = "nnet0"
NIC_PCI_ADDR = "0x10"  # clear of libvirt's automatic slots (2 is taken by the first device it places)
NIC_MAC = "52:54:00:4e:50:01"
DESCRIPTION = "*NEPHELE managed*"

ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class Boot:
    """How the guest boots: kernel+initrd (direct) or the disk's own boot loader (kernel None)."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    title: str
    disk: str
    disk_format: str
    serial_log: str
    memory_kib: int
    cpus: int
    boot: Boot
    domain_type: str = "qemu"
    ports: tuple[PortMap, ...] = ()
    forward_address: str = ""
    tags: Mapping[str, str] | None = None


def netdev_args(ports: Sequence[PortMap], address: str = "") -> list[str]:
    """QEMU arguments for the NIC: the same device every time, hostfwd rules per instance."""
    netdev = f"user,id={NIC_ID}" + "".join(f",hostfwd=tcp:{address}:{p.host}-:{p.guest}" for p in ports)
    device = f"virtio-net-pci,netdev={NIC_ID},romfile=,bus=pci.0,addr={NIC_PCI_ADDR},mac={NIC_MAC}"
    return ["-netdev", netdev, "-device", device]


def build_xml(spec: DomainSpec) -> str:
    dom = ET.Element("domain", {"type": spec.domain_type})
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    ET.SubElement(dom, "title").text = spec.title
    ET.SubElement(dom, "description").text = DESCRIPTION
    if spec.tags is not None:
        meta = ET.SubElement(dom, "metadata")
        meta.append(tag_element(spec.tags))
    ET.SubElement(dom, "memory", {"unit": "KiB"}).text = str(spec.memory_kib)
    # RAM in a memfd: a handoff reads the true guest memory at the switchover (guestram.py)
    backing = ET.SubElement(dom, "memoryBacking")
    ET.SubElement(backing, "source", {"type": "memfd"})
    ET.SubElement(backing, "access", {"mode": "shared"})
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", {"arch": "x86_64", "machine": "pc"}).text = "hvm"
    if spec.boot.kernel:
        ET.SubElement(os_el, "kernel").text = spec.boot.kernel
        if spec.boot.initrd:
            ET.SubElement(os_el, "initrd").text = spec.boot.initrd
        ET.SubElement(os_el, "cmdline").text = spec.boot.cmdline
    else:
        ET.SubElement(os_el, "boot", {"dev": "hd"})
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(dom, event).text = "destroy"
    devices = ET.SubElement(dom, "devices")
    if spec.disk:  # no disk: the accelerator boot test
        disk = ET.SubElement(devices, "disk", {"type": "file", "device": "disk"})
        ET.SubElement(disk, "driver", {"name": "qemu", "type": spec.disk_format})
        ET.SubElement(disk, "source", {"file": spec.disk})
        ET.SubElement(disk, "target", {"dev": "vda", "bus": "virtio"})
    serial = ET.SubElement(devices, "serial", {"type": "file"})
    ET.SubElement(serial, "source", {"path": spec.serial_log})
    ET.SubElement(serial, "target", {"port": "0"})
    ET.SubElement(devices, "memballoon", {"model": "none"})
    _set_netdev(dom, spec.ports, spec.forward_address)
    return ET.tostring(dom, encoding="unicode")


def _set_netdev(dom: ET.Element, ports: Sequence[PortMap], address: str) -> None:
    for old in dom.findall(f"{{{QEMU_NS}}}commandline"):
        dom.remove(old)
    cmd = ET.SubElement(dom, f"{{{QEMU_NS}}}commandline")
    for arg in netdev_args(ports, address):
        ET.SubElement(cmd, f"{{{QEMU_NS}}}arg", {"value": arg})


def with_ports(domain_xml: str, ports: Sequence[PortMap], address: str) -> str:
    """The same domain with other port forwards (for its persistent definition)."""
    dom = ET.fromstring(domain_xml)
    _set_netdev(dom, ports, address)
    return ET.tostring(dom, encoding="unicode")


def hostfwd_rule(port: PortMap, address: str) -> str:
    """A forward as QEMU's HMP hostfwd_add/hostfwd_remove write it."""
    return f"tcp:{address}:{port.host}-:{port.guest}"


def tag_element(tags: Mapping[str, str]) -> ET.Element:
    return ET.Element(f"{{{NEPHELE_NS}}}domain", {k: v for k, v in sorted(tags.items()) if v is not None})


def tag_xml(tags: Mapping[str, str]) -> str:
    """The metadata element as libvirt's setMetadata wants it: unqualified; libvirt puts it in the
    namespace given with the call."""
    el = ET.Element("domain", {k: v for k, v in sorted(tags.items()) if v is not None})
    return ET.tostring(el, encoding="unicode")


def read_tags(domain_xml: str) -> dict[str, str] | None:
    """The nephele tags of a domain, or None when it is not nephele's."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    el = root.find(f"metadata/{{{NEPHELE_NS}}}domain")
    return dict(el.attrib) if el is not None else None


def parse_tag_element(text: str) -> dict[str, str]:
    return dict(ET.fromstring(text).attrib)


def rewrite_for_instance(
    saved_xml: str,
    *,
    name: str,
    uuid: str,
    title: str,
    disk: str,
    disk_format: str,
    serial_log: str,
    ports: Sequence[PortMap],
    forward_address: str,
    tags: Mapping[str, str],
    kernel: str | None = None,
    initrd: str | None = None,
) -> str:
    """The XML a memory state is restored with: the captured domain (same devices, so the guest state
    fits) under a new identity, with this instance's disk, log, files and port forwards."""
    dom = ET.fromstring(saved_xml)
    _text(dom, "name", name)
    _text(dom, "uuid", uuid)
    _text(dom, "title", title)
    _text(dom, "description", DESCRIPTION)
    for old in dom.findall("metadata"):
        dom.remove(old)
    meta = ET.Element("metadata")
    meta.append(tag_element(tags))
    dom.insert(_index_after(dom, ("name", "uuid", "title", "description")), meta)
    os_el = dom.find("os")
    if os_el is not None:
        if kernel is not None and os_el.find("kernel") is not None:
            _text(os_el, "kernel", kernel)
        if initrd is not None and os_el.find("initrd") is not None:
            _text(os_el, "initrd", initrd)
    vda = _disk(dom, "vda")
    driver = vda.find("driver")
    if driver is None:
        driver = ET.SubElement(vda, "driver", {"name": "qemu"})
    driver.set("type", disk_format)
    source = vda.find("source")
    if source is None:
        source = ET.SubElement(vda, "source")
    source.attrib.clear()
    source.set("file", disk)
    for backing in vda.findall("backingStore"):
        vda.remove(backing)
    for serial in dom.findall("devices/serial") + dom.findall("devices/console"):
        src = serial.find("source")
        if serial.get("type") == "file" and src is not None:
            src.set("path", serial_log)
    _set_netdev(dom, ports, forward_address)
    return ET.tostring(dom, encoding="unicode")


def disk_path(domain_xml: str) -> str | None:
    src = _disk(ET.fromstring(domain_xml), "vda").find("source")
    return src.get("file") if src is not None else None


def _disk(dom: ET.Element, target: str) -> ET.Element:
    for disk in dom.findall("devices/disk"):
        t = disk.find("target")
        if t is not None and t.get("dev") == target:
            return disk
    raise ValueError(f"domain has no disk {target}")


def _text(parent: ET.Element, tag: str, value: str) -> None:
    el = parent.find(tag)
    if el is None:
        el = ET.Element(tag)
        parent.insert(_index_after(parent, ("name", "uuid")), el)
    el.text = value


def _index_after(parent: ET.Element, tags: Sequence[str]) -> int:
    idx = 0
    for i, child in enumerate(list(parent)):
        if child.tag in tags:
            idx = i + 1
    return idx


def ports_to_text(ports: Sequence[PortMap]) -> str:
    return ",".join(str(p) for p in ports)


def ports_from_text(text: str | None) -> tuple[PortMap, ...]:
    return tuple(PortMap.parse(p) for p in (text or "").split(",") if p.strip())


def describe(tags: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))
