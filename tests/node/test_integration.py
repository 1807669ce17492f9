"""The node runtime on the real thing: a 2-node cloudlet (libvirtd, QEMU under TCG, sshd per node),
driven over SSH through the agent protocol and through `nephele-client`.

One image is built on edge-a (scripted pause from the test, through the node's libvirtd) and shared by
every test of this module; at most two VMs run at a time.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

from nephele.agent.client import Agent, fan_out
from nephele.agent.ssh import SSHTransport
from nephele.cloudlet import Cloudlet
from nephele.cloudlet.core import CloudletNode
from nephele.cloudlet.guest import GuestFiles, cmdline
from nephele.errors import NodeUnreachable, RemoteError
from nephele.node import domain as dx

pytestmark = pytest.mark.integration


@dataclass
class Built:
    image: dict[str, Any]
    progress: list[str]
    ready_uptime: float
    seconds: float


def transport(node: CloudletNode) -> SSHTransport:
    return SSHTransport(
        node.address,
        node=node.name,
        user=node.ssh_user,
        port=node.ssh_port,
        key=node.ssh_key,
        known_hosts=node.known_hosts,
        timeout=300,
    )


def on_host(node: CloudletNode, path_on_node: str) -> Path:
    """A file under the node's root, seen from the host."""
    rel = Path(path_on_node).relative_to(node.root)
    return node.host_root / rel


def serial_of(dom: Any) -> str:
    import xml.etree.ElementTree as ET

    src = ET.fromstring(dom.XMLDesc(0)).find("devices/serial/source")
    assert src is not None
    return str(src.get("path"))


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http_get(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def parse_state(text: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in text.split() if "=" in kv)


def wipe(agent: Agent) -> None:
    """Remove every instance, snapshot and image from a node (through its own ops)."""
    for inst in agent.call("instance.ls"):
        agent.call("instance.rm", {"instance": inst["uuid"]})
    for snap in agent.call("snapshot.ls"):
        agent.call("snapshot.rm", {"name": snap["name"]})
    for image in agent.call("image.ls"):
        agent.call("image.rm", {"id": image["id"], "force": True})


@pytest.fixture(scope="module")
def nodes(cloudlet: Cloudlet) -> Iterator[tuple[CloudletNode, CloudletNode]]:
    yield cloudlet.nodes[0], cloudlet.nodes[1]


@pytest.fixture(scope="module")
def agents(nodes: tuple[CloudletNode, CloudletNode]) -> Iterator[tuple[Agent, Agent]]:
    a, b = Agent(transport(nodes[0])), Agent(transport(nodes[1]))
    for agent in (a, b):
        wipe(agent)  # the session cloudlet is shared: start from empty nodes whatever ran before
    yield a, b
    a.close()
    b.close()


@pytest.fixture(scope="module")
def built(
    guest: GuestFiles, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent]
) -> Iterator[Built]:
    """Build an image on edge-a: the node boots the guest and waits; the test pauses it through the
    node's libvirtd once the guest says NEPHELE-READY, as a user would in virt-manager."""
    node = nodes[0]
    inbox = node.host_root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    desc = {
        "disk": str(guest.disk),
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": cmdline(fill_mib=8, dirty_mib=1, disk_kib=4),
        "memory_kib": 131072,
        "name": "tiny",
    }
    (inbox / "tiny.json").write_text(json.dumps(desc))
    progress: list[str] = []
    outcome: dict[str, Any] = {}

    def build() -> None:
        try:
            outcome["result"] = agents[0].call(
                "image.build",
                {"path": f"{node.root}/inbox/tiny.json", "timeout": 240},
                progress=progress.append,
            )
        except Exception as exc:  # reported by the main thread
            outcome["error"] = exc

    t0 = time.monotonic()
    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    conn = libvirt.open(node.libvirt_uri)
    try:

        def build_domain() -> Any:
            if "error" in outcome:
                raise outcome["error"]
            for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if d.name().startswith("nephele-build-"):
                    return d
            return None

        dom = wait_for(build_domain, 120, "the build VM")
        serial = on_host(node, serial_of(dom))
        ready = wait_for(
            lambda: serial.is_file() and b"NEPHELE-READY" in serial.read_bytes() and serial.read_bytes(),
            120,
            "NEPHELE-READY on the build VM's console",
        )
        line = next(ln for ln in ready.decode(errors="replace").splitlines() if "NEPHELE-READY" in ln)
        ready_uptime = float(parse_state(line)["uptime"])
        time.sleep(1)  # let the workload write its first counter
        dom.suspend()
    finally:
        conn.close()
    worker.join(240)
    assert not worker.is_alive(), "image.build did not return after the pause"
    if "error" in outcome:
        raise outcome["error"]
    yield Built(outcome["result"], progress, ready_uptime, time.monotonic() - t0)
    # The cloudlet is shared with other test modules: leave both nodes as we found them.
    for agent, n in zip(agents, nodes, strict=True):
        for inst in agent.call("instance.ls"):
            agent.call("instance.rm", {"instance": inst["uuid"]})
        for snap in agent.call("snapshot.ls"):
            agent.call("snapshot.rm", {"path": snap["content_id"]})
        for img in agent.call("image.ls"):
            agent.call("image.rm", {"id": img["content_id"], "force": True})
        for leftover in ("inbox", "tiny.zip", "web.zip", "bad.zip"):
            path = n.host_root / leftover
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@dataclass
class Exported:
    result: dict[str, Any]
    local: Path
    get_seconds: float


