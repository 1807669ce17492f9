#!/usr/bin/env python3
"""Resumable copies (issue 9): an image upload to a node is cut at ~50 %, the apply retries it, and
the bytes that crossed the node's link in total are counted, with resume and without.

A one-node local cloudlet (no VMs) with a shaped link; the manifest wants image `big` on the node from
a source file (an image export zip: --image, e.g. the test guest's tiny.zip that the e2e tests export,
or a synthetic incompressible image of --size MiB). The apply runs in a thread; when the node's partial
upload reaches --cut of the file the node's link goes down; SSHTransport notices the stall after
--stall seconds (NodeUnreachable: a temporary error), the apply retries with backoff, and the link
comes back. Bytes are the host side of the node's veth (tx: everything the controller sent to the
node, SSH and the agent's calls included), so "resent" is what crossed beyond the file's own size.

    python bench/copy_resume.py [--image tiny.zip | --size 32] [--rate 20] [--cut 0.5]

Needs root (network namespaces, sshd per node), like the integration tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephele import manifest
from nephele.agent.nodes import transport_for_node
from nephele.cloudlet import Cloudlet, reap_orphans
from nephele.model import NodeSpec
from nephele.node.store import IMAGE_FORMAT, content_id
from nephele.reconcile.execute import ApplyOptions, ApplyResult, apply
from nephele.reconcile.inventory import InventoryStore
from nephele.reconcile.observe import TransportPool, observe
from nephele.reconcile.plan import plan

MiB = 1 << 20
WORKDIR = Path(tempfile.gettempdir()) / "nephele-bench-cloudlets"


@dataclass
class CutCopy:
    resume: bool
    size: int  # the image export's bytes
    cut_at: int  # what the node held when its link went down
    wire: int  # bytes the host sent to the node during the apply (veth tx)
    attempts: int
    seconds: float
    ok: bool
    detail: str
    lines: list[str]

    @property
    def resent(self) -> int:
        return max(0, self.wire - self.size)


def synthetic_image(path: Path, size_mib: int, seed: int = 9) -> str:
    """An image export of incompressible bytes (image.import verifies it); returns its content id."""
    rnd = random.Random(seed)
    files = {
        "disk.raw": rnd.randbytes(size_mib * MiB * 3 // 4),
        "memory.save": rnd.randbytes(size_mib * MiB // 4),
    }
    sums = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    cid = content_id(sums)
    meta = {
        "format": IMAGE_FORMAT,
        "name": "big",
        "content_id": cid,
        "created": "bench",
        "files": {n: {"sha256": sums[n], "size": len(b)} for n, b in files.items()},
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("nephele-image.json", json.dumps(meta))
        for n, b in files.items():
            zf.writestr(n, b)
    return cid


def image_content_id(path: Path) -> str:
    with zipfile.ZipFile(path) as zf:
        return str(json.loads(zf.read("nephele-image.json"))["content_id"])


def tx_bytes(iface: str) -> int:
    return int(Path(f"/sys/class/net/{iface}/statistics/tx_bytes").read_text())


def cut_copy(
    c: Cloudlet,
    image: Path,
    workdir: Path,
    *,
    resume: bool,
    cut: float = 0.5,
    stall: float = 3.0,
    down_for: float = 2.0,
    target: int = 0,
    source: int | None = None,
) -> CutCopy:
    """Apply a manifest that imports `image` onto node `target` of the cloudlet, cutting its link once
    when the node's upload holds `cut` of the file. That node must not hold the image yet. With
    `source` (a node index), the image comes from that node, which must hold it as `big` (exported
    there, fetched, uploaded: the upload hop is cut), instead of from the file."""
    node = c.nodes[target]
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "cloudlet.yaml"
    spec = (
        f"{{source: {image}, nodes: [{node.name}]}}"
        if source is None
        else f"{{nodes: [{c.nodes[source].name}, {node.name}]}}"
    )
    path.write_text(
        "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: resume}\n"
        + c.manifest_nodes()
        + f"images:\n  big: {spec}\n"
    )
    d = manifest.load(path)
    size = image.stat().st_size if source is None else 0
    records = workdir / "state" / "copies"

    def factory(spec: NodeSpec) -> Any:
        t = transport_for_node(spec, timeout=600)
        t.stall_timeout = stall  # type: ignore[attr-defined]  # SSHTransport: a stall is a cut link
        return t

    pool = TransportPool(d, factory)
    lines: list[str] = []
    done: list[ApplyResult] = []
    try:
        p = plan(d, observe(d, pool, timeout=30), None)
        before = tx_bytes(node.host_veth)
        t0 = time.monotonic()
        th = threading.Thread(
            target=lambda: done.append(
                apply(
                    p,
                    d,
                    pool,
                    ApplyOptions(resume_copies=resume, backoff_initial=1.0, retries=6, observe_timeout=10),
                    inventory=InventoryStore(workdir / "state", d.name),
                    say=lines.append,
                )
            ),
            daemon=True,
        )
        th.start()
        tmp = node.host_root / "tmp"
        cut_at = 0
        deadline = time.monotonic() + 600
        while th.is_alive() and time.monotonic() < deadline:
            if not size:  # a node's export: its size is known once the controller recorded it
                for rec in records.glob("*.json") if records.is_dir() else []:
                    size = int(json.loads(rec.read_text())["size"])
            held = [f.stat().st_size for f in tmp.glob("nephele-*.zip") if f.is_file()]
            if size and held and max(held) >= cut * size:
                cut_at = max(held)
                break
            time.sleep(0.05)
        if cut_at:
            c.cut_link(node)
            try:
                give_up = time.monotonic() + stall + 60  # the stall must be noticed by then
                while th.is_alive() and not any("temporary error" in x for x in lines):
                    if time.monotonic() > give_up:
                        raise RuntimeError("the cut was not noticed: " + "\n".join(lines[-5:]))
                    time.sleep(0.1)
                time.sleep(down_for)
            finally:
                c.restore_link(node)
        th.join(timeout=600)
        seconds = time.monotonic() - t0
        wire = tx_bytes(node.host_veth) - before
    finally:
        pool.close()
    if not done:
        raise RuntimeError("the apply did not finish: " + "\n".join(lines[-10:]))
    [r] = done[0].results
    return CutCopy(
        resume, size, cut_at, wire, r.attempts, seconds, done[0].ok, r.detail or r.error or "", lines
    )


def table(rows: list[CutCopy]) -> list[str]:
    """resume | cut at | sent | re-sent | sent/file | attempts | time."""
    head = ("resume", "cut at MiB", "sent MiB", "re-sent MiB", "sent/file", "attempts", "time s")
    out = ["  ".join(f"{h:>11}" for h in head)]
    for r in rows:
        cells = (
            "on" if r.resume else "off",
            f"{r.cut_at / MiB:.1f}",
            f"{r.wire / MiB:.1f}",
            f"{r.resent / MiB:.1f}",
            f"{r.wire / r.size:.2f}",
            str(r.attempts),
            f"{r.seconds:.1f}",
        )
        out.append("  ".join(f"{x:>11}" for x in cells))
    return out


def remove_image(c: Cloudlet, name: str) -> None:
    from nephele.agent import Agent

    agent = Agent(transport_for_node(c.node_specs()[0], timeout=120))
    try:
        agent.call("image.rm", {"id": name})
    finally:
        agent.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", type=Path, help="an image export zip (default: a synthetic one of --size MiB)")
    ap.add_argument("--size", type=int, default=32, help="MiB of the synthetic image")
    ap.add_argument("--rate", type=float, default=20.0, help="the node's link, Mbit/s")
    ap.add_argument("--cut", type=float, default=0.5, help="cut the link when this share has arrived")
    args = ap.parse_args()
    reap_orphans(WORKDIR)
    with tempfile.TemporaryDirectory(prefix="nephele-bench-resume-") as tmpd:
        work = Path(tmpd)
        image = args.image
        if image is None:
            image = work / "big.zip"
            synthetic_image(image, args.size)
        c = Cloudlet.up(
            f"br{os.getpid() % 100000}",
            1,
            rate_mbit=args.rate,
            delay_ms=0,
            workdir=WORKDIR,
            owner_pid=os.getpid(),
        )
        try:
            rows = []
            for resume in (True, False):
                r = cut_copy(c, image, work / ("on" if resume else "off"), resume=resume, cut=args.cut)
                if not r.ok:
                    print("\n".join(r.lines), file=sys.stderr)
                    return 1
                rows.append(r)
                remove_image(c, "big")  # so that the next run copies it again
        finally:
            c.down()
    print(f"image export {image.name}: {rows[0].size / MiB:.1f} MiB, link {args.rate:g} Mbit/s")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
