"""The destination node's side of a live handoff: the agent op ``handoff.receive``.

It runs for the whole handoff (the controller calls it in parallel with the source's ``handoff.send``):

1. checks (no such instance here yet, the base image is here, the forwarded ports are free, the disk path
   is the same as on the source), prepares the reference images, pre-creates the empty qcow2 overlay at
   the instance's disk path, picks the loopback ports the destination QEMU will listen on;
2. opens the handoff port for this one handoff (token from the controller) and reports
   ``@handoff {"event": "ready", ...}`` on its progress stream;
3. serves the channels: memory (rebuilt stream into 127.0.0.1:P), disk (NBD, to 127.0.0.1:P2), libvirt
   control (to this node's libvirtd unix socket);
4. succeeds only when the stream was verified and libvirt reports the domain running here, persistent;
   writes the .log/.stats records all along.

On any failure it makes sure nothing is left: the incoming domain (unless it runs), the overlay and the
instance directory; the error says what happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, HandoffError, InvalidInput, NepheleError, NotFound
from nephele.handoff import channel as ch
from nephele.handoff import heatmap_server
from nephele.handoff import refs as refsmod
from nephele.handoff import resume as resumemod
from nephele.handoff.forward import ForwardStats, NbdTap, forward
from nephele.handoff.memory import MemoryDestination, MemoryStats
from nephele.handoff.records import HandoffRecord, Records
from nephele.node import domain as dx
from nephele.node import images, instances, migrate
from nephele.node.hypervisor import Hypervisor
from nephele.node.procs import pid_alive
from nephele.node.runtime import NodeContext
from nephele.node.store import atomic_write_json

PROGRESS_PREFIX = "@handoff "
CONNECT_TIMEOUT = 120.0  # from ready to the source's memory channel (libvirt Prepare starts QEMU first)
CONTROL_GRACE = 10.0  # control channel gone, memory stream not done: wait this long, then give up
RESUME_TIMEOUT = 60.0  # from the verified end of the stream to the domain running here
BLOCK = 4096


def emit(ctx: NodeContext, event: str, **data: Any) -> None:
    ctx.progress(PROGRESS_PREFIX + json.dumps({"event": event, **data}, sort_keys=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Channels:
    """What the listener accepted, and the threads serving it."""

    def __init__(self, ctx: NodeContext, mem_port: int, disk_port: int, refs: dict[str, Any]) -> None:
        self.ctx = ctx
        self.mem_port = mem_port
        self.disk_port = disk_port
        self.refs = refs
        self.memory: MemoryDestination | None = None
        self.memory_stats: MemoryStats | None = None
        self.memory_done = threading.Event()
        self.forwards: list[tuple[str, ForwardStats]] = []
        self.disk_tap = NbdTap()
        self.peers: set[str] = set()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.observer: Any = None  # heatmap hook, passed to the memory channel
        self.resume: resumemod.ResumeCache | None = None  # pages kept from/for a failed attempt
        # when the source's libvirt connection ended: libvirt keeps it for the whole migration, so
        # before the memory stream completed it means the source is gone (killed, aborted)
        self.control_closed = 0.0

    def on_channel(self, acc: ch.Accepted) -> None:
        self.peers.add(acc.peer)
        try:
            if acc.channel == ch.MEMORY:
                with self.lock:
                    if self.memory is not None:
                        acc.sock.close()
                        self.errors.append("a second memory channel was refused")
                        return
                    self.memory = MemoryDestination(
                        acc.sock,
                        ("127.0.0.1", self.mem_port),
                        self.refs,
                        scratch_dir(self.ctx),
                        observer=self.observer,
                        resume=self.resume,
                    )
                self.memory_stats = self.memory.run()
                self.memory_done.set()
            elif acc.channel == ch.DISK:
                st = ForwardStats()
                self.forwards.append(("disk", st))
                local = socket.create_connection(("127.0.0.1", self.disk_port), timeout=10)
                local.settimeout(None)
                forward(local, acc.sock, tap_in=self.disk_tap, stats=st)
            elif acc.channel == ch.CONTROL:
                st = ForwardStats()
                self.forwards.append(("control", st))
                local = socket.socket(socket.AF_UNIX)
                local.connect(migrate.libvirt_socket(self.ctx.hv.uri))
                forward(local, acc.sock, stats=st)
                self.control_closed = self.control_closed or time.monotonic()
        except OSError as exc:
            self.errors.append(f"{ch.CHANNEL_NAMES.get(acc.channel)} channel: {exc}")
            with contextlib.suppress(OSError):
                acc.sock.close()
            if acc.channel == ch.MEMORY:
                self.memory_done.set()
            elif acc.channel == ch.CONTROL:
                self.control_closed = self.control_closed or time.monotonic()

    def wire(self) -> dict[str, int]:
        out: dict[str, int] = {}
        m = self.memory.stats if self.memory is not None else None
        if m is not None:
            out["memory"] = m.wan_in
        for name, st in self.forwards:
            out[name] = out.get(name, 0) + st.wan_in
        return out


def _update(rec: HandoffRecord, chans: _Channels) -> None:
    rec.wire = chans.wire()
    m = chans.memory.stats if chans.memory is not None else None
    dec = chans.memory._dec if chans.memory is not None else None  # live decoder counters
    if m is not None:
        rec.iteration = m.iteration
        rec.stream_bytes = m.stream_bytes
        k = m.delta or (dec.stats if dec is not None else None)
        if k is not None:
            mk = k.kind("memory")
            zeros = mk.zeros + m.zero_records
            rec.memory = (mk.by_value + mk.by_ref + zeros, mk.by_value, mk.by_ref, zeros)
            rec.frames = k.frames
    t = chans.disk_tap
    rec.disk = (t.write_bytes // BLOCK, (t.write_bytes - t.zero_bytes) // BLOCK, 0, t.zero_bytes // BLOCK)


def receive(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    try:
        hid = bytes.fromhex(str(args["handoff_id"]))
        token = bytes.fromhex(str(args["token"]))
        inst = dict(args["instance"])
        uuid = str(inst["uuid"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidInput(f"handoff.receive: bad request ({exc})") from None
    port = int(args.get("port") or 8022)
    address = str(args.get("address") or "")
    source_ip = str(args.get("source_ip") or "unknown")
    title = f"{inst.get('title')!r} ({uuid})"
    hv = ctx.hv
    if migrate.domain_state(hv, uuid) is not None:
        raise Conflict(f"instance {title} already exists on this node")
    sweep_stale(ctx)
    try:
        image = images.resolve(ctx.store, str(inst["image"]))
    except NotFound:
        raise NotFound(
            f"the base image {str(inst['image'])[:12]} of instance {title} is not on this node: "
            "copy the image here first (a handoff ships only what differs from it)"
        ) from None
    missing = [f for f in inst.get("boot_files") or [] if not Path(str(f)).is_file()]
    if missing:
        raise NotFound(
            f"instance {title} boots from {', '.join(map(str, missing))}, not on this node: its base image "
            f"{str(inst['image'])[:12]} here is incomplete or kept elsewhere"
        )
    platform = inst.get("platform")
    if isinstance(platform, dict):
        problem = migrate.platform_problem(hv, {str(k): str(v) for k, v in platform.items()})
        if problem:
            raise Conflict(f"this node cannot run instance {title}: {problem}")
    ports = dx.ports_from_text(",".join(inst.get("ports") or []))
    instances.check_ports_free(ctx, ports)
    inst_dir = ctx.store.instance_dir(uuid)
    disk = Path(str(inst["disk"]))
    if disk.parent != inst_dir:
        raise InvalidInput(
            f"the instance disk is {disk} on the source, outside {inst_dir} here: both nodes need the same "
            "node root for a live handoff (libvirt keeps the disk path)"
        )
    disk_format = str(inst.get("disk_format") or "qcow2")
    if disk_format not in ("qcow2", "raw"):
        raise InvalidInput(f"instance disk format {disk_format!r}: a live handoff takes qcow2 or raw disks")
    if inst_dir.exists():
        raise Conflict(f"{inst_dir} already exists on this node (a leftover of another handoff?)")
    cache: resumemod.ResumeCache | None = None
    if args.get("resume", True) is not False:
        cache = resumemod.ResumeCache(ctx.store.root, uuid)
    if not check_space(ctx, inst, title, resume=cache is not None):
        cache = None  # room for the handoff, not for keeping its pages: a retry would start over

    heatmap_port = heatmap_server.wanted_port(ctx.store.root, args)  # None: off (the default)
    rec = HandoffRecord(
        source_ip, str(inst.get("title")), uuid, int(inst["memory_bytes"]), int(inst["disk_size"])
    )
    records = Records(ctx.store.logs, rec)
    hm = heatmap_server.open_session(heatmap_port, rec, records, address)
    listener: ch.HandoffListener | None = None
    unwatch = None
    chans: _Channels | None = None
    mark = migrate.LifecycleMark()
    ok = False
    try:
        ctx.progress("Preparing reference images (base disk and memory)...")
        refs = refsmod.prepare(ctx.store, image)
        records.log(f"references: {', '.join(sorted(refs)) or 'none'}")
        inst_dir.mkdir(parents=True)
        (inst_dir / INCOMING).write_text(str(os.getpid()))  # a killed receiver's dir is found by this
        if disk_format == "qcow2":  # an empty overlay on the local base: the mirror copies only the top
            migrate.create_overlay(disk, image.disk, int(inst["disk_size"]))
        else:  # a raw disk is copied whole
            migrate.create_sparse(disk, int(inst["disk_size"]))
        mem_port, disk_port = free_port(), free_port()
        listener = ch.HandoffListener(address, port, hid, token)
        unwatch = migrate.watch_lifecycle(hv, uuid, mark)
        offered = cache.refs() if cache is not None else {}
        if offered:
            records.log(f"resume: offering what an earlier attempt kept ({', '.join(sorted(offered))})")
        chans = _Channels(ctx, mem_port, disk_port, {**refs, **offered})
        chans.resume = cache
        if hm is not None:
            chans.observer = chans.disk_tap.observer = hm.observe
        threading.Thread(target=listener.accept_loop, args=(chans.on_channel,), daemon=True).start()
        records.start()
        records.log(f"listening on port {port}; destination QEMU ports memory {mem_port}, disk {disk_port}")
        emit(
            ctx,
            "ready",
            memory_port=mem_port,
            disk_port=disk_port,
            refs=sorted(refs),
            resume=sorted(offered),
            pid=os.getpid(),
            stats=str(records.stats_path),
            log=str(records.log_path),
            heatmap_port=hm.port if hm is not None else None,
        )
        t_ready = time.monotonic()
        while not chans.memory_done.wait(0.5):
            _update(rec, chans)
            if chans.memory is None and time.monotonic() - t_ready > CONNECT_TIMEOUT:
                raise HandoffError(f"the source did not open the memory channel within {CONNECT_TIMEOUT:g} s")
            if chans.control_closed and time.monotonic() - chans.control_closed > CONTROL_GRACE:
                raise HandoffError(
                    "the source's libvirt connection (control channel) closed before the memory stream "
                    "completed: the source gave up or was stopped"
                )
        _update(rec, chans)
        ms = chans.memory_stats
        if ms is None or ms.error or not ms.verified:
            why = (ms.error if ms is not None else None) or "; ".join(chans.errors) or "no memory stream"
            raise HandoffError(f"the memory stream failed: {why}")
        records.log(
            f"migration stream verified: {ms.stream_bytes} bytes, sha256 {ms.sha256}, "
            f"{ms.pages} pages, {ms.zero_records} zero records"
        )
        records.log(
            f"RAM check at switchover: {ms.corrected} stale page(s) QEMU had not resent were sent"
            if ms.checked
            else "RAM check at switchover: not available (the instance's RAM is not in a memfd)"
        )
        deadline = time.monotonic() + RESUME_TIMEOUT
        while migrate.domain_state(hv, uuid) != "running" or not migrate.is_persistent(hv, uuid):
            if time.monotonic() > deadline:
                raise HandoffError(
                    f"the stream was verified but the domain did not run here within {RESUME_TIMEOUT:g} s "
                    f"(state: {migrate.domain_state(hv, uuid) or 'gone'})"
                )
            time.sleep(0.1)
        resumed = mark.resumed or time.time()
        stopped = ms.stopped_at
        rec.downtime = (resumed - stopped) if stopped is not None else None
        _adopt(hv, uuid, inst_dir)
        rec.status = "completed"
        records.log(f"{rec.title} runs here; downtime {rec.downtime if rec.downtime is not None else '?'} s")
        ok = True
        _update(rec, chans)
        return {
            **rec.to_dict(),
            "resumed_at": resumed,
            "memory": {k: v for k, v in vars(ms).items() if k != "delta"},
            "refs": sorted(refs),
            "resume": sorted(offered),
            "stats_file": str(records.stats_path),
            "log_file": str(records.log_path),
            "peers": sorted(chans.peers),
            "refused": list(listener.refused),
        }
    except BaseException as exc:
        msg = str(exc) or type(exc).__name__
        rec.status = f"failed: {msg}"
        records.log(f"FAILED: {msg}")
        _cleanup(ctx, uuid, inst_dir, records)
        if isinstance(exc, NepheleError):
            raise
        if isinstance(exc, KeyboardInterrupt):
            raise HandoffError(f"the destination was interrupted ({exc}); it cleaned up") from None
        raise
    finally:
        if listener is not None:
            listener.close()
        if chans is not None:
            _update(rec, chans)
        if unwatch is not None:
            unwatch()
        if not ok and rec.status == "running":
            rec.status = "failed"
        if cache is not None:
            _settle_resume(cache, chans, ok, rec.status, records)
        elif ok:  # a handoff without resume still ends what was kept for this instance here
            shutil.rmtree(resumemod.resume_root(ctx.store.root) / uuid, ignore_errors=True)
        records.stop()
        shutil.rmtree(scratch_dir(ctx), ignore_errors=True)
        if hm is not None:  # keep the images with the log; the page may stay up heatmap_linger s
            hm.close(records, float(args.get("heatmap_linger") or 0))


def _settle_resume(
    cache: resumemod.ResumeCache, chans: _Channels | None, ok: bool, status: str, records: Records
) -> None:
    """After the receive: a success removes what was kept for this instance; a failure keeps what this
    attempt verified (merged with what earlier ones kept), unless the attempt used the cache and failed
    verification (a bad cache must not fail every retry)."""
    if ok:
        cache.discard()
        return
    mem = chans.memory if chans is not None else None
    if mem is not None and not mem.done.wait(30):  # its writes must stop before the files are settled
        records.log("resume: the memory channel did not stop; nothing kept")
        cache.discard()
        return
    if cache.kept and "verif" in status:
        cache.discard()
        records.log("resume: the attempt that used the kept pages failed verification; dropped them")
        return
    kept = cache.keep()
    if kept.get("kept"):
        records.log(f"resume: kept {kept['pages']} verified page(s) for a retry (until swept, 1 h)")


def _cleanup(ctx: NodeContext, uuid: str, inst_dir: Any, records: Records) -> None:
    """Leave nothing of a failed incoming handoff: libvirt normally removes the incoming domain itself
    (when the migration is cancelled or its control connection closes); give it a moment, then remove
    whatever is left, but never a domain that runs here."""
    hv = ctx.hv
    deadline = time.monotonic() + 30
    state = migrate.domain_state(hv, uuid)
    while state is not None and state != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
        state = migrate.domain_state(hv, uuid)
    if state == "running":
        # The migration completed before this receiver was stopped (the controller killed, a check
        # after the resume): the instance lives here now, as after a successful handoff.
        try:
            _adopt(hv, uuid, inst_dir)
        except Exception as exc:  # the original failure is what the caller reports
            records.log(f"the domain runs here although the handoff failed; recording it failed: {exc}")
        else:
            records.log("the domain runs here although the handoff failed: it is the instance now")
        return
    if state is not None and migrate.remove_domain(hv, uuid):
        records.log("removed the incoming domain")
    _remove_dir(ctx, uuid)
    records.log("cleaned up the instance directory")


def _adopt(hv: Hypervisor, uuid: str, inst_dir: Path) -> None:
    """Make the domain that runs here the instance: drop the source's "being handed off" mark that
    the migrated XML carries, and record the instance in its directory."""
    dom = hv.lookup(uuid)
    info = hv.info(dom)
    tags = {k: v for k, v in info.tags.items() if k not in ("handoff_url", "handoff_pid")}
    hv.set_tags(dom, tags)
    atomic_write_json(inst_dir / "instance.json", {"uuid": uuid, "name": info.name, **tags})
    (inst_dir / INCOMING).unlink(missing_ok=True)


def _remove_dir(ctx: NodeContext, uuid: str) -> None:
    try:
        ctx.store.remove_instance_dir(uuid)
    except OSError:  # instances/ on another file system than tmp/ (the store renames into tmp/ first)
        shutil.rmtree(ctx.store.instance_dir(uuid), ignore_errors=True)


INCOMING = ".handoff-incoming"  # in an instance dir while a handoff into it runs: the receiver's pid
SPACE_SLACK = 16 << 20  # qcow2 metadata, the guest's writes during the handoff, the records


def scratch_dir(ctx: NodeContext, pid: int | None = None) -> Path:
    """Where this receiver's delta decoder keeps its RAM scratch images."""
    return ctx.store.tmp / f"handoff-{pid or os.getpid()}"