@pytest.fixture(scope="module")
def exported(
    built: Built, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent], tmp_path_factory: Any
) -> Exported:
    """The image exported on edge-a and fetched to the host over SSH (once: the link is 20 Mbit/s)."""
    a, aa = nodes[0], agents[0]
    exp = aa.call("image.export", {"id": built.image["id"], "dest": f"{a.root}/inbox/tiny.zip"})
    local = tmp_path_factory.mktemp("export") / "tiny.zip"
    t0 = time.monotonic()
    aa.transport.get_file(exp["file"], local)
    return Exported(exp, local, time.monotonic() - t0)


@dataclass
class Snap:
    result: dict[str, Any]
    counter_at_pause: int


@pytest.fixture(scope="module")
def snapshot_a(built: Built, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent]) -> Snap:
    """A snapshot built on edge-a: the image is resumed, runs a few seconds, and the test pauses it."""
    node, agent = nodes[0], agents[0]
    progress: list[str] = []
    outcome: dict[str, Any] = {}

    def build() -> None:
        try:
            outcome["result"] = agent.call(
                "snapshot.build",
                {"image": built.image["id"], "dest": "web", "timeout": 240},
                progress=progress.append,
            )
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=build, daemon=True)
    worker.start()
    conn = libvirt.open(node.libvirt_uri)
    try:

        def snap_domain() -> Any:
            if "error" in outcome:
                raise outcome["error"]
            for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                if d.name().startswith("nephele-snap-"):
                    return d
            return None

        dom = wait_for(snap_domain, 120, "the snapshot VM")
        time.sleep(4)  # the workload keeps counting: the snapshot differs from the image
        dom.suspend()
    finally:
        conn.close()
    worker.join(240)
    assert not worker.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    assert any("pause it when finished modifying" in line for line in progress)
    return Snap(outcome["result"], 0)


def instances_on(agent: Agent) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = agent.call("instance.ls")
    return result


# --------------------------------------------------------------------------------------------- tests


def test_image_build_through_a_scripted_pause(built: Built, agents: tuple[Agent, Agent]) -> None:
    img = built.image
    assert img["name"] == "tiny" and len(img["id"]) == 12 and img["created_new"]
    assert img["memory_bytes"] > 1 << 20 and img["disk_bytes"] == 64 << 20
    assert any("pause it when ready" in line for line in built.progress)
    assert any("VM entered paused state" in line for line in built.progress)
    listed = agents[0].call("image.ls")
    assert [i["content_id"] for i in listed] == [img["content_id"]]
    assert agents[1].call("image.ls") == []
    print(f"\nimage build: {built.seconds:.1f} s until stored, node timings {img['seconds']}")


