"""Live handoff between two cloudlet nodes, end to end through the agents (SSH), libvirt p2p migration
and nephele's handoff channels; and the faults: a cut link and a killed receiver mid-transfer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from nephele.cloudlet import Cloudlet
from nephele.cloudlet.guest import GuestFiles
from nephele.errors import HandoffError
from nephele.handoff import perform
from tests.handoff.cloudlet_setup import (
    agent,
    build_image,
    domains,
    guest_state,
    running_instance,
    spec,
    wait_guest,
)

pytestmark = pytest.mark.integration
PORT = 18080
SLOW_MBIT = 2


@pytest.fixture(scope="module")
def image(cloudlet: Cloudlet, guest: GuestFiles) -> str:
    return build_image(cloudlet, guest)


@pytest.fixture
def instance(cloudlet: Cloudlet, image: str) -> Iterator[dict[str, Any]]:
    with running_instance(cloudlet, image, "web-1", PORT) as r:
        yield r


def leftovers(cloudlet: Cloudlet, uuid: str) -> list[str]:
    b = cloudlet.nodes[1]
    out = [f"domain {uuid}" for d in domains(b) if d == uuid]
    if (b.host_root / "instances" / uuid).exists():
        out.append(f"instance dir {uuid}")
    return out


def test_live_handoff_moves_a_running_guest(cloudlet: Cloudlet, instance: dict[str, Any]) -> None:
    a, b = cloudlet.nodes[:2]
    cloudlet.set_link(200)
    try:
        before = wait_guest(a, PORT)
        events: list[dict[str, Any]] = []
        during: list[Any] = []

        def on_event(ev: dict[str, Any]) -> None:
            events.append(ev)
            if ev.get("event") == "progress" and not during:  # `ps` on the source while it runs
                during.extend(i["handoff_url"] for i in agent(a).call("instance.ls"))

        res = perform(agent(a), agent(b), "web-1", spec(b), on_event, source_address=a.address)
        assert during == [f"tcp://{b.address}:8022"]
        after = wait_guest(b, PORT)
        assert after["fill_md5"] == before["fill_md5"]  # guest RAM survived
        assert int(after["counter"]) > int(before["counter"])  # and it kept running
        state1 = guest_state(b, PORT, "/cgi-bin/state")
        time.sleep(2.5)
        state2 = guest_state(b, PORT, "/cgi-bin/state")
        assert int(state2["counter"]) > int(state1["counter"])
        assert int(state2["disk_counter"]) > int(state1["disk_counter"])  # its disk works on B
        # the source is released, the destination holds a persistent instance without the handoff mark
        assert [i for i in agent(a).call("instance.ls") if i["uuid"] == instance["uuid"]] == []
        (on_b,) = [i for i in agent(b).call("instance.ls") if i["uuid"] == instance["uuid"]]
        assert on_b["state"] == "running" and on_b["handoff_url"] is None and on_b["ports"] == [f"{PORT}:80"]
        assert not (a.host_root / "instances" / instance["uuid"]).exists()
        d = res.destination
        assert d["memory"]["verified"] and d["memory"]["sha256"] == res.source["memory"]["sha256"]
        assert res.downtime_s is not None and 0 < res.downtime_s < 10
        assert any(e.get("event") == "progress" for e in events)
        stats = b.host_root / "logs" / os.path.basename(d["stats_file"])
        text = stats.read_text()
        for word in (
            "Iterations:",
            "Elapsed Time:",
            "Total MBytes Received over wire",
            "Downtime:",
            "DIRTIED",
        ):
            assert word in text
        assert "MEMORY" in text and "DISK" in text and "Status: completed" in text
        assert (b.host_root / "logs" / os.path.basename(d["log_file"])).is_file()
        assert res.source["memory"]["wan_out"] < res.source["memory"]["stream_bytes"]
        assert res.source["memory"]["checked"]  # the switchover check read the guest's RAM (memfd)
    finally:
        cloudlet.set_link(20)


def _run_async(
    a: Any, b: Any, cloudlet: Cloudlet
) -> tuple[threading.Thread, dict[str, Any], list[dict[str, Any]]]:
    out: dict[str, Any] = {}
    events: list[dict[str, Any]] = []

    def run() -> None:
        try:
            out["r"] = perform(agent(a), agent(b), "web-1", spec(b), events.append, source_address=a.address)
        except BaseException as e:
            out["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out, events


def _wait_transfer(events: list[dict[str, Any]], t: threading.Thread, min_bytes: int) -> None:
    deadline = time.monotonic() + 120
    while True:
        prog = [e for e in events if e.get("event") == "progress" and e.get("side") == "source"]
        if prog and prog[-1]["wire_bytes"] > min_bytes and not prog[-1]["paused"]:
            return
        assert t.is_alive(), "the handoff ended before the fault was injected"
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _check_source_intact(cloudlet: Cloudlet, instance: dict[str, Any], before: dict[str, str]) -> None:
    a = cloudlet.nodes[0]
    (on_a,) = [i for i in agent(a).call("instance.ls") if i["uuid"] == instance["uuid"]]
    assert on_a["state"] == "running" and on_a["handoff_url"] is None
    now = wait_guest(a, PORT)
    assert now["fill_md5"] == before["fill_md5"]
    assert int(now["counter"]) > int(before["counter"])


def test_cut_link_mid_transfer_leaves_the_vm_running_on_the_source(
    cloudlet: Cloudlet, instance: dict[str, Any]
) -> None:
    a, b = cloudlet.nodes[:2]
    before = wait_guest(a, PORT)
    cloudlet.set_link(SLOW_MBIT)  # the guest shares most memory with its image: slow the link down
    t, out, events = _run_async(a, b, cloudlet)
    try:
        _wait_transfer(events, t, 256 << 10)
        cloudlet.cut_link(b.name)
        deadline = time.monotonic() + 150
        while not any(e.get("event") == "failed" for e in events):
            assert time.monotonic() < deadline, "the source never gave up on the cut link"
            time.sleep(0.5)
    finally:
        cloudlet.restore_link(b.name)
        cloudlet.set_link(20)
    t.join(200)
    assert not t.is_alive()
    assert isinstance(out.get("e"), HandoffError), out
    _check_source_intact(cloudlet, instance, before)
    deadline = time.monotonic() + 60
    while leftovers(cloudlet, instance["uuid"]):
        assert time.monotonic() < deadline, leftovers(cloudlet, instance["uuid"])
        time.sleep(1)


def test_killed_receiver_mid_transfer_leaves_the_vm_running_on_the_source(
    cloudlet: Cloudlet, instance: dict[str, Any]
) -> None:
    a, b = cloudlet.nodes[:2]
    before = wait_guest(a, PORT)
    cloudlet.set_link(SLOW_MBIT)
    try:
        t, out, events = _run_async(a, b, cloudlet)
        _wait_transfer(events, t, 256 << 10)
        (ready,) = [e for e in events if e.get("event") == "ready"]
        os.kill(int(ready["pid"]), signal.SIGKILL)
        t.join(200)
    finally:
        cloudlet.set_link(20)
    assert not t.is_alive()
    err = out.get("e")
    assert isinstance(err, HandoffError), out
    _check_source_intact(cloudlet, instance, before)
    assert leftovers(cloudlet, instance["uuid"]) == []


def test_nephele_client_hands_off_and_back(cloudlet: Cloudlet, instance: dict[str, Any]) -> None:
    a, b = cloudlet.nodes[:2]
    cloudlet.set_link(200)
    try:
        before = wait_guest(a, PORT)
        for src, dst in ((a, b), (b, a)):
            proc = subprocess.run(
                [sys.executable, "-m", "nephele.cli.client", "--cloudlet", cloudlet.name, src.name, "handoff",
                 "web-1", dst.name],
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            lines = proc.stdout.splitlines()
            assert lines[0] == (
                f"Handoff initiated for web-1 [{instance['uuid']}] to the following destination: "
                f"tcp://{dst.address}:8022"
            )
            assert any(line.startswith("Handoff completed: web-1") for line in lines)
            assert any(line.startswith("MEMORY") for line in lines) and any(
                line.startswith("DISK") for line in lines
            )
            now = wait_guest(dst, PORT)
            assert now["fill_md5"] == before["fill_md5"]
        assert int(wait_guest(a, PORT)["counter"]) > int(before["counter"])
    finally:
        cloudlet.set_link(20)
