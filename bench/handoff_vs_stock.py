#!/usr/bin/env python3
"""nephele live handoff vs stock libvirt live migration vs QEMU multifd+zstd, on one local cloudlet.

Setup (issue 5): two cloudlet nodes, link RATE Mbit/s (tbf) with 20 ms each way (a delay proxy on the
source node carries each method's WAN traffic; stock NBD and libvirt control go direct, which only helps
the stock methods); the test guest (256 MiB RAM, 1 MiB/s dirtier, 64 KiB/s disk writes) runs from an image
both nodes hold; after it starts it writes 32 MiB of fresh data (16 MiB random + 16 MiB text-like).
Each method moves a fresh instance from node A to node B with the same downtime limit, and reports total
time, bytes on the link (tbf counters of both nodes' egress), downtime (libvirt lifecycle events: source
stop -> destination resume) and whether the guest's state survived (md5 of its data, counter advancing).

The floor: everything the destination did not already hold, i.e. the final guest RAM and disk overlay as a
nephele delta against the base image (zstd -19, references to the base), and that size's time on the link.

    python bench/handoff_vs_stock.py [--rates 20,100] [--methods nephele,libvirt,multifd] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import libvirt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nephele.agent.client import Agent
from nephele.agent.ssh import SSHTransport
from nephele.cloudlet import Cloudlet
from nephele.cloudlet.core import CloudletNode
from nephele.cloudlet.guest import cmdline, ensure_guest
from nephele.delta import encode_files
from nephele.delta.encoder import Target
from nephele.handoff import perform
from nephele.model import NodeSpec
from nephele.vmstate import extract_ram

MiB = 1 << 20
PORT = 18080
DOWNTIME_MS = 2000
LIMIT_S = 300.0
FILL_CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
dd if=/dev/urandom of=/t/fresh_r bs=1M count=16 2>/dev/null
od -An -tx1 -v /dev/urandom 2>/dev/null | head -c 16777216 > /t/fresh_t
echo "fresh_md5=$(cat /t/fresh_r /t/fresh_t | md5sum | cut -d' ' -f1)"
"""
FRESH_CGI = """#!/bin/sh
echo "Content-Type: text/plain"
echo
F=$(cat /t/fresh_r /t/fresh_t 2>/dev/null | md5sum | cut -d' ' -f1)
echo "fresh_md5=$F fill_md5=$(md5sum /t/fill | cut -d' ' -f1) counter=$(cat /t/counter)"
"""


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def agent(n: CloudletNode) -> Agent:
    return Agent(SSHTransport(n.address, node=n.name, key=n.ssh_key, known_hosts=n.known_hosts))


def http(n: CloudletNode, path: str, timeout: float = 60) -> dict[str, str]:
    with urllib.request.urlopen(f"http://{n.address}:{PORT}{path}", timeout=timeout) as r:
        return dict(kv.split("=", 1) for kv in r.read().decode().split())


