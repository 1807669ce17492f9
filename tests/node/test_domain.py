"""Domain XML built and rewritten by nephele; the save-image header rewrite; port parsing."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from nephele.errors import InvalidInput
from nephele.model import PortMap
from nephele.node import domain as dx
from nephele.node.instances import parse_ports

Q = f"{{{dx.QEMU_NS}}}"


def spec(**kw: object) -> dx.DomainSpec:
    base: dict[str, object] = dict(
        name="nephele-build-1",
        uuid="11111111-2222-3333-4444-555555555555",
        title="tiny",
        disk="/var/nephele/tmp/b/disk.raw",
        disk_format="raw",
        serial_log="/var/nephele/tmp/b/serial.log",
        memory_kib=131072,
        cpus=1,
        boot=dx.Boot("/k", "/i", "console=ttyS0"),
        tags={"role": "build", "name": "tiny"},
    )
    base.update(kw)
    return dx.DomainSpec(**base)  # type: ignore[arg-type]


def test_build_xml_shape() -> None:
    root = ET.fromstring(dx.build_xml(spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/k" and root.findtext("os/initrd") == "/i"
    assert root.find("devices/disk/target").get("bus") == "virtio"  # type: ignore[union-attr]
    assert root.find("devices/serial/source").get("path").endswith("serial.log")  # type: ignore[union-attr]
    args = [a.get("value") for a in root.findall(f"{Q}commandline/{Q}arg")]
    assert args[0] == "-netdev" and args[1] == "user,id=nnet0"
    assert "addr=0x10" in args[3] and "mac=52:54:00:4e:50:01" in args[3]
    assert dx.read_tags(dx.build_xml(spec())) == {"role": "build", "name": "tiny"}


def test_disk_boot_without_kernel_and_kvm_type() -> None:
    root = ET.fromstring(dx.build_xml(spec(boot=dx.Boot(), domain_type="kvm")))
    assert root.get("type") == "kvm"
    assert root.find("os/kernel") is None and root.find("os/boot").get("dev") == "hd"  # type: ignore[union-attr]


def test_rewrite_for_instance_keeps_devices_changes_identity_and_forwards() -> None:
    saved = dx.build_xml(spec())
    new = dx.rewrite_for_instance(
        saved,
        name="nephele-abc",
        uuid="99999999-2222-3333-4444-555555555555",
        title="web-1",
        disk="/var/nephele/instances/u/disk.qcow2",
        disk_format="qcow2",
        serial_log="/var/nephele/instances/u/serial.log",
        ports=(PortMap(8080, 80), PortMap(2222, 22)),
        forward_address="10.0.0.1",
        tags={"role": "instance", "title": "web-1", "ports": "8080:80,2222:22"},
        kernel="/img/kernel",
        initrd="/img/initrd",
    )
    root = ET.fromstring(new)
    assert root.findtext("name") == "nephele-abc" and root.findtext("title") == "web-1"
    assert root.findtext("uuid") == "99999999-2222-3333-4444-555555555555"
    assert root.findtext("os/kernel") == "/img/kernel"
    assert dx.disk_path(new) == "/var/nephele/instances/u/disk.qcow2"
    assert root.find("devices/disk/driver").get("type") == "qcow2"  # type: ignore[union-attr]
    args = [a.get("value") for a in root.findall(f"{Q}commandline/{Q}arg")]
    assert args[1] == "user,id=nnet0,hostfwd=tcp:10.0.0.1:8080-:80,hostfwd=tcp:10.0.0.1:2222-:22"
    assert args[3] == [a.get("value") for a in ET.fromstring(saved).findall(f"{Q}commandline/{Q}arg")][3]
    assert dx.read_tags(new) == {"role": "instance", "title": "web-1", "ports": "8080:80,2222:22"}
    assert len(root.findall(f"{Q}commandline")) == 1 and len(root.findall("metadata")) == 1


def test_tag_xml_round_trip() -> None:
    text = dx.tag_xml({"title": "a&b", "ports": "80:80"})
    assert dx.parse_tag_element(text) == {"title": "a&b", "ports": "80:80"}
    assert dx.ports_from_text(dx.ports_to_text((PortMap(1, 2), PortMap(3, 3)))) == (
        PortMap(1, 2),
        PortMap(3, 3),
    )


def test_parse_ports() -> None:
    assert parse_ports("80,8443:443") == (PortMap(80, 80), PortMap(8443, 443))
    assert parse_ports(["8080:80"]) == (PortMap(8080, 80),)
    assert parse_ports(None) == () and parse_ports("") == ()
    for bad, msg in (("http", "expected PORT"), ("0:80", "1-65535"), ("80,80:81", "given twice")):
        with pytest.raises(InvalidInput, match=msg):
            parse_ports(bad)