def test_observe_both_nodes_over_ssh(
    built: Built, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent]
) -> None:
    out = fan_out({n.name: a.transport for n, a in zip(nodes, agents, strict=True)}, "observe", timeout=60)
    a, b = nodes[0].name, nodes[1].name
    assert out[a]["reachable"] is True
    assert out[a]["images"]["tiny"]["content_id"] == built.image["content_id"]
    assert out[b]["images"] == {}
    from nephele.model import Observed

    obs = Observed.from_dict({"nodes": out})
    assert obs.nodes[a].images["tiny"].disk_bytes == 64 << 20


def test_run_forward_http_ps_conflicts_rm(
    built: Built, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent]
) -> None:
    node, agent = nodes[0], agents[0]
    t0 = time.monotonic()
    r = agent.call("instance.run", {"snapshot": built.image["id"], "title": "web", "ports": "18080:80"})
    run_s = time.monotonic() - t0
    try:
        assert r["title"] == "web" and r["ports"] == ["18080:80"] and r["state"] == "running"
        assert r["pid"] and r["pid"] > 0
        # Over the network, from the host to the node's address: the guest answers at once, and its
        # uptime continues from the pause (a cold boot would start near 0 and need 6+ s).
        t1 = time.monotonic()
        body = wait_for(
            lambda: _try_http(f"http://{node.address}:18080/cgi-bin/state"), 30, "HTTP via hostfwd"
        )
        first_answer_s = time.monotonic() - t1
        state = parse_state(body)
        assert float(state["uptime"]) >= built.ready_uptime
        assert int(state["counter"]) >= 1
        print(f"\nrun: {run_s:.2f} s, first HTTP answer {first_answer_s:.2f} s later: {body.strip()}")

        ps = instances_on(agent)
        assert [(i["title"], i["uuid"], i["ports"]) for i in ps] == [("web", r["uuid"], ["18080:80"])]

        with pytest.raises(RemoteError) as ei:
            agent.call("instance.run", {"snapshot": "tiny", "title": "web2", "ports": "18080:80"})
        assert ei.value.kind == "conflict" and "18080 is already forwarded to instance 'web'" in str(ei.value)
        assert len(instances_on(agent)) == 1
        assert list((node.host_root / "instances").iterdir()) == [node.host_root / "instances" / r["uuid"]]

        paused = agent.call("instance.pause", {"instance": "web"})
        assert paused["state"] == "paused"
        resumed = agent.call("instance.resume", {"instance": r["uuid"]})
        assert resumed["state"] == "running"
        assert _try_http(f"http://{node.address}:18080/cgi-bin/state", retries=20)

        obs = agent.call("observe")
        assert obs["instances"]["web"]["uuid"] == r["uuid"]
        assert obs["instances"]["web"]["ports"] == ["18080:80"]

        # Forwards change live (QEMU hostfwd) and in the definition; the old port closes.
        moved = agent.call("instance.set_ports", {"instance": r["uuid"], "ports": ["18070:80"]})
        assert moved["ports"] == ["18070:80"]
        assert _try_http(f"http://{node.address}:18070/cgi-bin/state", retries=20)
        assert _try_http(f"http://{node.address}:18080/cgi-bin/state") is None
        xml = node.run(
            ["virsh", "-c", "qemu:///system", "dumpxml", "--inactive", r["name"]], check=True
        ).stdout
        assert "hostfwd=tcp::18070-:80" in xml and "18080" not in xml
    finally:
        removed = agent.call("instance.rm", {"instance": r["uuid"]})
    assert removed["state"] == "removed"
    assert instances_on(agent) == []
    assert not (node.host_root / "instances" / r["uuid"]).exists()
    conn = libvirt.open(node.libvirt_uri)
    try:
        assert [d.name() for d in conn.listAllDomains(0)] == []
    finally:
        conn.close()


def _try_http(url: str, retries: int = 1) -> str | None:
    for _ in range(retries):
        try:
            return http_get(url, timeout=3)
        except OSError:
            time.sleep(0.5)
    return None


