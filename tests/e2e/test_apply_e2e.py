"""`nephele apply` / `status` end to end on a real 2-node cloudlet: libvirtd, QEMU (TCG) and sshd per node,
the controller in this process reaching the nodes' agents over SSH.

The module builds its own base image and snapshot on a private cloudlet (scripted pauses, as a user
would pause in virt-manager), exports them to the host as the manifest's source files, clears the node,
then drives the manifest through its life: apply from scratch, re-apply (no-op), a port change, stop,
start, a second instance, prune off / on, a node whose sshd is stopped, an apply killed mid-run and
resumed (stale lock named, broken with force-unlock), a stale saved plan refused, a placement change
handed off live (the guest's counter goes on), a bad manifest refused before any node is touched,
status. At most two VMs run at once. Tests run in file order and share one cloudlet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import build_demo_artifacts, scripted_pause

from nephele.agent import Agent
from nephele.agent.nodes import transport_for_node
from nephele.cli.main import main
from nephele.cloudlet import Cloudlet, reap_orphans
from nephele.cloudlet.guest import GuestFiles, cmdline

pytestmark = pytest.mark.integration

WORKDIR = Path(tempfile.gettempdir()) / "nephele-test-cloudlets"


@dataclass
class World:
    cloudlet: Cloudlet
    dir: Path
    agents: dict[str, Agent] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        return self.dir / "cloudlet.yaml"

    @property
    def state(self) -> Path:
        return self.dir / ".nephele" / "e2e"

    def write(self, instances: str, prune: bool = False, images: str = "") -> None:
        self.manifest.write_text(
            "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: e2e}\n"
            + self.cloudlet.manifest_nodes()
            + "images:\n  tiny: {source: tiny.zip}\n"
            + images
            + "snapshots:\n  web: {image: tiny, source: web.zip}\n"
            + "instances:\n"
            + (instances or "  {}\n")
            + f"policy: {{prune: {'true' if prune else 'false'}}}\n"
        )

    def address(self, node: str) -> str:
        return self.cloudlet.node(node).address

    def instances(self, node: str) -> dict[str, dict[str, Any]]:
        result: dict[str, dict[str, Any]] = self.agents[node].call("observe")["instances"]
        return result


def wait_for(pred: Any, timeout: float, what: str, step: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


def counter(body: str) -> int:
    return int(dict(kv.split("=", 1) for kv in body.split() if "=" in kv)["counter"])


def nephele(capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def w(guest: GuestFiles, tmp_path_factory: Any) -> Iterator[World]:
    reap_orphans(WORKDIR)
    # A private cloudlet on a fast link: the source files cross host -> node, and the tests are about
    # the reconciler, not the WAN.
    c = Cloudlet.up(
        f"ea{os.getpid() % 100000}", 2, rate_mbit=1000, delay_ms=0, workdir=WORKDIR, owner_pid=os.getpid()
    )
    world = World(c, tmp_path_factory.mktemp("e2e"))
    try:
        for spec in c.node_specs():
            world.agents[spec.name] = Agent(transport_for_node(spec, timeout=600))
        a = c.nodes[0]
        build_demo_artifacts(a, world.agents[a.name], guest, world.dir)
        yield world
    finally:
        for ag in world.agents.values():
            ag.close()
        c.down()


def running_copies(w: World, title: str) -> list[tuple[str, dict[str, Any]]]:
    return [(n, i) for n in w.agents for t, i in w.instances(n).items() if t == title]


# ------------------------------------------------------------------------------------------- tests


def test_apply_from_scratch_serves_http(w: World, capsys: Any) -> None:
    w.write('  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n')
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert "Plan: 1 to start, 0 to change, 0 to hand off, 0 to stop, 0 to prune, 3 to import." in out
    assert "Apply complete: 1 started, 0 changed, 0 handed off, 0 stopped, 0 pruned, 3 imported." in out
    [(node, inst)] = running_copies(w, "web-1")
    assert node == "edge-a" and inst["state"] == "running" and inst["manifest"] == "e2e"
    body = wait_for(lambda: http(f"http://{w.address('edge-a')}:8080/cgi-bin/state"), 60, "HTTP on edge-a")
    assert counter(body) >= 1
    inv = json.loads((w.state / "inventory.json").read_text())["entries"]
    assert {"kind": "instance", "name": "web-1", "node": "edge-a"} in inv


def test_reapply_is_a_noop(w: World, capsys: Any) -> None:
    code, out, _ = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0 and "No changes. The cloudlet matches the manifest." in out
    code, out, _ = nephele(capsys, "status", "-f", str(w.manifest), "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["ready"] is True
    assert doc["instances"][0]["condition"] == "Ready" and doc["instances"][0]["actual"]["node"] == "edge-a"
    assert doc["last_applied"]["revision"] == doc["revision"]["text"]


def test_port_change(w: World, capsys: Any) -> None:
    w.write('  web-1: {snapshot: web, node: edge-a, ports: ["8081:80"]}\n')
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert "~ instance/web-1  ports 8080:80 → 8081:80 on edge-a" in out and "1 changed" in out
    assert wait_for(lambda: http(f"http://{w.address('edge-a')}:8081/cgi-bin/state"), 30, "HTTP on 8081")
    assert http(f"http://{w.address('edge-a')}:8080/cgi-bin/state") is None
    assert w.instances("edge-a")["web-1"]["ports"] == ["8081:80"]
    w.write('  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n')
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert wait_for(lambda: http(f"http://{w.address('edge-a')}:8080/cgi-bin/state"), 30, "HTTP on 8080")


def test_stop_then_start(w: World, capsys: Any) -> None:
    w.write('  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"], state: stopped}\n')
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert "Apply complete: 0 started, 0 changed, 0 handed off, 1 stopped" in out
    assert w.instances("edge-a")["web-1"]["state"] == "stopped"
    assert http(f"http://{w.address('edge-a')}:8080/cgi-bin/state") is None
    w.write('  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n')
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert "Apply complete: 1 started" in out
    assert wait_for(lambda: http(f"http://{w.address('edge-a')}:8080/cgi-bin/state"), 90, "HTTP after start")


def test_prune_off_keeps_then_unreachable_node_is_left_alone_then_prune_on(w: World, capsys: Any) -> None:
    both = (
        '  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n  web-2: {snapshot: web, node: edge-b}\n'
    )
    w.write(both)
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert [n for n, _ in running_copies(w, "web-2")] == ["edge-b"]
    only1 = '  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n'
    w.write(only1, prune=False)
    code, out, _ = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0 and "not pruned (policy.prune is off)" in out
    assert [n for n, _ in running_copies(w, "web-2")] == ["edge-b"]
    # prune on, but edge-b does not answer: nothing is pruned there, the rest goes on.
    w.write(only1, prune=True)
    w.cloudlet.stop_sshd("edge-b")
    try:
        code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve", "--timeout", "10")
        assert code == 0, out + err
        assert "node edge-b is unreachable since" in out and "nothing is pruned there" in out
        assert "No changes on the nodes that answered; 1 object is unknown" in out
        code, out, _ = nephele(capsys, "status", "-f", str(w.manifest), "--timeout", "10")
        assert "Unreachable nodes:" in out and "edge-b: since" in out
    finally:
        w.cloudlet.start_sshd("edge-b")
    assert [n for n, _ in running_copies(w, "web-2")] == ["edge-b"]
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    # web-2, and the copy of snapshot web that only web-2 needed on edge-b.
    assert "2 pruned" in out and "- snapshot/web    remove on edge-b" in out
    assert running_copies(w, "web-2") == []
    assert w.agents["edge-b"].call("observe")["snapshots"] == {}


def test_killed_apply_resumes_without_duplicates(w: World, capsys: Any) -> None:
    w.write(
        '  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n'
        "  web-2: {snapshot: web, node: edge-b}\n",
        prune=True,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "nephele", "apply", "-f", str(w.manifest), "--auto-approve"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    journal = w.state / "journal.jsonl"

    def started() -> bool:
        return journal.is_file() and '"action": "start_instance:instance/web-2"' in journal.read_text()

    try:
        wait_for(started, 120, "the apply to start web-2")
        time.sleep(0.5)  # the node is now restoring the VM
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # let the node's agent notice its SSH session died and finish or undo its work
    code, _, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 1 and "so the lock is stale" in err and "nephele force-unlock" in err
    lock_id = json.loads((w.state / "lock.json").read_text())["id"]
    assert nephele(capsys, "force-unlock", lock_id, "-f", str(w.manifest))[0] == 0
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert "The last apply was killed while running start_instance:instance/web-2" in out
    assert [n for n, _ in running_copies(w, "web-2")] == ["edge-b"]
    assert [n for n, _ in running_copies(w, "web-1")] == ["edge-a"]
    code, out, _ = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0 and "No changes." in out


def test_stale_saved_plan_is_refused(w: World, capsys: Any) -> None:
    w.write(
        '  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n'
        "  web-2: {snapshot: web, node: edge-b, state: stopped}\n",
        prune=True,
    )
    plan_file = w.dir / "stop.plan"
    code, out, _ = nephele(capsys, "plan", "-f", str(w.manifest), "-out", str(plan_file))
    assert code == 0 and "Plan: 0 to start, 0 to change, 0 to hand off, 1 to stop" in out
    w.agents["edge-b"].call("instance.pause", {"instance": "web-2"})  # the world moves on
    code, out, err = nephele(capsys, "apply", str(plan_file))
    assert code == 1 and "the saved plan no longer matches the nodes; nothing was done" in err
    assert "instance web-2 running on edge-b" in err and "it is paused now" in err
    assert w.instances("edge-b")["web-2"]["state"] == "paused"
    code, out, err = nephele(capsys, "plan", "-f", str(w.manifest), "-out", str(plan_file))
    code, out, err = nephele(capsys, "apply", str(plan_file))
    assert code == 0, out + err
    assert w.instances("edge-b")["web-2"]["state"] == "stopped"


def test_placement_change_is_a_live_handoff(w: World, capsys: Any) -> None:
    before = counter(
        wait_for(lambda: http(f"http://{w.address('edge-a')}:8080/cgi-bin/state"), 30, "HTTP on edge-a")
    )
    w.write(
        '  web-1: {snapshot: web, node: edge-b, ports: ["8080:80"]}\n'
        "  web-2: {snapshot: web, node: edge-b, state: stopped}\n",
        prune=True,
    )
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert "» instance/web-1  edge-a → edge-b" in out and "1 handed off" in out
    assert "web-1: edge-a → edge-b" in out and "initiated to tcp://" in out and "downtime" in out
    assert [n for n, _ in running_copies(w, "web-1")] == ["edge-b"]
    body = wait_for(lambda: http(f"http://{w.address('edge-b')}:8080/cgi-bin/state"), 30, "HTTP on edge-b")
    assert counter(body) >= before  # the guest's counter went on: the same VM, not a fresh boot
    code, out, _ = nephele(capsys, "status", "-f", str(w.manifest), "-o", "json")
    doc = json.loads(out)
    assert code == 0 and doc["ready"] is True
    assert {i["name"]: i["actual"]["node"] for i in doc["instances"]}["web-1"] == "edge-b"


def test_an_image_a_node_lacks_is_copied_as_a_delta(w: World, guest: GuestFiles, capsys: Any) -> None:
    """A second build of the guest (a sibling of tiny: same kernel and disk, memory from another boot)
    exists on edge-a only; the manifest wants it everywhere and gives no source file, so apply copies it
    edge-a -> edge-b, encoded against tiny, which edge-b holds. Compared with the whole export."""
    a = w.cloudlet.node("edge-a")
    inbox = a.host_root / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    desc = {
        "disk": str(guest.disk),
        "kernel": str(guest.kernel),
        "initrd": str(guest.initrd),
        "cmdline": cmdline(fill_mib=8, dirty_mib=1, disk_kib=4),
        "memory_kib": 131072,
        "name": "tiny-2",
    }
    (inbox / "tiny-2.json").write_text(json.dumps(desc))
    serial = a.host_root / "tmp"

    def booted(dom: Any) -> bool:
        return any(b"NEPHELE-READY" in p.read_bytes() for p in serial.glob("build-*/serial.log"))

    built = scripted_pause(
        a,
        "nephele-build-",
        lambda: w.agents["edge-a"].call(
            "image.build", {"path": f"{a.root}/inbox/tiny-2.json", "timeout": 300}
        ),
        booted,
    )
    whole = w.agents["edge-a"].call("image.export", {"id": built["id"], "dest": f"{a.root}/inbox/whole.zip"})
    instances = (
        '  web-1: {snapshot: web, node: edge-b, ports: ["8080:80"]}\n'
        "  web-2: {snapshot: web, node: edge-b, state: stopped}\n"
    )
    w.write(instances, prune=True, images="  tiny-2: {}\n")
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve", "-o", "json")
    assert code == 0, out + err
    [act] = [x for x in json.loads(out)["result"]["actions"] if x["id"] == "import_image:image/tiny-2@edge-b"]
    assert act["status"] == "done" and "delta, against 1 image it holds" in act["detail"], act
    print(f"import_image:image/tiny-2@edge-b: {act['detail']}")
    sent_mib = float(act["detail"].split(", ")[1].split(" MiB sent")[0])
    copied = w.agents["edge-b"].call("observe")["images"]["tiny-2"]
    assert copied["content_id"] == built["content_id"]  # every file byte for byte (sha256 per file)
    b = w.cloudlet.node("edge-b")  # web-1 runs there now: the snapshot is only there
    snap = w.agents["edge-b"].call("snapshot.export", {"name": "web", "dest": f"{b.root}/tmp/web-export.zip"})
    whole_mib = whole["file_bytes"] / 2**20
    files_mib = (built["disk_bytes"] + built["memory_bytes"]) / 2**20
    print(
        f"image copy edge-a -> edge-b: {sent_mib:.1f} MiB sent as a delta against tiny, whole export "
        f"{whole_mib:.1f} MiB, files {files_mib:.1f} MiB; snapshot web export (a delta against tiny "
        f"already) {snap['file_bytes'] / 2**20:.1f} MiB"
    )
    assert sent_mib * 2 < whole_mib, (sent_mib, whole_mib)
    # The copy's files (the export on edge-a, the upload on edge-b: nephele-export-*, nephele-part-*, or
    # nephele-image-* for whole copies) are gone from both nodes' tmp/.
    for n in ("edge-a", "edge-b"):
        assert not list((w.cloudlet.node(n).host_root / "tmp").glob("nephele-*")), n


def test_bad_manifest_touches_no_node(w: World, capsys: Any) -> None:
    before = {n: w.instances(n) for n in w.agents}
    w.manifest.write_text(w.manifest.read_text().replace("node: edge-b", "node: edge-z"))
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 1 and out == "" and "'edge-z' is not a declared node" in err
    assert {n: w.instances(n) for n in w.agents} == before


def test_everything_pruned_at_the_end(w: World, capsys: Any) -> None:
    w.write("", prune=True)
    code, out, err = nephele(capsys, "apply", "-f", str(w.manifest), "--auto-approve")
    assert code == 0, out + err
    assert all(w.instances(n) == {} for n in w.agents)
