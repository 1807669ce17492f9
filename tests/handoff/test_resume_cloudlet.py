"""A handoff cut by the link mid pre-copy, then retried, between two cloudlet nodes: the retry resumes
from the pages the destination verified before the cut (it sends clearly fewer memory bytes than a
fresh handoff of the same guest) and the guest's state is intact. bench/handoff_resume.py runs the same
scenario and prints the table."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nephele.cloudlet import Cloudlet
from nephele.cloudlet.core import CloudletNode
from nephele.cloudlet.guest import GuestFiles
from nephele.errors import HandoffError
from nephele.handoff import HandoffResult, perform
from tests.handoff.cloudlet_setup import agent, build_image, spec, wait_guest

pytestmark = pytest.mark.integration
PORT = 18081
MEM_MIB = 256
RATE_MBIT = 20


def link_bytes(c: Cloudlet) -> int:
    """Bytes both nodes sent on their links (the tbf counters inside the nodes)."""
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


def start_cold(c: Cloudlet, image: str, title: str) -> tuple[dict[str, Any], dict[str, str]]:
    """An instance booted cold from the image's disk: its RAM (the guest's 32 MiB of random fill data
    among it) is not what the image's memory state holds, so a handoff has real memory to move."""
    a = c.nodes[0]
    r = agent(a).call(
        "instance.run", {"snapshot": image, "title": title, "ports": f"{PORT}:80", "disk_only": True}
    )
    deadline = time.monotonic() + 180
    while True:  # httpd answers before the fill is written: the counter starts after it
        state = wait_guest(a, PORT, timeout=180)
        if int(state["counter"]) > 0:
            return r, state
        assert time.monotonic() < deadline, f"the guest never finished its fill: {state}"
        time.sleep(1)


def cut_attempt(
    c: Cloudlet, src: CloudletNode, dst: CloudletNode, uuid: str, at_stream: int, *, resume: bool = True
) -> dict[str, Any]:
    """Hand off, cut the destination's link once the source read at_stream bytes of QEMU's migration
    stream (a share of what a whole handoff of this guest reads: memory progress, whatever the disk
    mirror sent before), restore it once the source gave up; returns what it cost."""
    out: dict[str, Any] = {}
    events: list[dict[str, Any]] = []
    b0 = link_bytes(c)

    def run() -> None:
        try:
            out["r"] = perform(
                agent(src),
                agent(dst),
                uuid,
                spec(dst),
                events.append,
                source_address=src.address,
                resume=resume,
            )
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    cut_at = None
    try:
        deadline = time.monotonic() + 300
        while cut_at is None:
            assert t.is_alive(), f"the handoff ended before the cut: {out}"
            assert time.monotonic() < deadline, "the pre-copy never reached the cut point"
            prog = [e for e in events if e.get("event") == "progress" and e.get("side") == "source"]
            if prog and prog[-1]["stream_bytes"] >= at_stream and not prog[-1]["paused"]:
                cut_at = prog[-1]
                c.cut_link(dst.name)
            time.sleep(0.1)
        deadline = time.monotonic() + 150
        while not any(e.get("event") == "failed" for e in events) and t.is_alive():
            assert time.monotonic() < deadline, "the source never gave up on the cut link"
            time.sleep(0.5)
    finally:
        c.restore_link(dst.name)
    t.join(300)
    assert not t.is_alive(), "the cut handoff did not end"
    assert isinstance(out.get("e"), HandoffError), out
    return {
        "stream_at_cut": cut_at["stream_bytes"],
        "wire_at_cut": cut_at["wire_bytes"],
        "link": link_bytes(c) - b0,
    }


def handoff(c: Cloudlet, src: CloudletNode, dst: CloudletNode, uuid: str, *, resume: bool) -> dict[str, Any]:
    b0, t0 = link_bytes(c), time.monotonic()
    res: HandoffResult = perform(
        agent(src), agent(dst), uuid, spec(dst), source_address=src.address, resume=resume
    )
    mem = res.source["memory"]
    return {
        "memory_wire": int(mem["wan_out"]),
        "stream": int(mem["stream_bytes"]),
        "channels_wire": int(mem["wan_out"])
        + sum(int(v) for v in (res.source.get("channels") or {}).values()),
        "offer_bytes": int(mem.get("resume_offer_bytes") or 0),
        "offered_pages": int(mem.get("resume_offered") or 0),
        "link": link_bytes(c) - b0,
        "seconds": time.monotonic() - t0,
        "downtime_s": res.downtime_s,
        "resume_refs": res.destination.get("resume") or [],
        # pages: dirtied, by value, by reference, zero (the destination's MEMORY row)
        "table": (res.destination.get("table_blocks") or {}).get("memory"),
    }


def intact(node: CloudletNode, before: dict[str, str]) -> None:
    now = wait_guest(node, PORT)
    assert now["fill_md5"] == before["fill_md5"], "the guest's RAM data changed"
    assert int(now["counter"]) > int(before["counter"]), "the guest's counter did not advance"


def resume_dir(node: CloudletNode, uuid: str) -> Any:
    return node.host_root / "cache" / "handoff-resume" / uuid


@pytest.fixture(scope="module")
def image(cloudlet: Cloudlet, guest: GuestFiles) -> str:
    cid = build_image(cloudlet, guest, mem_mib=MEM_MIB)
    for n in cloudlet.nodes[:2]:
        agent(n).call("handoff.warm", {"image": cid})
    return cid


@pytest.fixture
def instance(cloudlet: Cloudlet, image: str) -> Iterator[tuple[dict[str, Any], dict[str, str]]]:
    r, before = start_cold(cloudlet, image, "rs-1")
    try:
        yield r, before
    finally:
        for n in cloudlet.nodes[:2]:
            for i in agent(n).call("instance.ls"):
                if i["uuid"] == r["uuid"]:
                    agent(n).call("instance.rm", {"instance": i["uuid"]})


def test_a_cut_handoff_resumes_from_what_the_destination_verified(
    cloudlet: Cloudlet, instance: tuple[dict[str, Any], dict[str, str]]
) -> None:
    a, b = cloudlet.nodes[:2]
    inst, before = instance
    uuid = inst["uuid"]
    cloudlet.set_link(RATE_MBIT)
    try:
        # what a whole handoff of this guest sends, there and back, without resume
        fresh = handoff(cloudlet, a, b, uuid, resume=False)
        intact(b, before)
        back = handoff(cloudlet, b, a, uuid, resume=False)
        intact(a, before)
        cut = cut_attempt(cloudlet, a, b, uuid, int(0.6 * fresh["stream"]))
        intact(a, before)  # the cut left the guest running on the source
        assert not (b.host_root / "instances" / uuid).exists()
        assert (resume_dir(b, uuid) / "resume.json").is_file(), "the destination kept nothing"
        retry = handoff(cloudlet, a, b, uuid, resume=True)
        intact(b, before)
        assert retry["resume_refs"] and retry["offered_pages"] > 1000, retry
        assert not resume_dir(b, uuid).exists(), "kept pages outlived the successful handoff"
        print(f"\nfresh {fresh}\nback {back}\ncut {cut}\nretry with resume {retry}")
        assert retry["memory_wire"] < 0.6 * min(fresh["memory_wire"], back["memory_wire"]), (retry, fresh)
    finally:
        cloudlet.set_link(20)