def test_port_in_use_by_another_program_is_refused(built: Built, nodes: tuple[CloudletNode, ...]) -> None:
    node = nodes[0]
    holder = node.popen([sys.executable, "-c", _LISTEN, "18090"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "listening"
        agent = Agent(transport(node))
        with pytest.raises(RemoteError) as ei:
            agent.call("instance.run", {"snapshot": "tiny", "title": "x", "ports": ["18090:80"]})
        assert ei.value.kind == "conflict" and "18090 is in use on this node" in str(ei.value)
        assert agent.call("instance.ls") == []
        agent.close()
    finally:
        holder.kill()
        holder.wait()


_LISTEN = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
    "print('listening', flush=True); time.sleep(60)\n"
)


def test_export_on_a_import_on_b_over_ssh_then_run_on_b(
    built: Built, exported: Exported, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent]
) -> None:
    (a, b), (_aa, ab) = nodes, agents
    exp = exported.result
    assert exp["file"] == f"{a.root}/inbox/tiny.zip" and exported.local.stat().st_size == exp["file_bytes"]
    t0 = time.monotonic()
    ab.transport.put_file(exported.local, f"{b.root}/tiny.zip")
    put_s = time.monotonic() - t0
    imp = ab.call("image.import", {"path": f"{b.root}/tiny.zip"})
    assert imp["content_id"] == built.image["content_id"] and imp["created_new"]
    assert [i["content_id"] for i in ab.call("image.ls")] == [built.image["content_id"]]
    mib = exp["file_bytes"] / 2**20
    print(f"\nexport {mib:.1f} MiB: A->host {exported.get_seconds:.1f} s, host->B {put_s:.1f} s (20 Mbit/s)")

    r = ab.call("instance.run", {"snapshot": "tiny", "title": "web-b", "ports": "18081:80"})
    try:
        body = wait_for(lambda: _try_http(f"http://{b.address}:18081/cgi-bin/state"), 30, "HTTP on node B")
        assert float(parse_state(body)["uptime"]) >= built.ready_uptime
        with pytest.raises(RemoteError) as ei:
            ab.call("image.rm", {"id": imp["id"]})
        assert ei.value.kind == "conflict" and "in use by instances web-b" in str(ei.value)
    finally:
        ab.call("instance.rm", {"instance": r["uuid"]})
    ab.call("image.rm", {"id": imp["id"]})
    assert ab.call("image.ls") == []


def test_bad_input_is_a_clear_error_and_changes_nothing(
    built: Built, exported: Exported, nodes: tuple[CloudletNode, CloudletNode], agents: tuple[Agent, Agent]
) -> None:
    (_a, b), (aa, ab) = nodes, agents
    before_a = aa.call("observe")
    tmp_b = b.host_root / "tmp"
    # The session cloudlet is shared: compare with what was there, not with an empty directory.
    tmp_before = set(tmp_b.iterdir()) if tmp_b.is_dir() else set()
    cases: list[tuple[Agent, str, dict[str, Any], str, str]] = [
        (aa, "image.build", {"path": "/nonexistent/disk.raw"}, "invalid_input", "no such file"),
        (
            aa,
            "image.export",
            {"id": "0123456789ab", "dest": "/tmp/x.zip"},
            "not_found",
            "no image '0123456789ab'",
        ),
        (aa, "image.rm", {"id": "0123456789ab"}, "not_found", "no image"),
        (aa, "instance.run", {"snapshot": "nope", "title": "t"}, "not_found", "no image 'nope'"),
        (
            aa,
            "instance.run",
            {"snapshot": "tiny", "title": "t", "ports": "http"},
            "invalid_input",
            "expected PORT",
        ),
        (aa, "instance.stop", {"instance": "ghost"}, "not_found", "no instance 'ghost'"),
        (ab, "image.import", {"path": "/nonexistent.zip"}, "invalid_input", "no such file"),
    ]
    for agent, op, args, kind, text in cases:
        with pytest.raises(RemoteError) as ei:
            agent.call(op, args)
        assert (ei.value.kind, text in str(ei.value)) == (kind, True), (op, str(ei.value))

    # A corrupt export (one flipped byte in the memory state) is refused on B, which stays empty. It is
    # written into B's root from the host: this is about the check, not the transfer.
    bad = b.host_root / "bad.zip"
    with (
        zipfile.ZipFile(exported.local) as zin,
        zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zout,
    ):
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == "memory.save":
                data = data[:4096] + bytes([data[4096] ^ 1]) + data[4097:]
            zout.writestr(item.filename, data)
    with pytest.raises(RemoteError) as ei:
        ab.call("image.import", {"path": f"{b.root}/bad.zip"})
    assert ei.value.kind == "invalid_input" and "memory.save is corrupt" in str(ei.value)
    assert ab.call("image.ls") == []
    assert list((b.host_root / "images").iterdir()) == []
    assert set(tmp_b.iterdir()) == tmp_before
    bad.unlink()
    assert aa.call("observe") == before_a


