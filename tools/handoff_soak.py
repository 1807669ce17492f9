#!/usr/bin/env python3
"""Soak test for "the guest crashes right after a live move": moves one running test guest back and
forth between the two nodes of a private cloudlet, many times, and after each move checks the
destination's serial log for a kernel splat and the guest's HTTP state (counter continues, fill md5).

    tools/handoff_soak.py --mode stock|nephele --kind snapshot|image --runs N [--rate MBIT]

stock: libvirt's own p2p live migration straight between the nodes' libvirtds (no nephele proxies),
with the same flags nephele uses (LIVE|PEER2PEER|PERSIST_DEST|UNDEFINE_SOURCE|NON_SHARED_INC); the
destination gets an empty qcow2 overlay on its local base first, as nephele's destination does.
nephele: nephele.handoff.perform through the nodes' agents.
One line of JSON per move on stdout; the cloudlet is always taken down at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import libvirt  # noqa: E402

from nephele.cloudlet import Cloudlet  # noqa: E402
from nephele.cloudlet.core import CloudletNode  # noqa: E402
from nephele.cloudlet.guest import ensure_guest  # noqa: E402
from nephele.handoff import perform  # noqa: E402
from tests.handoff.cloudlet_setup import agent, build_image, spec  # noqa: E402

PORT = 18080
DOWNTIME_MS = 1000
SPLAT = ("BUG", "corruption", "Oops", "Call Trace", "general protection", "RIP:", "panic")
FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_INC
)


def state(node: CloudletNode, timeout: float = 30) -> dict[str, str] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{node.address}:{PORT}/cgi-bin/state", timeout=10) as r:
                return dict(kv.split("=", 1) for kv in r.read().decode().split() if "=" in kv)
        except OSError:
            time.sleep(0.5)
    return None


def snapshot(c: Cloudlet, image: str) -> str:
    """Capture snapshot `web` of the image (resume it, let it run 3 s, pause: the node captures)."""
    a = c.nodes[0]
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["r"] = agent(a).call(
                "snapshot.build", {"image": image, "dest": "web", "timeout": 300}, progress=lambda s: None
            )
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    conn = libvirt.open(a.libvirt_uri)
    try:
        deadline = time.monotonic() + 240
        while t.is_alive():
            doms = [d for d in conn.listAllDomains() if d.name().startswith("nephele-snap-") and d.isActive()]
            if doms:
                time.sleep(3)
                doms[0].suspend()
                break
            assert time.monotonic() < deadline
            time.sleep(0.3)
        t.join(300)
    finally:
        conn.close()
    if "e" in out:
        raise out["e"]
    return "web"


def serial_path(node: CloudletNode, xml: str) -> Path:
    src = ET.fromstring(xml).find("devices/serial/source")
    assert src is not None
    return node.host_root / Path(str(src.get("path"))).relative_to(node.root)


def stock_move(src: CloudletNode, dst: CloudletNode, uuid: str) -> None:
    conn_s, conn_d = libvirt.open(src.libvirt_uri), libvirt.open(dst.libvirt_uri)
    try:
        dom = conn_s.lookupByUUIDString(uuid)
        disk_el = ET.fromstring(dom.XMLDesc(0)).find("devices/disk/source")
        assert disk_el is not None
        disk = str(disk_el.get("file"))
        info = json.loads(src.run(["qemu-img", "info", "-U", "--output=json", disk], check=True).stdout)
        dst.run(["mkdir", "-p", os.path.dirname(disk)], check=True)
        dst.run(["rm", "-f", disk], check=True)
        dst.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", info["backing-filename"], "-F",
             info.get("backing-filename-format", "raw"), disk, str(info["virtual-size"])],
            check=True,
        )  # fmt: skip
        params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{dst.address}"}
        stop = threading.Event()

        def downtime() -> None:  # nephele: 1 s; 300 ms never converges at 20 Mbit/s
            while not stop.wait(0.5):
                try:
                    dom.migrateSetMaxDowntime(DOWNTIME_MS, 0)
                    return
                except libvirt.libvirtError:
                    pass  # the job has not started yet

        th = threading.Thread(target=downtime, daemon=True)
        th.start()
        try:
            dom.migrateToURI3(dst.libvirt_tcp_uri, params, FLAGS)
        finally:
            stop.set()
        src.run(["rm", "-f", disk])  # the source's overlay is stale now
    finally:
        conn_s.close()
        conn_d.close()


def fresh(c: Cloudlet, uuid: str, source: str) -> str:
    """Remove the instance wherever it is; run a new one from `source` on the first node."""
    for n in c.nodes[:2]:
        for it in agent(n).call("instance.ls"):
            if it["uuid"] == uuid:
                agent(n).call("instance.rm", {"instance": uuid})
        conn = libvirt.open(n.libvirt_uri)
        try:
            d = conn.lookupByUUIDString(uuid)
            if d.isActive():
                d.destroy()
            if d.isPersistent():
                d.undefine()
        except libvirt.libvirtError:
            pass  # not there
        finally:
            conn.close()
        n.run(["rm", "-rf", f"{n.root}/instances/{uuid}"])
    a = c.nodes[0]
    inst = agent(a).call("instance.run", {"snapshot": source, "title": "web-1", "ports": f"{PORT}:80"})
    state(a, 120)
    return str(inst["uuid"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("stock", "nephele"), required=True)
    ap.add_argument("--kind", choices=("snapshot", "image"), default="snapshot")
    ap.add_argument("--runs", type=int, default=6)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--fresh", action="store_true", help="a new instance on the first node for every move")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds the guest runs between moves")
    ns = ap.parse_args()
    guest = ensure_guest()
    c = Cloudlet.up(f"soak{os.getpid() % 10000}", 2, rate_mbit=1000, owner_pid=os.getpid())
    try:
        image = build_image(c, guest)
        source = snapshot(c, image) if ns.kind == "snapshot" else image
        c.set_link(ns.rate)
        a, b = c.nodes[:2]
        inst = agent(a).call("instance.run", {"snapshot": source, "title": "web-1", "ports": f"{PORT}:80"})
        uuid = inst["uuid"]
        cur, other = a, b
        s0 = state(cur, 120)
        print(json.dumps({"event": "start", "mode": ns.mode, "kind": ns.kind, "state": s0}), flush=True)
        for i in range(ns.runs):
            time.sleep(ns.settle)
            before = state(cur)
            conn = libvirt.open(cur.libvirt_uri)
            log_d = serial_path(other, conn.lookupByUUIDString(uuid).XMLDesc(0))
            conn.close()
            off = log_d.stat().st_size if log_d.exists() else 0
            t0 = time.monotonic()
            err = None
            corrected: dict[str, Any] = {}
            try:
                if ns.mode == "stock":
                    stock_move(cur, other, uuid)
                else:
                    res = perform(agent(cur), agent(other), "web-1", spec(other), source_address=cur.address)
                    mem = res.source.get("memory") or {}
                    corrected = {"checked": mem.get("checked"), "corrected": mem.get("corrected")}
            except Exception as e:  # reported in the line
                err = f"{type(e).__name__}: {e}"
            took = time.monotonic() - t0
            time.sleep(3)
            after = state(other, 30) if err is None else None
            text = log_d.read_bytes()[off:].decode(errors="replace") if log_d.exists() else ""
            splat = [ln for ln in text.splitlines() if any(w in ln for w in SPLAT)]
            ok = (
                err is None
                and not splat
                and after is not None
                and before is not None
                and after.get("fill_md5") == before.get("fill_md5")
                and int(after["counter"]) > int(before["counter"])
            )
            print(json.dumps({"run": i + 1, "from": cur.name, "to": other.name, "ok": ok, "error": err,
                              "seconds": round(took, 1), "splat": splat[:6], "before": before, **corrected,
                              "after": after}), flush=True)  # fmt: skip
            if err is not None:  # what the destination's QEMU and handoff logs say, then start anew
                logs = {}
                for f in [
                    *(other.libvirt_dir / "log" / "qemu").glob("nephele-*.log"),
                    *(other.host_root / "logs").glob("handoff_*.log"),
                ]:
                    logs[str(f.name)] = f.read_text(errors="replace")[-2500:]
                print(json.dumps({"dest_logs": logs}), flush=True)
            if not ok:
                conn = libvirt.open(other.libvirt_uri)
                try:
                    dstate = conn.lookupByUUIDString(uuid).state()
                except libvirt.libvirtError as e:
                    dstate = [str(e)]
                finally:
                    conn.close()
                late = state(other, 60) if err is None and after is None else None
                text = log_d.read_bytes()[off:].decode(errors="replace") if log_d.exists() else ""
                tail = {"serial_tail": text[-3000:], "dest_domain_state": dstate, "late_state": late}
                print(json.dumps(tail), flush=True)
            if not ok or ns.fresh:  # a broken guest cannot move on; --fresh: every move starts anew
                uuid = fresh(c, uuid, source)
                cur, other = a, b
                continue
            cur, other = other, cur
    finally:
        c.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
