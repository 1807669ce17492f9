"""Instances: VMs resumed from an image's (later: a snapshot's) memory state, one libvirt domain each.

`run` restores the captured memory state under a new identity (name nephele-<uuid>, title = the
instance's title), with a qcow2 overlay on the image's disk as its disk and this instance's host port
forwards, and makes the domain persistent so a stopped instance stays visible (`virsh list --all`).
Everything nephele knows about an instance is in the domain's nephele metadata, so the libvirt
domain list *is* the instance table; `<root>/instances/<uuid>/` holds its files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import socket
import subprocess
import uuid as uuidlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, InvalidInput, NodeError, NotFound
from nephele.model import PortMap
from nephele.node import domain as dx
from nephele.node import images, snapshots
from nephele.node.hypervisor import XML_INACTIVE, DomainInfo, qemu_pid
from nephele.node.runtime import NodeContext
from nephele.node.store import atomic_write_json
from nephele.vmstate import replace_xml


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_ports(value: Any) -> tuple[PortMap, ...]:
    """`80,443`, `8080:80` or a list of those -> port maps (a bare port forwards to the same port)."""
    if value is None or value == "":
        return ()
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    out = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        try:
            pm = PortMap.parse(text)
        except ValueError:
            raise InvalidInput(f"port {text!r}: expected PORT or HOSTPORT:GUESTPORT") from None
        if not (0 < pm.host < 65536 and 0 < pm.guest < 65536):
            raise InvalidInput(f"port {text!r}: ports are 1-65535")
        out.append(pm)
    hosts = [p.host for p in out]
    dup = sorted({h for h in hosts if hosts.count(h) > 1})
    if dup:
        raise InvalidInput(f"host port {dup[0]} is given twice")
    return tuple(out)


def record(info: DomainInfo) -> dict[str, Any]:
    t = info.tags
    return {
        "uuid": info.uuid,
        "title": t.get("title", info.name),
        "name": info.name,
        "state": info.state,
        "pid": qemu_pid(info.name) if info.state != "stopped" else None,
        "ports": [str(p) for p in dx.ports_from_text(t.get("ports"))],
        "snapshot": t.get("snapshot", ""),
        "image": t.get("image", ""),
        "started": t.get("started"),
        "handoff_url": t.get("handoff_url") or None,
        "manifest": t.get("manifest") or None,
        "prune": t.get("prune", "true") != "false",
        "memory_bytes": info.memory_kib * 1024,
    }


def ps(ctx: NodeContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    doms = ctx.hv.nephele_domains(role="instance")
    return sorted((record(d) for d in doms), key=lambda r: (str(r["started"] or ""), r["uuid"]))


def select(ctx: NodeContext, ref: Any) -> DomainInfo:
    """An instance by UUID, UUID prefix or title; an ambiguous title is an error naming the UUIDs."""
    if not isinstance(ref, str) or not ref:
        raise InvalidInput("no instance given (a title or a UUID)")
    doms = ctx.hv.nephele_domains(role="instance")
    for d in doms:
        if d.uuid == ref.lower():
            return d
    by_title = [d for d in doms if d.tags.get("title") == ref]
    if len(by_title) == 1:
        return by_title[0]
    if len(by_title) > 1:
        uuids = ", ".join(d.uuid for d in by_title)
        raise Conflict(f"title {ref!r} is ambiguous: instances {uuids}; give the UUID instead")
    by_prefix = [d for d in doms if len(ref) >= 6 and d.uuid.startswith(ref.lower())]
    if len(by_prefix) == 1:
        return by_prefix[0]
    raise NotFound(f"no instance {ref!r} on this node (`ps` lists them)")


def forwarded_ports(ctx: NodeContext, exclude_uuid: str | None = None) -> dict[int, DomainInfo]:
    """Host ports held by nephele instances that are not stopped."""
    held: dict[int, DomainInfo] = {}
    for d in ctx.hv.nephele_domains(role="instance"):
        if d.uuid == exclude_uuid or d.state == "stopped":
            continue
        for p in dx.ports_from_text(d.tags.get("ports")):
            held[p.host] = d
    return held


def check_ports_free(ctx: NodeContext, ports: Iterable[PortMap], exclude_uuid: str | None = None) -> None:
    held = forwarded_ports(ctx, exclude_uuid)
    for p in ports:
        if p.host in held:
            d = held[p.host]
            raise Conflict(
                f"host port {p.host} is already forwarded to instance {d.tags.get('title')!r} ({d.uuid})"
            )
        if not _bindable(ctx.forward_address, p.host):
            raise Conflict(f"host port {p.host} is in use on this node by another program")


def _bindable(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address or "0.0.0.0", port))
        except OSError as exc:
            return exc.errno != errno.EADDRINUSE
    return True


def run(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    title = args.get("title")
    if not isinstance(title, str) or not title.strip():
        raise InvalidInput("run: no TITLE given")
    ref = str(args.get("snapshot") or args.get("image") or "")
    ports = parse_ports(args.get("ports"))
    disk_only = bool(args.get("disk_only"))
    with ctx.store.lock("run"):
        snap: tuple[Any, dict[str, Any]] | None = None
        try:
            snap = snapshots.resolve(ctx.store, ref)
            image = images.resolve(ctx.store, snap[1]["image"])
        except NotFound:
            image = images.resolve(ctx.store, ref)
        check_ports_free(ctx, ports)
        uuid = str(uuidlib.uuid4())
        name = f"nephele-{uuid.replace('-', '')[:12]}"
        inst_dir = ctx.store.instance_dir(uuid)
        inst_dir.mkdir(parents=True)
        tags = {
            "role": "instance",
            "title": title,
            "image": image.content_id,
            "snapshot": snap[1]["name"] if snap else ref,
            "ports": dx.ports_to_text(ports),
            "started": _now(),
            "prune": "false" if args.get("prune") is False else "true",
        }
        if args.get("manifest"):
            tags["manifest"] = str(args["manifest"])
        boot = image.meta.get("boot") or {}

        def xml_for(saved_xml: str, disk: Path, disk_format: str) -> str:
            return dx.rewrite_for_instance(
                saved_xml,
                name=name,
                uuid=uuid,
                title=title,
                disk=str(disk),
                disk_format=disk_format,
                serial_log=str(inst_dir / "serial.log"),
                ports=ports,
                forward_address=ctx.forward_address,
                tags=tags,
                kernel=str(image.path / "kernel") if boot.get("kernel") else None,
                initrd=str(image.path / "initrd") if boot.get("initrd") else None,
            )

        try:
            atomic_write_json(
                inst_dir / "instance.json", {"uuid": uuid, "name": name, "image": image.content_id, **tags}
            )
            restore_file: Path | None = None
            if snap is not None:
                disk = inst_dir / "disk.qcow2"
                ctx.progress(f"Rebuilding snapshot {snap[1]['name']} against image {image.short_id}...")
                made = snapshots.materialise(
                    ctx, snap[0], snap[1], inst_dir, lambda saved: xml_for(saved, disk, "qcow2")
                )
                # Every instance disk is a qcow2 overlay on its image's disk, as a live handoff expects:
                # the NBD mirror then moves only the overlay, and the destination holds the base.
                _overlay_from_full(image.disk, inst_dir / "disk.raw", disk)
                if not (disk_only or snap[1].get("disk_only")):
                    restore_file = made
                xml = xml_for(ctx.hv.saved_xml(image.memory), disk, "qcow2")
            else:
                disk = inst_dir / "disk.qcow2"
                _overlay(image.disk, disk)
                xml = xml_for(ctx.hv.saved_xml(image.memory), disk, "qcow2")
                if not disk_only:
                    # libvirt will not restore a save image under another UUID: restore a copy whose
                    # header carries this instance's XML, then drop it (QEMU has read it all).
                    restore_file = inst_dir / "memory.restore"
                    replace_xml(image.memory, xml, out=restore_file)
            if restore_file is None:
                dom = ctx.hv.create(xml, f"instance {title!r}")  # cold boot of the disk
            else:
                try:
                    ctx.hv.restore(restore_file, None, running=True)
                finally:
                    restore_file.unlink(missing_ok=True)
                dom = ctx.hv.lookup(uuid)
                if dom is None:
                    raise NodeError(f"instance {title!r} vanished right after its restore")
            ctx.hv.define(dom.XMLDesc(0))
        except BaseException:
            _cleanup(ctx, uuid)
            raise
    if snap is not None and restore_file is not None:
        from nephele.node import supervisor  # supervisor imports this module

        pid = supervisor.spawn(ctx, uuid)
        ctx.log.info("supervisor %d started for %s (a pause captures %s_N)", pid, uuid, snap[1]["name"])
    info = ctx.hv.info(dom)
    ctx.log.info("run %s (%s) from image %s ports %s", title, uuid, image.content_id, tags["ports"])
    return {"host": ctx.hostname, **record(info)}


def _overlay(base: Any, disk: Any) -> None:
    proc = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise NodeError(f"cannot create the instance disk {disk}: {proc.stderr.strip()}")


def _overlay_from_full(base: Path, full: Path, disk: Path) -> None:
    """Turn a full raw disk into a qcow2 overlay on `base` holding only the clusters that differ:
    an overlay on the full disk, rebased (safe mode compares both backings) onto the base."""
    steps = (
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(full), "-F", "raw", str(disk)],
        ["qemu-img", "rebase", "-q", "-b", str(base), "-F", "raw", str(disk)],
    )
    try:
        for argv in steps:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                disk.unlink(missing_ok=True)
                raise NodeError(f"cannot create the instance disk {disk}: {proc.stderr.strip()}")
    finally:
        full.unlink(missing_ok=True)


def _cleanup(ctx: NodeContext, uuid: str) -> None:
    dom = ctx.hv.lookup(uuid)
    if dom is not None:
        with contextlib.suppress(NodeError):
            ctx.hv.destroy(dom)
            ctx.hv.undefine(dom)
    ctx.store.remove_instance_dir(uuid)


def disk_of(info: DomainInfo) -> Path:
    path = dx.disk_path(info.xml)
    if not path:
        raise NodeError(f"instance {info.uuid} has no disk")
    return Path(path)


def _domain(ctx: NodeContext, args: dict[str, Any]) -> tuple[DomainInfo, Any]:
    info = select(ctx, args.get("instance"))
    dom = ctx.hv.lookup(info.uuid)
    if dom is None:
        raise NotFound(f"instance {info.uuid} vanished")
    return info, dom


def stop(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    info, dom = _domain(ctx, args)
    ctx.hv.destroy(dom)
    ctx.log.info("stop %s (%s)", info.tags.get("title"), info.uuid)
    return record(ctx.hv.info(dom))


def pause(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    info, dom = _domain(ctx, args)
    if info.state == "stopped":
        raise Conflict(f"instance {info.tags.get('title')!r} is stopped; it cannot be paused")
    if info.state != "paused":
        # Tagged first, so the instance's supervisor knows this pause is not a user's snapshot request.
        ctx.hv.set_tags(dom, {**info.tags, "paused_by": "nephele"})
        ctx.hv.suspend(dom)
    ctx.log.info("pause %s (%s)", info.tags.get("title"), info.uuid)
    return record(ctx.hv.info(dom))


def resume(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    info, dom = _domain(ctx, args)
    if info.state == "stopped":
        raise Conflict(f"instance {info.tags.get('title')!r} is stopped; use start")
    if info.state == "paused":
        ctx.hv.resume(dom)
    if "paused_by" in info.tags:
        ctx.hv.set_tags(dom, {k: v for k, v in info.tags.items() if k != "paused_by"})
    ctx.log.info("resume %s (%s)", info.tags.get("title"), info.uuid)
    return record(ctx.hv.info(dom))


def start(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """Boot a stopped instance from its disk (its memory state is gone with the stop)."""
    info, dom = _domain(ctx, args)
    if info.state == "stopped":
        with ctx.store.lock("start"):
            check_ports_free(ctx, dx.ports_from_text(info.tags.get("ports")), exclude_uuid=info.uuid)
            ctx.hv.start(dom)
            ctx.hv.set_tags(dom, {**info.tags, "started": _now()})
    ctx.log.info("start %s (%s)", info.tags.get("title"), info.uuid)
    return record(ctx.hv.info(dom))


def rm(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    info, dom = _domain(ctx, args)
    ctx.hv.destroy(dom)
    ctx.hv.undefine(dom)
    ctx.store.remove_instance_dir(info.uuid)
    ctx.log.info("rm %s (%s)", info.tags.get("title"), info.uuid)
    return {**record(info), "state": "removed", "pid": None}


def set_ports(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """Change an instance's host port forwards: live when it runs (QEMU hostfwd), and in its definition."""
    info, dom = _domain(ctx, args)
    new = parse_ports(args.get("ports"))
    old = dx.ports_from_text(info.tags.get("ports"))
    with ctx.store.lock("set_ports"):
        check_ports_free(ctx, [p for p in new if p.host not in {o.host for o in old}], exclude_uuid=info.uuid)
        if info.state != "stopped":
            ctx.hv.hostfwd(
                dom,
                remove=[p for p in old if p not in new],
                add=[p for p in new if p not in old],
                address=ctx.forward_address,
            )
        ctx.hv.define(dx.with_ports(dom.XMLDesc(XML_INACTIVE), new, ctx.forward_address))
        ctx.hv.set_tags(dom, {**info.tags, "ports": dx.ports_to_text(new)})
    ctx.log.info("ports of %s (%s): %s -> %s", info.tags.get("title"), info.uuid, info.tags.get("ports"), new)
    return record(ctx.hv.info(dom))


def set_handoff_url(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """Mark (url) or unmark (url null) an instance as being handed off; `ps` shows it in HANDOFFURL."""
    info, dom = _domain(ctx, args)
    tags = dict(info.tags)
    url = args.get("url")
    if url:
        tags["handoff_url"] = str(url)
    else:
        tags.pop("handoff_url", None)
    ctx.hv.set_tags(dom, tags)
    return record(ctx.hv.info(dom))