def test_snapshot_build_run_export_import(
    built: Built,
    snapshot_a: Snap,
    nodes: tuple[CloudletNode, CloudletNode],
    agents: tuple[Agent, Agent],
    exported: Exported,
) -> None:
    (a, b), (aa, ab) = nodes, agents
    snap = snapshot_a.result
    assert snap["name"] == "web" and snap["image"] == built.image["content_id"]
    # A flat delta against the image: far smaller than the memory state it rebuilds.
    assert 0 < snap["delta_bytes"] < built.image["memory_bytes"] // 4
    assert [s["name"] for s in aa.call("snapshot.ls")] == ["web"]
    obs = aa.call("observe")
    assert obs["snapshots"]["web"] == {
        "image": "tiny", "content_id": snap["content_id"], "delta_bytes": snap["delta_bytes"],
    }  # fmt: skip
    with pytest.raises(RemoteError) as ei:
        aa.call("image.rm", {"id": built.image["id"]})
    assert ei.value.kind == "conflict" and "web" in str(ei.value) and "-f" in str(ei.value)

    r = aa.call("instance.run", {"snapshot": "web", "title": "from-snap", "ports": "18084:80"})
    try:
        body = wait_for(
            lambda: _try_http(f"http://{a.address}:18084/cgi-bin/state"), 30, "HTTP from snapshot"
        )
        # It resumes where the snapshot was paused: later than the image's capture point.
        assert float(parse_state(body)["uptime"]) >= built.ready_uptime + 3
        assert aa.call("instance.ls")[0]["snapshot"] == "web"
        # Pausing it as a user would (through libvirt) writes web_1: a flat delta against the same
        # image; the VM stays paused where it was. nephele's own pause captures nothing.
        conn = libvirt.open(a.libvirt_uri)
        try:
            conn.lookupByUUIDString(r["uuid"]).suspend()
        finally:
            conn.close()

        def snapshot_names() -> list[str] | None:
            names = [s["name"] for s in aa.call("snapshot.ls")]
            return names if "web_1" in names else None

        names = wait_for(snapshot_names, 90, "snapshot web_1 after a user pause")
        assert names == ["web", "web_1"]
        web1 = aa.call("snapshot.ls")[1]
        assert (
            web1["image"] == built.image["content_id"]
            and web1["delta_bytes"] < built.image["memory_bytes"] // 4
        )
        assert aa.call("instance.ls")[0]["state"] == "paused"
        aa.call("instance.resume", {"instance": r["uuid"]})
        after = parse_state(
            wait_for(lambda: _try_http(f"http://{a.address}:18084/cgi-bin/state"), 30, "HTTP")
        )
        assert int(after["counter"]) >= int(parse_state(body)["counter"])
        aa.call("instance.pause", {"instance": r["uuid"]})
        time.sleep(3)
        assert [s["name"] for s in aa.call("snapshot.ls")] == ["web", "web_1"]
    finally:
        aa.call("instance.rm", {"instance": r["uuid"]})
    supervisors = a.run(["pgrep", "-f", f"agent supervise {r['uuid']}"]).stdout.split()
    assert wait_for(
        lambda: not a.run(["pgrep", "-f", f"agent supervise {r['uuid']}"]).stdout.strip(),
        30,
        f"the supervisor to exit (was {supervisors})",
    )
    aa.call("snapshot.rm", {"path": "web_1"})

    # To node B: the image first (the snapshot is a delta against it), then the small snapshot zip.
    exp = aa.call("snapshot.export", {"name": "web", "dest": f"{a.root}/inbox/web.zip"})
    shutil.copyfile(exported.local, b.host_root / "tiny.zip")  # the SSH copy is tested above
    with pytest.raises(RemoteError) as ei:
        zip_on_b = f"{b.root}/web.zip"
        (b.host_root / "web.zip").write_bytes(on_host(a, exp["file"]).read_bytes())
        ab.call("snapshot.import", {"path": zip_on_b})
    assert ei.value.kind == "not_found" and "import the image first" in str(ei.value)
    ab.call("image.import", {"path": f"{b.root}/tiny.zip"})
    imp = ab.call("snapshot.import", {"path": zip_on_b})
    assert imp["content_id"] == snap["content_id"]
    rb = ab.call("instance.run", {"snapshot": "web", "title": "snap-on-b", "ports": "18085:80"})
    try:
        body = wait_for(
            lambda: _try_http(f"http://{b.address}:18085/cgi-bin/state"), 30, "HTTP from snapshot on B"
        )
        assert float(parse_state(body)["uptime"]) >= built.ready_uptime + 3
    finally:
        ab.call("instance.rm", {"instance": rb["uuid"]})
    ab.call("snapshot.rm", {"path": "web"})
    ab.call("image.rm", {"id": built.image["id"]})
    assert ab.call("snapshot.ls") == [] and ab.call("image.ls") == []