def sweep_stale(ctx: NodeContext) -> list[str]:
    """Remove what killed receivers left: scratch dirs of dead pids, and incoming instance dirs (marked,
    receiver dead) with no domain. Never touches a dir whose receiver lives or whose domain exists; a
    domain that runs (the migration completed before its receiver died) becomes the instance here."""
    removed = resumemod.sweep(ctx.store.root)  # kept pages too old to offer, a killed receiver's writes
    for d in ctx.store.tmp.glob("handoff-*"):
        pid = d.name.removeprefix("handoff-")
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    for marker in ctx.store.instances.glob(f"*/{INCOMING}"):
        uuid = marker.parent.name
        try:
            ctx.store.instance_dir(uuid)
        except NepheleError:
            continue  # not an instance directory nephele made
        try:
            owner = int(marker.read_text().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and pid_alive(owner):
            continue
        state = migrate.domain_state(ctx.hv, uuid)
        if state == "running":  # its receiver was killed after the migration completed
            _adopt(ctx.hv, uuid, marker.parent)
            continue
        if state is not None:
            continue
        _remove_dir(ctx, uuid)
        removed.append(str(marker.parent))
    return removed


def check_space(ctx: NodeContext, inst: dict[str, Any], title: str, *, resume: bool = False) -> bool:
    """Refuse before anything moves when this node cannot hold the disk (the source's allocated bytes)
    and the decoder's RAM scratch (up to the guest's memory). With resume: also room for keeping the
    pages this attempt verifies (up to the guest's memory, in the resume cache) in case it fails; returns
    False when only that does not fit (the handoff then runs without keeping them)."""
    disk = int(inst.get("disk_allocated") or 0) + SPACE_SLACK
    mem = int(inst.get("memory_bytes") or 0)
    free_i, dev_i = migrate.free_bytes(ctx.store.instances)
    free_t, dev_t = migrate.free_bytes(ctx.store.tmp)
    mib = 1 << 20
    if resume:  # everything, per file system
        cache_dir = resumemod.resume_root(ctx.store.root).parent
        cache_dir.mkdir(parents=True, exist_ok=True)
        free_c, dev_c = migrate.free_bytes(cache_dir)
        per_dev: dict[int, int] = {}
        for dev, n in ((dev_i, disk), (dev_t, mem), (dev_c, mem)):
            per_dev[dev] = per_dev.get(dev, 0) + n
        frees = {dev_i: free_i, dev_t: free_t, dev_c: free_c}
        if all(frees[d] >= n for d, n in per_dev.items()):
            return True
    wants = [(ctx.store.instances, free_i, disk + (mem if dev_i == dev_t else 0))]
    if dev_i != dev_t:
        wants.append((ctx.store.tmp, free_t, mem))
    for path, free, need in wants:
        if free < need:
            raise Conflict(
                f"not enough disk space for instance {title}: {path} has {free / mib:.0f} MiB free, the "
                f"handoff needs {need / mib:.0f} MiB (disk {disk / mib:.0f} MiB incl. "
                f"{SPACE_SLACK // mib} MiB slack, memory scratch {mem / mib:.0f} MiB)"
            )
    return not resume


def cleanup(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """``handoff.cleanup``: remove what a failed incoming handoff of instance uuid left (the controller calls
    it
    when the destination's own receive call could not finish, e.g. after its process was killed)."""
    uuid = str(args.get("uuid") or "")
    if not uuid:
        raise InvalidInput("handoff.cleanup: no uuid")
    ctx.store.instance_dir(uuid)  # refuses anything but a canonical UUID before libvirt sees it
    state = migrate.domain_state(ctx.hv, uuid)
    if state == "running":
        return {"uuid": uuid, "removed": False, "state": "running"}
    removed = migrate.remove_domain(ctx.hv, uuid) if state is not None else False
    existed = ctx.store.instance_dir(uuid).exists()
    _remove_dir(ctx, uuid)
    swept = sweep_stale(ctx)
    return {"uuid": uuid, "removed": removed or existed, "state": None, "swept": swept}
