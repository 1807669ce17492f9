"""The handoff fault matrix (issue 9 item 3): phase x fault on a real two-node cloudlet.

One instance runs on edge-a for the whole module; every cell starts a handoff to edge-b, injects its
fault at its phase, and then checks what a user relies on:

* the handoff failed with a HandoffError (the fault is never silent);
* the VM runs on exactly one node, the source, with its state intact: the md5 of the data it filled its
  RAM with is unchanged, its counter advanced, and it is not marked as being handed off;
* nothing new is left on either node: no domain, no instance dir or scratch file, no process, no listener
  (compared with a snapshot taken before the cell);
* a next handoff would be accepted (``handoff.prepare`` on the source).

Phases: ``ready`` (the destination listens, the source has not started), ``mirror`` (libvirt started:
NBD disk mirror, before memory), ``precopy`` (memory pre-copy running, > 256 KiB on the wire),
``switchover`` (the source QEMU paused for the stop-and-copy: libvirt's SUSPENDED event on the source).
The last test hands the instance off for real, with a bandwidth cap, and back (convergence).
docs/faults.md has the outcomes and how long each cell takes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import libvirt
import pytest

from nephele.cloudlet import Cloudlet
from nephele.cloudlet.core import CloudletNode
from nephele.cloudlet.guest import GuestFiles
from nephele.errors import HandoffError, NepheleError
from nephele.handoff import channel as ch
from nephele.handoff import perform
from tests.handoff.cloudlet_setup import agent, build_image, spec, wait_guest
from tests.handoff.fault_support import LifecycleWatch, Relay, libvirt_domains, new_since, snapshot

pytestmark = pytest.mark.integration
PORT = 18090
SLOW_MBIT = 2  # mid-transfer faults: keep the pre-copy long enough to hit
FAST_MBIT = 20
MIRROR_MBIT = 100
MIB = 1 << 20


@dataclass(frozen=True)
class Cell:
    phase: str  # ready | mirror | precopy | switchover
    fault: str  # cut | kill-src | kill-dst | libvirtd-dst | disk-full | corrupt-memory | corrupt-disk
    rate: float = SLOW_MBIT
    msg: str = ""  # a regex the error must match
    expect: str = "source"  # where the VM must run afterwards

    @property
    def id(self) -> str:
        return f"{self.phase}-{self.fault}"


CELLS = [
    Cell("ready", "cut"),
    Cell("ready", "kill-dst"),
    Cell("ready", "libvirtd-dst", msg="edge-b refused the handoff of 'fm-1'"),
    Cell("ready", "disk-full", msg="edge-b refused the handoff of 'fm-1'.*not enough disk space"),
    Cell("mirror", "kill-src"),
    Cell("mirror", "corrupt-disk"),
    Cell("precopy", "cut"),
    Cell("precopy", "kill-src"),
    Cell("precopy", "kill-dst"),
    Cell("precopy", "libvirtd-dst"),
    Cell("precopy", "disk-full"),
    Cell("precopy", "corrupt-memory"),
    Cell("switchover", "cut", FAST_MBIT),
    Cell("switchover", "kill-src", FAST_MBIT),
    Cell("switchover", "kill-dst", FAST_MBIT),
    # libvirt's Finish answer (destination -> source, on the control channel) is lost after the
    # stop-and-copy: the destination runs the VM, the source's libvirt resumes its copy
    Cell("confirm", "lost-answer", FAST_MBIT, expect="destination"),
]
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def image(cloudlet: Cloudlet, guest: GuestFiles) -> str:
    return build_image(cloudlet, guest)


@pytest.fixture(scope="module")
def instance(cloudlet: Cloudlet, image: str) -> Iterator[dict[str, Any]]:
    a, b = cloudlet.nodes[:2]
    r = agent(a).call("instance.run", {"snapshot": image, "title": "fm-1", "ports": f"{PORT}:80"})
    try:
        yield r
    finally:
        cloudlet.set_link(20)
        for n in (a, b):
            for i in agent(n).call("instance.ls"):
                if i["uuid"] == r["uuid"]:
                    agent(n).call("instance.rm", {"instance": i["uuid"]})
        if TIMES:
            print("\nfault matrix cell times (s):", {k: round(v, 1) for k, v in TIMES.items()})


def _mount_tmpfs(node: CloudletNode, sub: str, size: int) -> str:
    path = f"{node.root}/{sub}"
    node.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "nphl-fault", path], check=True)
    return path


def _libvirtd_alive(node: CloudletNode) -> bool:
    try:
        os.kill(int(node.libvirtd_pidfile.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _umount(node: CloudletNode, path: str) -> None:
    node.run(["umount", "-l", path], timeout=30)


class Run:
    """One handoff attempt in a thread, with a trigger on its events."""

    def __init__(self, cloudlet: Cloudlet, cell: Cell, inject: Callable[[dict[str, Any]], None]) -> None:
        self.cloudlet = cloudlet
        self.cell = cell
        self.inject = inject
        self.events: list[dict[str, Any]] = []
        self.out: dict[str, Any] = {}
        self.fired = threading.Event()
        self.via: tuple[str, int] | None = None
        self.slowed = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def fire(self, ev: dict[str, Any]) -> None:
        if not self.fired.is_set():
            self.fired.set()
            threading.Thread(target=self.inject, args=(ev,), daemon=True).start()

    def on_event(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)
        phase, kind = self.cell.phase, ev.get("event")
        if not self.slowed and kind == "progress" and ev.get("side") == "source" and ev.get("stream_bytes"):
            # the disk mirror went at the fast rate (the overlay grows as the guest writes); the memory
            # pre-copy goes slowly enough to be hit mid-way
            self.slowed = True
            threading.Thread(target=self.cloudlet.set_link, args=(self.cell.rate,), daemon=True).start()
        if phase == "ready" and kind == "ready":
            self.fire(ev)
        elif (
            phase == "mirror"
            and kind == "progress"
            and ev.get("side") == "source"
            and ev.get("disk_total")
            and not ev.get("stream_bytes")
        ):
            self.fire(ev)  # libvirt mirrors the disk before it starts the memory migration
        elif (
            phase == "precopy"
            and kind == "progress"
            and ev.get("side") == "source"
            and ev["wire_bytes"] > (256 << 10)
            and ev.get("memory_remaining")
            and ev.get("stream_bytes")
            and not ev["paused"]
        ):
            self.fire(ev)

    def _run(self) -> None:
        a, b = self.cloudlet.nodes[:2]
        try:
            self.out["result"] = perform(
                agent(a), agent(b), "fm-1", spec(b), self.on_event, source_address=a.address, via=self.via
            )
        except BaseException as exc:
            self.out["error"] = exc

    def event(self, name: str, side: str | None = None) -> dict[str, Any] | None:
        for ev in self.events:
            if ev.get("event") == name and (side is None or ev.get("side") == side):
                return ev
        return None


def _wait(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s: {what}"
        time.sleep(0.3)


def _check_intact(cloudlet: Cloudlet, uuid: str, before: dict[str, str], on: str = "source") -> None:
    """The VM runs on exactly one node (`on`), unmarked, its RAM data intact and its counter advancing;
    a next handoff from there is accepted."""
    here, other = cloudlet.nodes[:2] if on == "source" else cloudlet.nodes[1::-1]
    on_here = [i for i in agent(here).call("instance.ls") if i["uuid"] == uuid]
    on_other = [i for i in agent(other).call("instance.ls") if i["uuid"] == uuid]
    assert on_other == [], f"the instance is on {other.name} too: {on_other}"
    assert uuid not in libvirt_domains(other), f"a domain is left on {other.name}"
    assert not (other.host_root / "instances" / uuid).exists(), f"instance dir left on {other.name}"
    assert len(on_here) == 1 and on_here[0]["state"] == "running", on_here
    assert on_here[0]["handoff_url"] is None, "still marked as being handed off"
    now = wait_guest(here, PORT)
    assert now["fill_md5"] == before["fill_md5"], "the guest's RAM data changed"
    assert int(now["counter"]) > int(before["counter"]), "the guest's counter did not advance"
    agent(here).call("handoff.prepare", {"instance": uuid})  # a next handoff is accepted


def _leftovers(cloudlet: Cloudlet, snaps: dict[str, dict[str, Any]], allow: str = "\0") -> list[str]:
    out = []
    for n in cloudlet.nodes[:2]:
        out += [f"{n.name}: {x}" for x in new_since(snaps[n.name], n) if allow not in x]
    return out


@pytest.mark.parametrize("cell", CELLS, ids=[c.id for c in CELLS])
def test_fault(cloudlet: Cloudlet, instance: dict[str, Any], cell: Cell) -> None:
    a, b = cloudlet.nodes[:2]
    uuid = instance["uuid"]
    if any(i["uuid"] == uuid for i in agent(b).call("instance.ls")):  # an earlier cell failed after a move
        cloudlet.set_link(200)
        perform(agent(b), agent(a), "fm-1", spec(a), source_address=b.address)
    t0 = time.monotonic()
    before = wait_guest(a, PORT)
    snaps = {n.name: snapshot(n) for n in (a, b)}
    # the disk mirror runs fast (the guest's overlay grows all the time), slower for a mirror-phase fault;
    # the memory pre-copy at the cell's rate
    cloudlet.set_link(FAST_MBIT if cell.phase == "mirror" else MIRROR_MBIT)
    undo: list[Callable[[], None]] = []
    watch: LifecycleWatch | None = None
    relay: Relay | None = None

    def kill(pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def inject(ev: dict[str, Any]) -> None:
        f = cell.fault
        if f == "cut":
            cloudlet.cut_link(b.name)
        elif f == "kill-dst":
            ready = run.event("ready")
            assert ready is not None
            kill(int(ready["pid"]))
        elif f == "kill-src":
            started = _wait(lambda: run.event("started", "source"), 60, "the source's started event")
            kill(int(started["pid"]))
        elif f == "libvirtd-dst":
            cloudlet.stop_libvirtd(b)
        elif f == "lost-answer":
            assert relay is not None
            relay.held.add(ch.CONTROL)
        elif f == "disk-full":
            b.run(["sh", "-c", f"cat /dev/zero > {b.root}/tmp/fill"], timeout=120)

    run = Run(cloudlet, cell, inject)
    try:
        # Faults in place before the handoff starts.
        if cell.fault == "libvirtd-dst" and cell.phase == "ready":
            cloudlet.stop_libvirtd(b)
            undo.append(lambda: cloudlet.start_libvirtd(b))
            run.fired.set()
        elif cell.fault == "libvirtd-dst":  # restarted only if the fault stopped it

            def restart() -> None:
                if run.fired.is_set():
                    _wait(lambda: not _libvirtd_alive(b), 30, "the stopped libvirtd to exit")
                    cloudlet.start_libvirtd(b)

            undo.append(restart)
        if cell.fault == "disk-full" and cell.phase == "ready":
            path = _mount_tmpfs(b, "instances", 1 * MIB)  # refused before anything moves
            undo.append(lambda: _umount(b, path))
            run.fired.set()
        elif cell.fault == "disk-full":  # room for the memory scratch; filled during the pre-copy
            path = _mount_tmpfs(b, "tmp", 256 * MIB + 64 * MIB)
            undo.append(lambda: _umount(b, path))
        if cell.fault == "lost-answer":
            relay = Relay(cloudlet.bridge_address, (b.address, 8022))
            run.via = relay.address
        if cell.fault.startswith("corrupt-"):
            chan = ch.MEMORY if cell.fault == "corrupt-memory" else ch.DISK
            relay = Relay(
                cloudlet.bridge_address,
                (b.address, 8022),
                flip=(chan, 200_000 if chan == ch.MEMORY else 20_000),
            )
            run.via = relay.address
            run.fired.set()
        if cell.phase in ("switchover", "confirm"):

            def on_lifecycle(event: int, _detail: int) -> None:
                if event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
                    run.fire({"event": "suspended"})

            watch = LifecycleWatch(a, uuid, on_lifecycle)
        run.thread.start()
        if cell.fault == "cut":
            # restore the link once the source gave up (the destination then sees its channels die)
            _wait(lambda: run.fired.is_set(), 180, "the fault's phase")
            _wait(
                lambda: run.event("failed", "source") or not run.thread.is_alive(),
                180,
                "the source giving up",
            )
            cloudlet.restore_link(b.name)
        run.thread.join(300)
        assert not run.thread.is_alive(), "the handoff did not end"
        assert run.fired.is_set(), f"the phase {cell.phase} was never reached: {run.events[-3:]}"
    finally:
        if watch is not None:
            watch.close()
        if relay is not None:
            relay.close()
        cloudlet.restore_link(b.name)
        cloudlet.set_link(20)
        if cell.fault == "disk-full":
            b.run(["rm", "-f", f"{b.root}/tmp/fill"])
        for u in reversed(undo):
            u()
    err = run.out.get("error")
    if cell.expect == "destination":
        # the switchover completed: the handoff reports success and the source's copy is gone
        assert err is None and "result" in run.out, run.out
        assert relay is not None and relay.dropped > 0, "the destination's answer was not held back"
        assert run.out["result"].source.get("released"), run.out["result"].source
        err = f"completed on the destination; the source's error: {run.out['result'].source['error']}"
        _check_intact(cloudlet, uuid, before, on="destination")
        _wait(lambda: not new_since(snaps[a.name], a), 60, f"leftovers on {a.name}")
        perform(agent(b), agent(a), "fm-1", spec(a), source_address=b.address)  # and back: converges
        _check_intact(cloudlet, uuid, before)
        allow = f"guest=nephele-{uuid.replace('-', '')[:12]}"  # the instance's own new QEMU on the source
    else:
        assert "result" not in run.out, f"the handoff completed despite the fault: {run.out}"
        assert isinstance(err, HandoffError), f"expected a HandoffError, got {err!r}"
        assert re.search(cell.msg, str(err)), str(err)
        if relay is not None and cell.fault.startswith("corrupt-"):
            assert relay.flipped, f"no byte was flipped (channels seen: {relay.channels})"
        _check_intact(cloudlet, uuid, before)
        allow = "\0"
    _wait(
        lambda: not _leftovers(cloudlet, snaps, allow), 90, f"leftovers: {_leftovers(cloudlet, snaps, allow)}"
    )
    TIMES[cell.id] = time.monotonic() - t0
    print(f"{cell.id}: {err} [{TIMES[cell.id]:.1f} s]")


def test_refusals_before_anything_moves(cloudlet: Cloudlet, instance: dict[str, Any], image: str) -> None:
    """The destination refuses, naming node and instance, and keeps nothing, when it lacks the base image
    or cannot run the domain's machine type or CPU model (libvirt's domain capabilities)."""
    a, b = cloudlet.nodes[:2]
    snaps = {n.name: snapshot(n) for n in (a, b)}
    info = agent(a).call("handoff.prepare", {"instance": instance["uuid"]})
    assert info["platform"]["machine"].startswith("pc-")  # the live XML has the expanded machine type

    def receive(**platform: str) -> None:
        inst = {**info, "platform": {**info["platform"], **platform}}
        args = {"handoff_id": "00" * 16, "token": "00" * 32, "instance": inst, "source_ip": a.address}
        agent(b).call("handoff.receive", args)

    with pytest.raises(NepheleError, match=r"cannot run instance 'fm-1'.*machine type pc-i440fx-99\.0"):
        receive(machine="pc-i440fx-99.0")
    with pytest.raises(NepheleError, match=r"cannot run instance 'fm-1'.*arch aarch64"):
        receive(arch="aarch64", machine="virt")
    with pytest.raises(NepheleError, match=r"cannot run instance 'fm-1'.*CPU model NoSuchCPU is not usable"):
        receive(cpu_mode="custom", cpu_model="NoSuchCPU")
    with pytest.raises(
        NepheleError, match=r"instance 'fm-1'.*boots from /nonexistent/kernel, not on this node"
    ):
        agent(b).call(
            "handoff.receive",
            {"handoff_id": "00" * 16, "token": "00" * 32, "source_ip": a.address,
             "instance": {**info, "boot_files": ["/nonexistent/kernel"]}},
        )  # fmt: skip
    held = b.host_root / "images" / image
    aside = b.host_root / f"aside-{image}"  # out of images/: the node does not hold it any more
    shutil.move(held, aside)
    try:
        with pytest.raises(HandoffError, match=r"edge-b refused the handoff of 'fm-1'.*base image"):
            perform(agent(a), agent(b), "fm-1", spec(b), source_address=a.address)
    finally:
        shutil.move(aside, held)
    _check_intact(cloudlet, instance["uuid"], wait_guest(a, PORT) | {"counter": "-1"})
    _wait(lambda: not _leftovers(cloudlet, snaps), 30, f"leftovers: {_leftovers(cloudlet, snaps)}")


def test_after_the_faults_a_capped_handoff_converges(cloudlet: Cloudlet, instance: dict[str, Any]) -> None:
    """After every cell, the same instance hands off for real (bandwidth cap honoured) and back."""
    a, b = cloudlet.nodes[:2]
    before = wait_guest(a, PORT)
    cloudlet.set_link(200)
    try:
        cap = 12.0  # above the guest's dirty rate (1 MiB/s), or the capped handoff could never converge
        samples: list[tuple[float, int]] = []  # (elapsed s, wire bytes) from the source, every ~1 s

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("event") == "progress" and ev.get("side") == "source":
                samples.append((float(ev["elapsed"]), int(ev["wire_bytes"])))

        res = perform(
            agent(a), agent(b), "fm-1", spec(b), on_event, source_address=a.address, bandwidth_mbit=cap
        )
        assert res.destination["memory"]["verified"]
        after = wait_guest(b, PORT)
        assert after["fill_md5"] == before["fill_md5"]
        # Over every stretch of >= 3 s: at most the cap, plus one message that the source's counter
        # takes in before the paced channel has sent it (a delta batch is up to ~1 MB); and the cap was
        # reached, on a link 16 x faster (else this would test nothing).
        limit = cap * 1e6 / 8
        lead = 2 << 20
        pairs = [
            (t2 - t1, w2 - w1)
            for i, (t1, w1) in enumerate(samples)
            for t2, w2 in samples[i + 1 :]
            if t2 - t1 >= 3.0
        ]
        assert pairs, f"the handoff was too short to measure: {samples}"
        over = [(dt, dw) for dt, dw in pairs if dw > limit * dt * 1.05 + lead]
        assert not over, (over, samples)
        assert max(dw / dt for dt, dw in pairs) >= limit * 0.6, samples
        back = perform(agent(b), agent(a), "fm-1", spec(a), source_address=b.address)
        assert back.destination["memory"]["verified"]
        assert wait_guest(a, PORT)["fill_md5"] == before["fill_md5"]
    finally:
        cloudlet.set_link(20)