def wait_http(n: CloudletNode, path: str = "/cgi-bin/fresh", timeout: float = 90) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http(n, path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def link_bytes(c: Cloudlet) -> int:
    """Bytes sent by both nodes on their links (tbf counters of eth0 inside each node)."""
    total = 0
    for n in c.nodes[:2]:
        out = subprocess.run(
            ["tc", "-n", n.netns, "-s", "qdisc", "show", "dev", "eth0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        m = re.search(r"Sent (\d+) bytes", out)
        total += int(m.group(1)) if m else 0
    return total


# ------------------------------------------------------------------------------------------------ setup


def bench_initrd(work: Path, initrd: Path) -> Path:
    """The test guest's initrd plus two CGIs (appended as a second cpio archive): /cgi-bin/fill writes
    the fresh data, /cgi-bin/fresh reports its md5."""
    x = work / "extra"
    (x / "www" / "cgi-bin").mkdir(parents=True, exist_ok=True)
    for name, text in (("fill", FILL_CGI), ("fresh", FRESH_CGI)):
        p = x / "www" / "cgi-bin" / name
        p.write_text(text)
        p.chmod(0o755)
    files = subprocess.run(["find", "."], cwd=x, capture_output=True, text=True, check=True).stdout
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "-R", "0:0"],
        cwd=x,
        input="\n".join(sorted(files.split())).encode(),
        capture_output=True,
        check=True,
    ).stdout
    out = work / "initrd.img"
    out.write_bytes(initrd.read_bytes() + cpio)
    return out


def build_image(c: Cloudlet, work: Path) -> str:
    g = ensure_guest()
    desc = work / "guest.json"
    desc.write_text(
        json.dumps(
            {
                "name": "bench-guest",
                "disk": str(g.disk),
                "kernel": str(g.kernel),
                "initrd": str(bench_initrd(work, g.initrd)),
                "cmdline": cmdline(fill_mib=32, dirty_mib=1, disk_kib=64),
                "memory_kib": 256 * 1024,
            }
        )
    )
    a = c.nodes[0]
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
    paused = False
    while not paused and t.is_alive():
        for serial in (a.host_root / "tmp").glob("build-*/serial.log"):
            if b"NEPHELE-READY" in serial.read_bytes():
                time.sleep(2)
                for d in conn.listAllDomains():
                    if d.name().startswith("nephele-build-") and d.isActive():
                        d.suspend()
                        paused = True
        time.sleep(0.5)
    t.join(300)
    conn.close()
    if "e" in out:
        raise out["e"]
    cid = str(out["r"]["content_id"])
    for n in c.nodes[1:]:
        dst = n.host_root / "images" / cid
        if not dst.exists():
            shutil.copytree(a.host_root / "images" / cid, dst)
    return cid


def start_instance(c: Cloudlet, cid: str) -> tuple[dict[str, Any], dict[str, str]]:
    a = c.nodes[0]
    r = agent(a).call("instance.run", {"snapshot": cid, "title": "bench", "ports": f"{PORT}:80"})
    wait_http(a)
    t0 = time.monotonic()
    http(a, "/cgi-bin/fill", timeout=180)  # 32 MiB of fresh data
    log(f"  fresh data written in {time.monotonic() - t0:.1f} s")
    time.sleep(2)
    return r, http(a, "/cgi-bin/fresh")


def remove_instance(c: Cloudlet, uuid: str) -> None:
    for n in c.nodes[:2]:
        with contextlib.suppress(Exception):
            for i in agent(n).call("instance.ls"):
                if i["uuid"] == uuid:
                    agent(n).call("instance.rm", {"instance": uuid})
        shutil.rmtree(n.host_root / "instances" / uuid, ignore_errors=True)


def survived(c: Cloudlet, before: dict[str, str]) -> bool:
    b = c.nodes[1]
    try:
        after = wait_http(b, timeout=60)
    except OSError:
        return False
    return (
        after.get("fresh_md5") == before["fresh_md5"]
        and after.get("fill_md5") == before["fill_md5"]
        and int(after.get("counter", 0)) > int(before["counter"])
    )


# ----------------------------------------------------------------------------------------------- methods


class Events:
    """Lifecycle events of one domain on both nodes (host clock): source stop, destination resume."""

    def __init__(self, c: Cloudlet, uuid: str) -> None:
        self.stop: float | None = None
        self.resume: float | None = None
        self.conns = [libvirt.open(n.libvirt_uri) for n in c.nodes[:2]]
        self.cbs = []
        for i, conn in enumerate(self.conns):
            self.cbs.append(
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._cb, i)
            )
        self.uuid = uuid

    def _cb(self, _conn: Any, dom: Any, event: int, detail: int, side: int) -> None:
        if dom.UUIDString() != self.uuid:
            return
        now = time.time()
        if side == 0 and event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED and self.stop is None:
            self.stop = now
        if side == 1 and event == libvirt.VIR_DOMAIN_EVENT_RESUMED and self.resume is None:
            self.resume = now

    def downtime(self) -> float | None:
        if self.stop is None or self.resume is None:
            return None
        return self.resume - self.stop

    def close(self) -> None:
        for conn, cb in zip(self.conns, self.cbs, strict=True):
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cb)
            conn.close()