def test_nephele_client_over_ssh_with_cloudlet_inventory(
    built: Built, cloudlet: Cloudlet, nodes: tuple[CloudletNode, CloudletNode]
) -> None:
    a = nodes[0]

    def client(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "nephele.cli.client", "--cloudlet", cloudlet.name, a.name, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    images = client("images")
    assert images.returncode == 0, images.stderr
    header, row = images.stdout.splitlines()
    assert header.split() == ["IMAGE", "ID", "NAME", "SOURCE"]
    assert row.split()[:2] == [built.image["id"], "tiny"]

    run = client("run", "-p", "18082:80", "tiny", "cli-web")
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:4] == [f"HOST\t\t{a.name}", "TITLE\t\tcli-web", "SNAPSHOT\ttiny", "FWDPORTS\t18082:80"]
    try:
        ps = client("ps")
        assert ps.returncode == 0
        head, *rows = ps.stdout.splitlines()
        assert head.split() == ["PID", "TITLE", "PORTS", "UUID", "STATE", "STARTED", "HANDOFFURL"]
        assert len(rows) == 1 and rows[0].split()[1:3] == ["cli-web", "18082:80"]
        again = client("run", "-p", "18082:80", "tiny", "cli-web")
        assert again.returncode == 1
        assert again.stderr.strip() == (
            f"error: node {a.name}: host port 18082 is already forwarded to instance 'cli-web' "
            f"({rows[0].split()[3]})"
        )
        second = client("run", "-p", "18083:80", "tiny", "cli-web")
        assert second.returncode == 0
        ambiguous = client("stop", "cli-web")
        assert (
            ambiguous.returncode == 1
            and "is ambiguous" in ambiguous.stderr
            and "give the UUID" in ambiguous.stderr
        )
    finally:
        for line in client("ps").stdout.splitlines()[1:]:
            client("rm", line.split()[3])
    assert client("ps").stdout.splitlines()[1:] == []
    log = client("logs")
    assert log.returncode == 0 and "rm cli-web" in log.stdout


def test_unreachable_node_is_temporary_error(nodes: tuple[CloudletNode, CloudletNode]) -> None:
    t = SSHTransport(nodes[0].address, port=2, key=nodes[0].ssh_key, connect_timeout=3)
    with pytest.raises(NodeUnreachable) as ei:
        Agent(t).call("ping")
    assert ei.value.temporary and "cannot reach" in str(ei.value)


def test_domain_tags_visible_to_virsh(built: Built, nodes: tuple[CloudletNode, CloudletNode]) -> None:
    """A nephele VM is an ordinary libvirt domain: virsh on the node lists it with its title."""
    node = nodes[0]
    agent = Agent(transport(node))
    r = agent.call("instance.run", {"snapshot": "tiny", "title": "virsh-visible"})
    try:
        out = node.run(["virsh", "-c", "qemu:///system", "list", "--title"], check=True).stdout
        assert r["name"] in out and "virsh-visible" in out
        xml = node.run(["virsh", "-c", "qemu:///system", "dumpxml", r["name"]], check=True).stdout
        tags = dx.read_tags(xml)
        assert tags is not None and tags["role"] == "instance" and tags["title"] == "virsh-visible"
    finally:
        agent.call("instance.rm", {"instance": r["uuid"]})
        agent.close()
