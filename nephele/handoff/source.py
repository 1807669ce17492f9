"""The source node's side of a live handoff: agent ops ``handoff.prepare`` and ``handoff.send``.

``send`` opens the three loopback listeners libvirt will use (memory, disk, control), each forwarding to an
authenticated channel to the destination's handoff port, marks the instance as being handed off (``ps``
shows HANDOFFURL), starts libvirt's peer-to-peer live migration and reports progress every second
(``@handoff {"event": "progress", ...}`` lines: bytes, rate, ETA, iteration) until it ends.

Safety: if anything fails (a channel, the destination, the link, verification) the migration is aborted
(libvirt's abortJob when it does not stop by itself), the source domain is checked to be running again,
the mark is removed and the error says what happened. The source is released only by libvirt itself
(UNDEFINE_SOURCE, after the destination's Finish reported the domain running there); then its instance
directory goes.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, HandoffError, InvalidInput, NepheleError
from nephele.handoff import channel as ch
from nephele.handoff import refs as refsmod
from nephele.handoff.forward import ForwardStats, NbdTap, ThrottledSocket, TokenBucket, forward
from nephele.handoff.memory import ABORT, MemorySource, MemoryStats
from nephele.node import domain as dx
from nephele.node import guestram, images, instances, migrate
from nephele.node.guestram import GuestRam
from nephele.node.procs import pid_alive
from nephele.node.runtime import NodeContext

PROGRESS_PREFIX = "@handoff "
BLOCK_SETTLE_SECONDS = 60.0  # an earlier failed mirror winding down (see _settle_block_layer)
RATE_WINDOW = 10  # progress samples (~1 s apart) the link rate in a timeout's message is averaged over
STALL_SECONDS = 60.0  # no byte moved on the memory channel for this long while migrating: abort
DEFAULT_DOWNTIME_MS = 1000
ABORT_RETRY_SECONDS = 30.0  # how long a failed source keeps trying to tell the destination


def emit(ctx: NodeContext, event: str, **data: Any) -> None:
    ctx.progress(PROGRESS_PREFIX + json.dumps({"event": event, **data}, sort_keys=True))


def prepare(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """What the destination needs to know about the instance before the handoff starts."""
    info = instances.select(ctx, args.get("instance"))
    if info.state != "running":
        raise Conflict(
            f"instance {info.tags.get('title')!r} is {info.state}; only a running instance is handed off live"
        )
    if info.tags.get("handoff_url"):
        if _mark_is_live(ctx, info.uuid, info.tags):
            title, url = info.tags.get("title"), info.tags["handoff_url"]
            raise Conflict(f"instance {title!r} is already being handed off to {url}")
        _clear_mark(ctx, info.uuid)  # left by a source process that was killed: nothing runs it
        info = instances.select(ctx, info.uuid)
    disk = dx.disk_path(info.xml)
    if not disk:
        raise InvalidInput(f"instance {info.tags.get('title')!r} has no disk")
    image = images.resolve(ctx.store, info.tags.get("image", ""))
    tags = {k: v for k, v in info.tags.items() if k not in MARK_TAGS}
    return {
        "uuid": info.uuid,
        "name": info.name,
        "title": info.tags.get("title", info.name),
        "image": image.content_id,
        "disk": disk,
        "disk_format": _disk_format(info.xml),
        "disk_size": migrate.disk_virtual_size(disk),
        "disk_allocated": migrate.allocated_bytes(disk),
        "memory_bytes": info.memory_kib * 1024,
        "platform": migrate.platform_of(info.xml),
        "boot_files": migrate.boot_files(info.xml),
        "ports": [str(p) for p in dx.ports_from_text(info.tags.get("ports"))],
        "tags": tags,
    }


MARK_TAGS = ("handoff_url", "handoff_pid")


def _mark_is_live(ctx: NodeContext, uuid: str, tags: dict[str, str]) -> bool:
    """Whether the "being handed off" mark belongs to a handoff that still runs: the source process that
    set it is alive (a mark without a pid: libvirt still has a job on the domain)."""
    pid = tags.get("handoff_pid", "")
    if pid.isdigit():
        return pid_alive(int(pid))
    return migrate.has_job(ctx.hv, uuid)


def _clear_mark(ctx: NodeContext, uuid: str) -> None:
    with contextlib.suppress(NepheleError):
        d = ctx.hv.lookup(uuid)
        if d is not None:
            tags = dict(ctx.hv.info(d).tags)
            if any(k in tags for k in MARK_TAGS):
                for k in MARK_TAGS:
                    tags.pop(k, None)
                ctx.hv.set_tags(d, tags)


def abort(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """``handoff.abort``: after a failed handoff whose source process could not clean up (it was killed):
    resume the instance if libvirt left it paused without a job and drop a mark nothing holds."""
    uuid = str(args.get("uuid") or "")
    if not uuid:
        raise InvalidInput("handoff.abort: no uuid")
    ctx.store.instance_dir(uuid)  # refuses anything but a canonical UUID before libvirt sees it
    dom = ctx.hv.lookup(uuid)
    if dom is None:
        return {"uuid": uuid, "state": None}
    tags = ctx.hv.info(dom).tags
    live = any(k in tags for k in MARK_TAGS) and _mark_is_live(ctx, uuid, tags)
    if not live:
        _clear_mark(ctx, uuid)
        migrate.resume_if_paused(ctx.hv, uuid)
    return {"uuid": uuid, "state": migrate.domain_state(ctx.hv, uuid), "busy": live}


def release(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """``handoff.release``: remove the source's copy of an instance whose destination confirmed that it
    runs there (verified stream, libvirt's Finish done) while libvirt here lost that answer and resumed
    this copy (its p2p migration cannot tell a lost Finish reply from a failed Finish). The controller
    calls it only with the destination's confirmation in hand; refused while a handoff holds the mark."""
    uuid = str(args.get("uuid") or "")
    if not uuid:
        raise InvalidInput("handoff.release: no uuid")
    ctx.store.instance_dir(uuid)  # refuses anything but a canonical UUID before libvirt sees it
    dom = ctx.hv.lookup(uuid)
    removed = False
    if dom is not None:
        tags = ctx.hv.info(dom).tags
        if any(k in tags for k in MARK_TAGS) and _mark_is_live(ctx, uuid, tags):
            raise Conflict(f"instance {tags.get('title')!r} is being handed off: not released")
        if migrate.has_job(ctx.hv, uuid):
            raise Conflict(f"instance {tags.get('title')!r} has a libvirt job running: not released")
        ctx.hv.destroy(dom)
        ctx.hv.undefine(dom)
        removed = True
    ctx.store.remove_instance_dir(uuid)
    return {"uuid": uuid, "removed": removed}


def _disk_format(xml: str) -> str:
    import xml.etree.ElementTree as ET

    for disk in ET.fromstring(xml).findall("devices/disk"):
        target, driver = disk.find("target"), disk.find("driver")
        if target is not None and target.get("dev") == "vda" and driver is not None:
            return str(driver.get("type") or "raw")
    return "raw"


class _Proxies:
    """Loopback listeners on the source node, each connection forwarded to one channel."""

    def __init__(self, dest: tuple[str, int], hid: bytes, token: bytes, refs: dict[str, Path]) -> None:
        self.dest = dest
        self.hid = hid
        self.token = token
        self.refs = refs
        self.memory: MemorySource | None = None
        self.memory_stats: MemoryStats | None = None
        self.forwards: list[tuple[str, ForwardStats]] = []
        self.disk_tap = NbdTap()
        self.errors: list[str] = []
        self.listeners: list[socket.socket] = []
        self.dump_path: Path | None = None
        self.guest_ram: Callable[[], GuestRam | None] | None = None  # the switchover check's RAM
        self.closed = threading.Event()
        self.bucket: TokenBucket | None = None  # the handoff's bandwidth cap (all channels)

    def listen(self, port: int, serve: Callable[[socket.socket], None]) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # QEMU's backpressure stays honest
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            s.close()
            raise HandoffError(
                f"cannot listen on 127.0.0.1:{port} on the source node: {exc.strerror}"
            ) from None
        s.listen(8)
        self.listeners.append(s)

        def loop() -> None:
            while not self.closed.is_set():
                try:
                    c, _ = s.accept()
                except OSError:
                    return
                threading.Thread(target=self._guard, args=(serve, c), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        port_: int = s.getsockname()[1]
        return port_

    def _guard(self, serve: Callable[[socket.socket], None], c: socket.socket) -> None:
        try:
            serve(c)
        except (NepheleError, OSError) as exc:
            self.errors.append(str(exc))
            with contextlib.suppress(OSError):
                c.close()

    def _connect(self, channel: int) -> socket.socket:
        sock = ch.connect_channel(self.dest[0], self.dest[1], self.hid, self.token, channel)
        if self.bucket is None:
            return sock
        if hasattr(sock, "pace"):  # an encrypted channel paces its records itself (never re-wrap it)
            setattr(sock, "pace", self.bucket.take)  # noqa: B010
            return sock
        return ThrottledSocket.wrap(sock, self.bucket)

    def serve_memory(self, c: socket.socket) -> None:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.memory is not None:
            raise HandoffError("a second memory connection from QEMU (multifd?) was refused")
        wan = self._connect(ch.MEMORY)
        wan.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        dump = None
        if self.dump_path is not None and self.dump_path.with_suffix(".on").exists():
            dump = open(self.dump_path, "wb")  # noqa: SIM115
        self.memory = MemorySource(c, wan, self.refs, dump=dump, guest_ram=self.guest_ram)
        self.memory_stats = self.memory.run()

    def serve_disk(self, c: socket.socket) -> None:
        st = ForwardStats()
        self.forwards.append(("disk", st))
        forward(c, self._connect(ch.DISK), tap=self.disk_tap, stats=st)
        if st.error:
            self.errors.append(f"disk channel: {st.error}")

    def serve_control(self, c: socket.socket) -> None:
        st = ForwardStats()
        self.forwards.append(("control", st))
        forward(c, self._connect(ch.CONTROL), stats=st)

    def send_abort(self, reason: str) -> None:
        """Tell a destination that never got its memory channel that this handoff is over (ABORT on a
        channel of its own), so it cleans up now instead of at its connect timeout. Best effort, retried
        for a while: the link may be back soon after a cut."""
        deadline = time.monotonic() + ABORT_RETRY_SECONDS
        while True:
            try:
                sock = ch.connect_channel(
                    self.dest[0], self.dest[1], self.hid, self.token, ch.MEMORY, timeout=3
                )
                break
            except (HandoffError, OSError) as exc:
                if "refused" in str(exc) or time.monotonic() > deadline:
                    return  # nobody listens there any more (or the hello was refused): it is over there
                time.sleep(2)
        with contextlib.suppress(OSError, HandoffError):
            ch.MsgSender(sock).send(ABORT, reason.encode()[:4096])
        with contextlib.suppress(OSError):
            sock.close()

    def wire_out(self) -> int:
        n = self.memory.tx.bytes if self.memory is not None else 0
        return n + sum(st.wan_out for _, st in self.forwards)

    def close(self) -> None:
        self.closed.set()
        for s in self.listeners:
            with contextlib.suppress(OSError):
                s.close()


FIRST_PASS_DOWNTIME_MS = 20
# Of the downtime budget, the share kept for what follows the last pages: the device state, the switchover
# check, libvirt's finish round trips and the resume (0.3-0.5 s measured with 20 ms each way).
RESERVE = 0.3


class _DowntimeLimiter(threading.Thread):
    """Keep QEMU's downtime limit honest about the link.

    QEMU stops the VM when its remaining dirty pages fit in downtime-limit x the bandwidth it measured over
    the last 100 ms, in *stream* bytes. Through the delta engine, zero, unchanged and deduplicated pages
    cost almost nothing on the wire, so that bandwidth can be many times the link's: with the plain budget
    QEMU stopped the VM in the middle of its first pass and sent the rest, fresh data included, during the
    "downtime" (13.8 s measured for a 2 s budget). So: a tiny limit until every page was sent once, then
    the budget scaled by the recent wire/stream ratio, so that QEMU stops only when what remains would fit
    in the budget even if none of it compressed. Less the time to drain what the pipeline already holds,
    at the link rate the destination's ACKs show: stream bytes QEMU counts as sent that still sit in its
    socket buffer (0.9 s of a 1.7 s downtime at 20 Mbit/s), and channel bytes sent but not yet read at the
    destination (socket buffers, proxies, router queues: 2 s of a 2.7 s downtime through a bloated path).
    Its own thread: libvirt calls may wait on the migration."""

    WINDOW = 2.0
    PERIOD = 0.5

    def __init__(self, mig: migrate.SourceMigration, budget_ms: int, proxies: _Proxies) -> None:
        super().__init__(name="handoff-downtime", daemon=True)
        self.mig = mig
        self.budget = budget_ms
        self.current = FIRST_PASS_DOWNTIME_MS
        self.proxies = proxies
        self.samples: list[tuple[float, int, int, int]] = []
        self.history: list[tuple[float, int]] = []

    def run(self) -> None:
        while not self.mig.done.wait(self.PERIOD):
            mem = self.proxies.memory
            if mem is not None and mem.first_pass_done:
                processed = int(self.mig.job().get("memory_processed") or 0)
                backlog = max(0, processed - mem.stats.stream_bytes)
                # no ACK yet (a destination that does not send them): assume nothing is in flight
                self.update(mem.stats.stream_bytes, mem.tx.bytes, backlog, mem.acked or None)

    def update(self, stream: int, wire: int, backlog: int = 0, acked: int | None = None) -> None:
        """stream: QEMU stream bytes the proxy read; wire: channel bytes it sent; backlog: stream bytes QEMU
        has written that the proxy has not read yet; acked: channel bytes the destination has read."""
        now = time.monotonic()
        self.samples.append((now, stream, wire, wire if acked is None else acked))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
            self.samples.pop(0)
        t0, s0, w0, a0 = self.samples[0]
        ds, dw = stream - s0, wire - w0
        if ds < (256 << 10):
            return  # too little data to judge
        rate = (self.samples[-1][3] - a0) / (now - t0) if now > t0 else 0.0  # what crossed the link, B/s
        if rate <= 0:
            rate = dw / (now - t0) if now > t0 and dw > 0 else 0.0
        inflight = max(0, wire - self.samples[-1][3])
        drain_ms = 1000 * (backlog * dw / ds + inflight) / rate if rate > 0 else 0.0
        data_ms = max(0.0, self.budget * (1 - RESERVE) - drain_ms)
        limit = int(min(self.budget, max(FIRST_PASS_DOWNTIME_MS, data_ms * min(1.0, dw / ds))))
        if abs(limit - self.current) > 0.1 * self.current:
            self.current = limit
            self.history.append((round(now, 2), limit))
            self.mig.set_downtime(limit)


def _non_negative(args: dict[str, Any], key: str) -> float:
    try:
        value = float(args.get(key) or 0)
    except (ValueError, TypeError):
        raise InvalidInput(f"handoff.send: bad {key} {args.get(key)!r}") from None
    if value < 0:
        raise InvalidInput(f"handoff.send: {key} {value:g} is negative")
    return value


def _not_converged(timeout_s: float, js: dict[str, Any], wire_bps: float, throttle: int, ac: bool) -> str:
    """Why a handoff is given up at its deadline, with the figures that say what would help."""
    left = int(js.get("memory_remaining", 0) or 0) + int(js.get("disk_remaining", 0) or 0)
    dirty = float(js.get("memory_dirty_rate", 0) or 0) * int(js.get("memory_page_size", 4096) or 4096)
    slowed = f"the guest slowed by {throttle} %" if throttle else "the guest not slowed"
    if not ac:
        slowed += " (auto-converge off)"
    return (
        f"not converged within the handoff timeout of {timeout_s:g} s: {left / 2**20:.1f} MiB still to send, "
        f"the guest dirties {dirty / 2**20:.1f} MiB/s, the link carries {wire_bps / 2**20:.2f} MiB/s, "
        f"{slowed}; raise the timeout or the bandwidth, or lower the guest's write rate"
    )


def _settle_block_layer(ctx: NodeContext, uuid: str, title: str) -> None:
    """Wait until QEMU holds no block job of an earlier handoff. A failed disk mirror winds down after
    libvirt reported the failure (its NBD connection closes later); until it has, its filter node
    still sits above the disk and libvirt's next mirror fails ("Need a root block node"). A job that
    ended but was never dismissed is dismissed here (libvirt no longer tracks it)."""
    deadline = time.monotonic() + BLOCK_SETTLE_SECONDS
    said = False
    while True:
        left = migrate.block_state(ctx.hv, uuid)
        dismissed = migrate.dismiss_concluded(ctx.hv, uuid, left)
        if dismissed:
            ctx.log.warning("handoff of %s: dismissed ended block job(s) %s", uuid, dismissed)
            ctx.progress(f"Dismissed block job(s) an earlier handoff left behind: {', '.join(dismissed)}")
            continue
        if not left["jobs"] and not left["filters"]:
            return
        if time.monotonic() > deadline:
            raise Conflict(
                f"instance {title!r}: QEMU still holds block job(s) {left['jobs']} (filters "
                f"{left['filters']}) from an earlier handoff after {BLOCK_SETTLE_SECONDS:g} s; "
                "try again later"
            )
        if not said:
            ctx.progress(f"Waiting for an earlier disk mirror to wind down: {left['jobs']}")
            ctx.log.warning("handoff of %s: waiting for QEMU block state %s", uuid, left)
            said = True
        time.sleep(0.5)


def send(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    try:
        uuid = str(args["uuid"])
        dest = (str(args["dest_address"]), int(args["dest_port"]))
        hid = bytes.fromhex(str(args["handoff_id"]))
        token = bytes.fromhex(str(args["token"]))
        mem_port, disk_port = int(args["memory_port"]), int(args["disk_port"])
        ref_ids = set(args.get("refs") or [])
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidInput(f"handoff.send: bad request ({exc})") from None
    downtime_ms = int(args.get("downtime_ms") or DEFAULT_DOWNTIME_MS)
    cap = _non_negative(args, "bandwidth_mbit")  # 0: no cap
    timeout_s = _non_negative(args, "timeout_s")  # 0: no limit
    auto_converge = args.get("auto_converge", True) is not False
    url = str(args.get("url") or f"tcp://{dest[0]}:{dest[1]}")
    hv = ctx.hv
    info = instances.select(ctx, uuid)
    if info.state != "running":
        raise Conflict(f"instance {info.tags.get('title')!r} is {info.state}, not running")
    image = images.resolve(ctx.store, info.tags.get("image", ""))
    ctx.progress("Preparing reference images (base disk and memory)...")
    refs = {k: v for k, v in refsmod.prepare(ctx.store, image).items() if k in ref_ids}
    proxies = _Proxies(dest, hid, token, refs)
    proxies.bucket = TokenBucket(cap * 1e6 / 8) if cap else None
    proxies.dump_path = ctx.store.root / "debug" / "memory-stream.bin"  # written if memory-stream.on exists
    proxies.guest_ram = lambda: guestram.open_main_ram(uuid)
    mark = migrate.LifecycleMark()
    unwatch = None
    dom = hv.lookup(uuid)
    tagged = False
    mig: migrate.SourceMigration | None = None
    t0 = time.time()
    try:
        proxies.listen(mem_port, proxies.serve_memory)
        proxies.listen(disk_port, proxies.serve_disk)
        ctl_port = proxies.listen(0, proxies.serve_control)
        hv.set_tags(dom, {**info.tags, "handoff_url": url, "handoff_pid": str(os.getpid())})
        tagged = True

        def on_stop(when: float) -> None:
            if proxies.memory is not None:  # the destination needs it for the downtime figure
                proxies.memory.send_stopped(when)

        unwatch = migrate.watch_lifecycle(hv, uuid, mark, on_stop)
        _settle_block_layer(ctx, uuid, info.tags.get("title", uuid))
        mig = migrate.SourceMigration(
            hv,
            uuid,
            control_port=ctl_port,
            memory_port=mem_port,
            disk_port=disk_port,
            downtime_ms=FIRST_PASS_DOWNTIME_MS,  # raised by the limiter once every page went once
            auto_converge=auto_converge,
        )
        mig.start()
        emit(ctx, "started", url=url, title=info.tags.get("title"), uuid=uuid, pid=os.getpid())
        last_bytes, last_move, abort_reason = -1, time.monotonic(), None
        started, throttle_max = time.monotonic(), 0
        recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=RATE_WINDOW)
        limiter = _DowntimeLimiter(mig, downtime_ms, proxies)
        limiter.start()
        while not mig.done.wait(1.0):
            js = mig.job()
            wire = proxies.wire_out()
            now = time.monotonic()
            prev_t, prev_wire = recent[-1] if recent else (started, 0)
            rate = (wire - prev_wire) / max(1e-3, now - prev_t)
            recent.append((now, wire))
            mem = proxies.memory
            if mem is not None:
                mem.send_iteration(int(js.get("memory_iteration", 0) or 0))
            remaining = int(js.get("memory_remaining", 0) or 0) + int(js.get("disk_remaining", 0) or 0)
            stream_rate = float(js.get("memory_bps", 0) or 0)
            throttle = mig.throttle_pct(js)
            throttle_max = max(throttle_max, throttle)
            emit(
                ctx,
                "progress",
                elapsed=round(time.time() - t0, 1),
                iteration=(mem.stats.iteration if mem is not None else 0),
                stream_bytes=(mem.stats.stream_bytes if mem is not None else 0),
                wire_bytes=wire,
                rate_bps=round(rate),
                memory_total=int(js.get("memory_total", 0) or 0),
                memory_remaining=int(js.get("memory_remaining", 0) or 0),
                disk_total=int(js.get("disk_total", 0) or 0),
                disk_remaining=int(js.get("disk_remaining", 0) or 0),
                eta_s=(round(remaining / stream_rate, 1) if stream_rate > 0 else None),
                paused=mark.stopped is not None,
                throttle_pct=throttle,
            )
            moved = mem.stats.stream_bytes if mem is not None else 0
            if moved != last_bytes:
                last_bytes, last_move = moved, now
            if mem is not None and mem.stats.error and abort_reason is None:
                err = mem.stats.error
                abort_reason = err if err.startswith("memory channel:") else f"memory channel: {err}"
                mig.abort()
            elif proxies.errors and abort_reason is None:
                abort_reason = proxies.errors[0]
                mig.abort()
            elif mem is not None and now - last_move > STALL_SECONDS and abort_reason is None:
                abort_reason = f"no progress on the memory channel for {STALL_SECONDS:g} s"
                mig.abort()
            elif timeout_s and now - started > timeout_s and abort_reason is None and mark.stopped is None:
                (t1, w1), (t2, w2) = recent[0], recent[-1]
                link_bps = (w2 - w1) / (t2 - t1) if t2 > t1 else rate
                abort_reason = _not_converged(timeout_s, js, link_bps, throttle, auto_converge)
                mig.abort()
        if mem_ := proxies.memory:
            mem_.done.wait(30)
        if mig.error is not None or migrate.domain_state(hv, uuid) == "running":
            why = abort_reason or (proxies.memory_stats.error if proxies.memory_stats else None)
            why = why or (proxies.errors[0] if proxies.errors else None)
            raise HandoffError(
                f"handoff of {info.tags.get('title')!r} failed: "
                f"{mig.error or 'the migration did not complete'}" + (f" ({why})" if why else "")
            )
        # libvirt undefined the source after the destination's Finish: release what is ours here.
        ctx.store.remove_instance_dir(uuid)
        ms = proxies.memory_stats
        result = {
            "uuid": uuid,
            "title": info.tags.get("title"),
            "url": url,
            "elapsed_s": round(time.time() - t0, 3),
            "stopped_at": mark.stopped,
            "wire_bytes": proxies.wire_out(),
            "channels": {n: st.wan_out for n, st in proxies.forwards},
            "memory": {k: v for k, v in vars(ms).items() if k != "delta"} if ms else None,
            "memory_table": ms.table_stats().to_dict() if ms else None,
            "disk_writes": {"bytes": proxies.disk_tap.write_bytes, "zero_bytes": proxies.disk_tap.zero_bytes},
            "downtime_limits_ms": limiter.history,
            "throttle_max_pct": throttle_max,
        }
        emit(ctx, "done", **{k: result[k] for k in ("elapsed_s", "wire_bytes")})
        return result
    except BaseException as exc:
        if mig is not None and not mig.done.is_set():
            mig.abort()
            mig.done.wait(120)
        state = migrate.resume_if_paused(hv, uuid)
        completed = state is None and mig is not None and mig.done.is_set() and mig.error is None
        if completed:
            # Interrupted too late: the migration completed (libvirt undefined the domain here after the
            # destination's Finish). Release what is ours here, as a completed handoff does.
            with contextlib.suppress(OSError):
                ctx.store.remove_instance_dir(uuid)
            ctx.log.warning("handoff of %s: interrupted (%s) after the migration completed", uuid, exc)
        with contextlib.suppress(NepheleError):
            left = migrate.block_state(hv, uuid)
            if left["jobs"] or left["filters"]:
                ctx.log.warning("handoff of %s failed; QEMU's block layer still holds %s", uuid, left)
        if tagged and state is not None:
            _clear_mark(ctx, uuid)
        emit(ctx, "failed", source_state=state, error=str(exc))
        if proxies.memory is None:  # the destination still waits for its memory channel: tell it why not
            proxies.send_abort(str(exc) or type(exc).__name__)
        if isinstance(exc, KeyboardInterrupt):
            if completed:
                raise HandoffError(
                    "the source was interrupted after the migration completed: the instance runs on the "
                    "destination"
                ) from None
            raise HandoffError(f"the source was interrupted; the instance is {state} here") from None
        if isinstance(exc, HandoffError):
            raise HandoffError(f"{exc}; the instance is {state or 'gone'} on the source") from None
        raise
    finally:
        proxies.close()
        if unwatch is not None:
            unwatch()