def _progress(ev: dict[str, Any]) -> None:
    if ev.get("event") == "progress" and ev.get("side") == "source":
        log(
            f"    {ev['elapsed']:6.1f} s it {ev['iteration']} stream {ev['stream_bytes'] / MiB:7.1f} MiB "
            f"wire {ev['wire_bytes'] / MiB:6.1f} MiB paused={ev['paused']}"
        )
    elif ev.get("event") in ("ready", "started", "initiated", "done", "failed", "completed"):
        log(f"    [{time.strftime('%H:%M:%S')}] {ev.get('side', '')} {ev.get('event')}")


def run_nephele(c: Cloudlet, inst: dict[str, Any], rate: float) -> dict[str, Any]:
    a, b = c.nodes[:2]
    proxy = c.start_delay_proxy(a, 8022, (b.address, 8022), max_buffer=256 << 10)
    try:
        res = perform(
            agent(a),
            agent(b),
            inst["uuid"],
            NodeSpec(name=b.name, address=b.address),
            _progress,
            downtime_ms=DOWNTIME_MS,
            source_address=a.address,
            via=(a.address, 8022),
        )
        d = res.destination
        detail = {
            k: d.get(k) for k in ("iterations", "wire_bytes", "table_blocks", "downtime_s", "elapsed_s")
        }
        detail["source_elapsed_s"] = res.elapsed_s
        mem = res.source.get("memory") or {}
        detail["ram_check"] = {"checked": mem.get("checked"), "stale_pages_corrected": mem.get("corrected")}
        return {"ok": True, "detail": detail}
    finally:
        proxy.stop()


def run_libvirt(c: Cloudlet, inst: dict[str, Any], rate: float, multifd: bool) -> dict[str, Any]:
    a, b = c.nodes[:2]
    port = 49160 if multifd else 49152
    proxy = c.start_delay_proxy(a, port, (b.address, port), max_buffer=256 << 10)
    uuid = inst["uuid"]
    # the destination disk: an empty overlay on the base at the same in-node path (as nephele does)
    info = agent(a).call("handoff.prepare", {"instance": uuid})
    disk = Path(info["disk"])
    host_disk = b.host_root / disk.relative_to(b.root)
    host_disk.parent.mkdir(parents=True, exist_ok=True)
    base = f"{b.root}/images/{info['image']}/disk.raw"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", base, "-F", "raw", str(host_disk),
         str(info["disk_size"])],
        check=True,
    )  # fmt: skip
    conn = libvirt.open(a.libvirt_uri)
    try:
        dom = conn.lookupByUUIDString(uuid)
        dom.migrateSetMaxDowntime(DOWNTIME_MS, 0)
        flags = (
            libvirt.VIR_MIGRATE_LIVE
            | libvirt.VIR_MIGRATE_PEER2PEER
            | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            | libvirt.VIR_MIGRATE_NON_SHARED_INC
        )
        params: dict[str, Any] = {
            libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{a.address}:{port}",  # through the delay proxy
            libvirt.VIR_MIGRATE_PARAM_LISTEN_ADDRESS: b.address,
            libvirt.VIR_MIGRATE_PARAM_DISKS_URI: f"tcp://{b.address}:{port + 1}",
        }
        if multifd:
            flags |= libvirt.VIR_MIGRATE_PARALLEL | libvirt.VIR_MIGRATE_COMPRESSED
            params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = 2
            params[libvirt.VIR_MIGRATE_PARAM_COMPRESSION] = "zstd"
        done = threading.Event()
        timer = threading.Timer(LIMIT_S, lambda: done.is_set() or dom.abortJob())
        timer.start()
        try:
            dom.migrateToURI3(f"qemu+tcp://{b.address}/system", params, flags)
            ok, err = True, None
        except libvirt.libvirtError as e:
            ok, err = False, e.get_error_message()
        finally:
            done.set()
            timer.cancel()
        return {"ok": ok, "error": err}
    finally:
        conn.close()
        proxy.stop()


class Qmp:
    """A minimal QMP client that keeps the events it reads (with QEMU's timestamps)."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.f = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict[str, Any]] = []
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args} if args else {"execute": name}).encode())
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f"QMP {name}: connection closed")
            msg = json.loads(line)
            if "event" in msg:
                self.events.append(msg)
            elif "error" in msg:
                raise RuntimeError(f"QMP {name}: {msg['error']}")
            else:
                return msg.get("return")

    def event_time(self, name: str) -> float | None:
        for e in self.events:
            if e["event"] == name:
                return float(e["timestamp"]["seconds"]) + e["timestamp"]["microseconds"] / 1e6
        return None


def run_multifd_qemu(c: Cloudlet, work: Path, initrd: Path, rate: float) -> dict[str, Any]:
    """QEMU's own live migration with multifd (2 channels) + zstd, between raw QEMUs in the two nodes
    (libvirt 9.0 cannot ask for zstd). The disk is one overlay on a shared path (not copied: this only
    helps multifd); the guest cold-boots with the same workload, then writes the same fresh data."""
    a, b = c.nodes[:2]
    g = ensure_guest()
    overlay = work / "multifd.qcow2"
    overlay.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(g.disk), "-F", "raw", str(overlay)],
                   check=True)  # fmt: skip
    port = 49170
    procs = []

    def qemu(node: CloudletNode, name: str, incoming: bool) -> Qmp:
        sock = work / f"{name}.qmp"
        sock.unlink(missing_ok=True)
        args = ["qemu-system-x86_64", "-machine", "pc-i440fx-7.2,accel=tcg", "-m", "256", "-nodefaults",
                "-display", "none", "-kernel", str(g.kernel), "-initrd", str(initrd),
                "-append", cmdline(fill_mib=32, dirty_mib=1, disk_kib=64),
                "-drive", f"file={overlay},if=virtio,format=qcow2,cache=none,file.locking=off",
                "-netdev", f"user,id=n0,hostfwd=tcp:{node.address}:{PORT}-:80",
                "-device", "virtio-net-pci,netdev=n0", "-serial", f"file:{work / name}.serial",
                "-qmp", f"unix:{sock},server=on,wait=off"]  # fmt: skip
        if incoming:
            args += ["-incoming", "defer"]
        procs.append(node.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return Qmp(sock)

    try:
        qa = qemu(a, "mf-src", False)
        before = _boot_and_fill(a)
        qb = qemu(b, "mf-dst", True)
        caps = [{"capability": "multifd", "state": True}, {"capability": "events", "state": True}]
        for q in (qa, qb):
            q.cmd("migrate-set-capabilities", capabilities=caps)
            q.cmd("migrate-set-parameters", **{"multifd-channels": 2, "multifd-compression": "zstd"})
        qa.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": 1 << 40})
        qb.cmd("migrate-incoming", uri=f"tcp:{b.address}:{port}")
        proxy = c.start_delay_proxy(a, port, (b.address, port), max_buffer=256 << 10)
        try:
            b0, t0 = link_bytes(c), time.monotonic()
            qa.cmd("migrate", uri=f"tcp:{a.address}:{port}")
            status = ""
            while status not in ("completed", "failed", "cancelled"):
                if time.monotonic() - t0 > LIMIT_S:
                    qa.cmd("migrate_cancel")
                time.sleep(0.2)
                status = qa.cmd("query-migrate").get("status", "")
            deadline = time.monotonic() + 30
            while qb.event_time("RESUME") is None and time.monotonic() < deadline:
                qb.cmd("query-status")
                time.sleep(0.1)
            total = time.monotonic() - t0
            nbytes = link_bytes(c) - b0
        finally:
            proxy.stop()
        stop, resume = qa.event_time("STOP"), qb.event_time("RESUME")
        ok = status == "completed" and _same_state(b, before)
        return {"ok": ok, "total_s": total, "link_bytes": nbytes,
                "downtime_s": (resume - stop) if stop and resume else None,
                "error": None if status == "completed" else f"migration {status}"}  # fmt: skip
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _boot_and_fill(n: CloudletNode) -> dict[str, str]:
    wait_http(n, timeout=120)
    time.sleep(3)  # the boot-time fill is written before HTTP answers, but let the workload settle
    http(n, "/cgi-bin/fill", timeout=180)
    time.sleep(2)
    return http(n, "/cgi-bin/fresh")


def _same_state(n: CloudletNode, before: dict[str, str]) -> bool:
    try:
        after = wait_http(n, timeout=60)
    except OSError:
        return False
    return (
        after.get("fresh_md5") == before["fresh_md5"]
        and after.get("fill_md5") == before["fill_md5"]
        and int(after.get("counter", 0)) > int(before["counter"])
    )


# ------------------------------------------------------------------------------------------------- floor


def floor_bytes(c: Cloudlet, inst: dict[str, Any], cid: str, work: Path) -> int:
    """The final RAM and disk overlay of the instance (now on B) as a delta against the base image."""
    b = c.nodes[1]
    save = f"{b.root}/tmp/floor.save"
    conn = libvirt.open(b.libvirt_uri)
    try:
        conn.lookupByUUIDString(inst["uuid"]).save(save)
    finally:
        conn.close()
    host_save = b.host_root / "tmp" / "floor.save"
    ram = extract_ram(host_save, work / "floor-ram")
    img = b.host_root / "images" / cid
    base_ram = extract_ram(img / "memory.save", work / "base-ram")
    overlay = b.host_root / "instances" / inst["uuid"] / "disk.qcow2"
    flat = work / "floor-disk.raw"
    # the overlay alone (unallocated = zero), so the floor counts only what the base does not hold
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", "--image-opts",
                    f"driver=qcow2,file.filename={overlay},backing.driver=null-co,backing.size=0", str(flat)],
                   check=False, capture_output=True)  # fmt: skip
    if not flat.exists():  # the overlay names its backing by the in-node path: read it inside node B
        b.run(["qemu-img", "convert", "-U", "-O", "raw", f"{b.root}/instances/{inst['uuid']}/disk.qcow2",
               str(flat)], check=True)  # fmt: skip
    refs = {f"mem:{k}": v for k, v in base_ram.items()}
    refs["disk"] = img / "disk.raw"
    targets = [Target(f"ram{i}", "memory", p, f"mem:{k}" if f"mem:{k}" in refs else None)
               for i, (k, p) in enumerate(ram.items())]  # fmt: skip
    targets.append(Target("disk", "disk", flat, "disk"))
    sink = io.BytesIO()
    encode_files(refs, targets, sink, codec="zstd", level=19)
    host_save.unlink(missing_ok=True)
    return len(sink.getvalue())


# -------------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="20,100")
    ap.add_argument("--methods", default="nephele,libvirt,multifd")
    ap.add_argument("--keep", action="store_true", help="keep the cloudlet up afterwards")
    ap.add_argument("--dump", action="store_true", help="keep the raw memory stream on the source node")
    a = ap.parse_args()
    rates = [float(r) for r in a.rates.split(",")]
    methods = a.methods.split(",")
    libvirt.virEventRegisterDefaultImpl()
    threading.Thread(
        target=lambda: [libvirt.virEventRunDefaultImpl() for _ in iter(int, 1)], daemon=True
    ).start()
    work = Path(tempfile.mkdtemp(prefix="nephele-bench-"))
    c = Cloudlet.up("hbench", 2, rate_mbit=rates[0], delay_ms=20, workdir=Path("/tmp/nephele-bench-cloudlet"))
    rows: list[dict[str, Any]] = []
    try:
        log("building the image on edge-a ...")
        cid = build_image(c, work)
        if a.dump:  # debugging: the source node keeps the raw memory stream of each handoff
            (c.nodes[0].host_root / "debug").mkdir(exist_ok=True)
            (c.nodes[0].host_root / "debug" / "memory-stream.on").touch()
        for n in c.nodes[:2]:  # nodes index an image's references when it arrives, not during a handoff
            agent(n).call("handoff.warm", {"image": cid})
        for rate in rates:
            c.set_link(rate)
            floor = None
            for m in methods:
                log(f"{m} at {rate:g} Mbit/s ...")
                if m == "multifd":
                    try:
                        r = run_multifd_qemu(c, work, work / "initrd.img", rate)
                    except Exception as e:  # a method that fails is a result
                        r = {
                            "ok": False,
                            "total_s": 0.0,
                            "link_bytes": 0,
                            "downtime_s": None,
                            "error": str(e),
                        }
                    row = {"rate": rate, "method": m, "total_s": r["total_s"], "link_bytes": r["link_bytes"],
                           "downtime_s": r["downtime_s"], "survived": r["ok"], "error": r["error"],
                           "detail": None}  # fmt: skip
                    log("  ", json.dumps(row))
                    rows.append(row)
                    continue
                inst, before = start_instance(c, cid)
                ev = Events(c, inst["uuid"])
                b0, t0 = link_bytes(c), time.monotonic()
                try:
                    if m == "nephele":
                        r = run_nephele(c, inst, rate)
                    else:
                        r = run_libvirt(c, inst, rate, multifd=False)
                except Exception as e:  # a method that fails is a result, not the end of the benchmark
                    r = {"ok": False, "error": str(e)}
                total = time.monotonic() - t0
                nbytes = link_bytes(c) - b0
                dt = ev.downtime()
                ev.close()
                ok = bool(r.get("ok")) and survived(c, before)
                row = {"rate": rate, "method": m, "total_s": total, "link_bytes": nbytes, "downtime_s": dt,
                       "survived": ok, "error": r.get("error"), "detail": r.get("detail")}  # fmt: skip
                log("  ", json.dumps(row))
                rows.append(row)
                if m == "nephele" and ok and floor is None:
                    floor = floor_bytes(c, inst, cid, work)
                    t_floor = floor * 8 / (rate * 1e6) + 0.04  # + one round trip
                    rows.append({"rate": rate, "method": "floor", "total_s": t_floor, "link_bytes": floor,
                                 "downtime_s": None, "survived": None, "error": None})  # fmt: skip
                remove_instance(c, inst["uuid"])
    finally:
        if not a.keep:
            c.down()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'rate':>6} {'method':<9} {'total s':>8} {'link MiB':>9} {'downtime s':>11} {'state ok':>9}")
    for r in rows:
        dt = "-" if r["downtime_s"] is None else f"{r['downtime_s']:.2f}"
        ok = "-" if r["survived"] is None else ("yes" if r["survived"] else "NO")
        mib = r["link_bytes"] / MiB
        err = f"  ({r['error']})" if r["error"] else ""
        print(f"{r['rate']:>6g} {r['method']:<9} {r['total_s']:>8.1f} {mib:>9.1f} {dt:>11} {ok:>9}{err}")
    print()
    for rate in rates:
        by = {r["method"]: r for r in rows if r["rate"] == rate}
        n, fl, lv, mf = (by.get(k) for k in ("nephele", "floor", "libvirt", "multifd"))
        if not n:
            continue
        checks = []
        if fl:
            checks.append(("bytes <= 1.2 x floor", n["link_bytes"] <= 1.2 * fl["link_bytes"]))
        # issue 5 sets the time targets at 20 Mbit/s; at other rates they are shown for information
        timed = "" if rate == 20 else "(info) "
        if mf and mf["survived"]:
            checks.append(("bytes <= 0.5 x multifd+zstd", n["link_bytes"] <= 0.5 * mf["link_bytes"]))
            checks.append((f"{timed}time <= 0.6 x multifd+zstd", n["total_s"] <= 0.6 * mf["total_s"]))
        if lv and lv["survived"]:
            checks.append((f"{timed}time <= 0.3 x stock libvirt", n["total_s"] <= 0.3 * lv["total_s"]))
        if n["downtime_s"] is not None:
            checks.append(("downtime < 2 s", n["downtime_s"] < 2.0))
            others = [
                r["downtime_s"] for r in (lv, mf) if r and r["survived"] and r["downtime_s"] is not None
            ]
            if others:
                checks.append(("downtime <= stock tools'", n["downtime_s"] <= min(others)))
        for name, good in checks:
            print(f"{rate:>6g} Mbit/s  {name:<30} {'HOLDS' if good else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
