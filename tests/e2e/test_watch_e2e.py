"""`nephele watch` end to end on a real 2-node cloudlet (libvirtd, QEMU under TCG, sshd per node), the
daemon running in a thread of this process and reaching the nodes over SSH, following a git checkout.

The module builds a base image and a snapshot on a private cloudlet (scripted pauses), exports them as
the manifest's source files, clears the node, then drives an infrastructure repo through its life:
first revision converges; an edit of the checkout's file converges; a commit pushed to the origin is
fetched, fast-forwarded, applied and recorded; a VM destroyed by hand through the node's libvirtd is
restored; a broken commit is reported with FILE:LINE:COL and the previous state kept; SIGTERM-style
stop. At most two VMs run at once. Tests run in file order and share one cloudlet and one daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from support import build_demo_artifacts

from nephele.agent import Agent
from nephele.agent.nodes import transport_for_node
from nephele.cli.main import main
from nephele.cloudlet import Cloudlet, reap_orphans
from nephele.cloudlet.guest import GuestFiles
from nephele.reconcile import events as eventlog
from nephele.reconcile.watch import Watcher, WatchOptions, read_state

pytestmark = pytest.mark.integration

WORKDIR = Path(tempfile.gettempdir()) / "nephele-test-cloudlets"
WEB1 = '  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n'


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-c", "user.name=ops", "-c", "user.email=ops@example.invalid", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


def wait_for(pred: Any, timeout: float, what: str, lines: list[str] | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    tail = "\n".join((lines or [])[-40:])
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tail}")


def http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return str(resp.read().decode())
    except OSError:
        return None


@dataclass
class World:
    cloudlet: Cloudlet
    dir: Path
    agents: dict[str, Agent] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    watcher: Watcher | None = None
    thread: threading.Thread | None = None

    @property
    def operator(self) -> Path:
        return self.dir / "operator"

    @property
    def checkout(self) -> Path:
        return self.dir / "checkout"

    @property
    def state(self) -> Path:
        return self.checkout / ".nephele" / "wt"

    def manifest(self, instances: str) -> str:
        return (
            "apiVersion: nephele.dev/v1\nkind: Cloudlet\nmetadata: {name: wt}\n"
            + self.cloudlet.manifest_nodes()
            + f"images:\n  tiny: {{source: {self.dir / 'tiny.zip'}}}\n"
            + f"snapshots:\n  web: {{image: tiny, source: {self.dir / 'web.zip'}}}\n"
            + "instances:\n"
            + instances
            + "policy: {prune: true}\n"
        )

    def commit(self, instances: str, message: str) -> str:
        (self.operator / "cloudlet.yaml").write_text(self.manifest(instances))
        git(self.operator, "commit", "-q", "-am", message)
        git(self.operator, "push", "-q")
        return git(self.operator, "rev-parse", "HEAD")

    def copies(self, title: str) -> list[tuple[str, dict[str, Any]]]:
        out = []
        for n, agent in self.agents.items():
            for t, inst in agent.call("observe")["instances"].items():
                if t == title:
                    out.append((n, inst))
        return out

    def address(self, node: str) -> str:
        return self.cloudlet.node(node).address

    def events(self) -> list[dict[str, Any]]:
        return eventlog.read(self.state / "events.jsonl")


@pytest.fixture(scope="module")
def w(guest: GuestFiles, tmp_path_factory: Any) -> Iterator[World]:
    reap_orphans(WORKDIR)
    c = Cloudlet.up(
        f"wt{os.getpid() % 100000}", 2, rate_mbit=1000, delay_ms=0, workdir=WORKDIR, owner_pid=os.getpid()
    )
    world = World(c, tmp_path_factory.mktemp("watch-e2e"))
    try:
        for spec in c.node_specs():
            world.agents[spec.name] = Agent(transport_for_node(spec, timeout=600))
        a = c.nodes[0]
        build_demo_artifacts(a, world.agents[a.name], guest, world.dir)
        # The infrastructure repo: a bare origin, an operator's clone, the daemon's checkout.
        bare = world.dir / "infra.git"
        git(world.dir, "init", "-q", "--bare", "-b", "main", str(bare))
        world.operator.mkdir()
        git(world.operator, "init", "-q", "-b", "main")
        (world.operator / ".gitignore").write_text(".nephele/\n")
        (world.operator / "cloudlet.yaml").write_text(
            world.manifest('  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n')
        )
        git(world.operator, "add", ".")
        git(world.operator, "commit", "-q", "-m", "web-1 on edge-a")
        git(world.operator, "remote", "add", "origin", f"file://{bare}")
        git(world.operator, "push", "-q", "-u", "origin", "main")
        git(world.dir, "clone", "-q", f"file://{bare}", str(world.checkout))
        yield world
    finally:
        if world.watcher is not None and world.thread is not None:
            world.watcher.stopping.set()
            world.watcher.wake.set()
            world.thread.join(300)
        for ag in world.agents.values():
            ag.close()
        c.down()


# ------------------------------------------------------------------------------------------- tests


def test_first_revision_converges(w: World) -> None:
    opts = WatchOptions(
        manifest=w.checkout / "cloudlet.yaml",
        git_poll=1.0,
        resync=5.0,
        debounce=0.3,
        timeout=20,
        backoff_cap=10.0,
    )
    w.watcher = Watcher(opts, say=w.lines.append)
    w.thread = threading.Thread(target=w.watcher.serve, daemon=True)
    w.thread.start()
    wait_for(lambda: [n for n, _ in w.copies("web-1")] == ["edge-a"], 300, "web-1 on edge-a", w.lines)
    assert wait_for(lambda: http(f"http://{w.address('edge-a')}:8080/cgi-bin/state"), 90, "HTTP", w.lines)
    head = git(w.checkout, "rev-parse", "HEAD")
    status = w.state / "status.json"
    wait_for(lambda: status.is_file() and json.loads(status.read_text()).get("last_applied"), 30, "record")
    assert json.loads(status.read_text())["last_applied"]["git_commit"] == head
    starts = [
        e for e in w.events() if e["event"] == "action" and e["action"] == "start_instance:instance/web-1"
    ]
    assert [e["result"] for e in starts] == ["start", "done"] and starts[1]["node"] == "edge-a"


def test_editing_the_file_converges(w: World) -> None:
    path = w.checkout / "cloudlet.yaml"
    path.write_text(path.read_text().replace('ports: ["8080:80"]}', 'ports: ["8080:80"], state: paused}'))
    wait_for(lambda: [i["state"] for _, i in w.copies("web-1")] == ["paused"], 120, "web-1 paused", w.lines)
    git(w.checkout, "checkout", "--", "cloudlet.yaml")  # back to the committed revision
    wait_for(lambda: [i["state"] for _, i in w.copies("web-1")] == ["running"], 120, "web-1 resumed", w.lines)
    assert wait_for(lambda: http(f"http://{w.address('edge-a')}:8080/cgi-bin/state"), 60, "HTTP again")
    revisions = [e["revision"] for e in w.events() if e["event"] == "revision" and e["result"] == "valid"]
    assert any(r.endswith("(uncommitted changes)") for r in revisions)


def test_a_pushed_commit_converges_and_is_recorded(w: World, capsys: Any) -> None:
    commit = w.commit(
        WEB1 + "  web-2: {snapshot: web, node: edge-b}\n",
        "web-2 on edge-b",
    )
    wait_for(lambda: [n for n, _ in w.copies("web-2")] == ["edge-b"], 300, "web-2 on edge-b", w.lines)
    status = w.state / "status.json"
    wait_for(
        lambda: (json.loads(status.read_text()).get("last_applied") or {}).get("git_commit") == commit,
        60,
        "the commit recorded",
        w.lines,
    )
    assert git(w.checkout, "rev-parse", "HEAD") == commit
    assert any(e["event"] == "git" and e["result"] == "fast_forward" for e in w.events())
    state = read_state(w.state)
    assert state is not None and state["alive"] and state["revision_applied"]["git_commit"] == commit
    code = main(["status", "-f", str(w.checkout / "cloudlet.yaml")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"main@sha1:{commit[:12]}" in out and "Watch daemon: running" in out, out


def test_a_vm_destroyed_by_hand_is_restored(w: World) -> None:
    [(node, inst)] = w.copies("web-2")
    conn = libvirt.open(w.cloudlet.node(node).libvirt_uri)
    try:
        conn.lookupByUUIDString(inst["uuid"]).destroy()
    finally:
        conn.close()
    wait_for(lambda: [i["state"] for _, i in w.copies("web-2")] != ["running"], 30, "the node to see it")
    wait_for(
        lambda: [i["state"] for _, i in w.copies("web-2")] == ["running"], 300, "web-2 restored", w.lines
    )
    drift = [e for e in w.events() if e["event"] == "drift" and e["instance"] == "web-2"]
    assert drift and drift[-1]["result"] == "correcting"


def test_a_dark_node_does_not_hold_up_the_others(w: World) -> None:
    def node_event(result: str) -> bool:
        return any(
            e["event"] == "node" and e["node"] == "edge-b" and e["result"] == result for e in w.events()
        )

    w.cloudlet.stop_sshd("edge-b")
    try:
        wait_for(lambda: node_event("unreachable"), 60, "edge-b reported unreachable", w.lines)
        uuid = w.agents["edge-a"].call("observe")["instances"]["web-1"]["uuid"]
        conn = libvirt.open(w.cloudlet.node("edge-a").libvirt_uri)
        try:
            conn.lookupByUUIDString(uuid).destroy()
        finally:
            conn.close()

        def web1() -> str:
            return str(w.agents["edge-a"].call("observe")["instances"]["web-1"]["state"])

        wait_for(lambda: web1() != "running", 30, "edge-a to see web-1 down")
        t0 = time.monotonic()
        wait_for(lambda: web1() == "running", 300, "web-1 restored while edge-b is dark", w.lines)
        restored_in = time.monotonic() - t0
        state = read_state(w.state)
        assert state is not None and "edge-b" in state["unreachable"], state
        assert not node_event("reachable")
    finally:
        w.cloudlet.start_sshd("edge-b")
        old = w.agents["edge-b"]
        old.close()
        spec = next(s for s in w.cloudlet.node_specs() if s.name == "edge-b")
        w.agents["edge-b"] = Agent(transport_for_node(spec, timeout=600))
    wait_for(lambda: node_event("reachable"), 60, "edge-b probed back", w.lines)
    assert [(n, i["state"]) for n, i in w.copies("web-2")] == [("edge-b", "running")]
    print(f"web-1 restored in {restored_in:.1f} s with edge-b dark")


def test_a_broken_commit_is_reported_and_the_previous_state_kept(w: World) -> None:
    good = git(w.checkout, "rev-parse", "HEAD")
    before = {t: [(n, i["uuid"], i["state"]) for n, i in w.copies(t)] for t in ("web-1", "web-2")}
    broken = w.commit(
        WEB1 + "  web-2: {snapshot: web, node: edge-q}\n",
        "typo",
    )

    def reported() -> list[dict[str, Any]]:
        return [e for e in w.events() if e["event"] == "revision" and e["result"] == "invalid"]

    [bad] = wait_for(reported, 60, "the broken revision reported", w.lines)
    assert broken[:12] in bad["revision"]
    problem = bad["problems"][0]
    assert (
        problem.startswith(f"{w.checkout / 'cloudlet.yaml'}:")
        and "'edge-q' is not a declared node" in problem
    )
    time.sleep(12)  # two resyncs: the nodes keep the last good revision
    after = {t: [(n, i["uuid"], i["state"]) for n, i in w.copies(t)] for t in ("web-1", "web-2")}
    assert after == before
    status = json.loads((w.state / "status.json").read_text())
    assert status["last_applied"]["git_commit"] == good
    state = read_state(w.state)
    assert state is not None and state["alive"] and state["invalid_revision"]["problems"] == bad["problems"]


def test_stop_is_clean(w: World) -> None:
    assert w.watcher is not None and w.thread is not None
    w.watcher.stopping.set()
    w.watcher.wake.set()
    w.thread.join(300)
    assert not w.thread.is_alive()
    state = read_state(w.state)
    assert state is not None and state["state"] == "stopped" and not (w.state / "lock.json").exists()
    w.watcher = None


def test_the_cli_daemon_follows_a_fix_and_stops_cleanly_on_sigterm(w: World) -> None:
    """`nephele watch` as its own process: started on the broken checkout it enforces the last good
    revision, takes the fixing commit, and SIGTERM during the resulting action lets it finish."""
    w.commit(WEB1 + "  web-2: {snapshot: web, node: edge-b, state: stopped}\n", "fix: web-2 stopped")
    seen = len(w.events())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nephele",
            "watch",
            "-f",
            str(w.checkout),
            "--git-poll",
            "1s",
            "--resync",
            "1m",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def stop_started() -> bool:
            assert proc.poll() is None, proc.communicate()[0]
            return any(
                e["event"] == "action"
                and e["action"] == "stop_instance:instance/web-2"
                and e["result"] == "start"
                for e in w.events()[seen:]
            )

        wait_for(stop_started, 180, "the daemon to stop web-2")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Received SIGTERM" in out
    new = w.events()[seen:]
    assert any(e["event"] == "revision" and e["result"] == "invalid" for e in new)  # the broken HEAD
    assert any(
        e["event"] == "action" and e["action"] == "stop_instance:instance/web-2" and e["result"] == "done"
        for e in new
    )
    assert new[-1]["event"] == "daemon" and new[-1]["result"] == "stop"
    assert [(n, i["state"]) for n, i in w.copies("web-2")] == [("edge-b", "stopped")]
    assert not (w.state / "lock.json").exists()


# ------------------------------------------------------------------- a daemon stopped mid-handoff


@dataclass
class Daemon:
    """`nephele watch` as its own process, its output collected line by line as it comes."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, w: World) -> Daemon:
        argv = ["watch", "-f", str(w.checkout), "--git-poll", "1s", "--resync", "1m"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nephele", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        d = cls(proc)
        threading.Thread(target=d._pump, daemon=True).start()
        return d

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def alive(self) -> bool:
        assert self.proc.poll() is None, "\n".join(self.lines[-40:])
        return True

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()  # reaped: a zombie's pid would still look alive to the next daemon


def leftovers(w: World, node: str, uuid: str) -> list[str]:
    """What of instance `uuid` is on `node` according to its libvirtd and its state dir."""
    out = []
    conn = libvirt.open(w.cloudlet.node(node).libvirt_uri)
    try:
        for d in conn.listAllDomains(0):
            if d.UUIDString() == uuid:
                out.append(f"domain {d.name()} (state {d.state()[0]})")
    finally:
        conn.close()
    if (w.cloudlet.node(node).host_root / "instances" / uuid).exists():
        out.append(f"instance directory instances/{uuid}")
    return out


def state_of(body: str) -> dict[str, float]:
    return {k: float(v) for k, v in (kv.split("=", 1) for kv in body.split()) if k in ("counter", "uptime")}


def move_web1(w: World, src: str, dst: str, message: str) -> tuple[str, str, dict[str, float]]:
    """Commit web-1 on `dst` with `src`'s link at 10 Mbit/s (so the handoff lasts); returns the commit,
    web-1's uuid and its counter/uptime before."""
    [(node, inst)] = w.copies("web-1")
    assert node == src and inst["state"] == "running", (node, inst)
    body = wait_for(lambda: http(f"http://{w.address(src)}:8080/cgi-bin/state"), 60, f"HTTP on {src}")
    w.cloudlet.set_link(10, src)
    commit = w.commit(
        f'  web-1: {{snapshot: web, node: {dst}, ports: ["8080:80"]}}\n'
        "  web-2: {snapshot: web, node: edge-b, state: stopped}\n",
        message,
    )
    return commit, str(inst["uuid"]), state_of(body)


def handoff_running(w: World, d: Daemon, seen: int, src: str) -> bool:
    """The daemon's handoff of web-1 streams (a progress line) and the source shows its HANDOFFURL."""
    d.alive()
    started = any(
        e["event"] == "action" and e["action"] == "handoff:instance/web-1" and e["result"] == "start"
        for e in w.events()[seen:]
    )
    if not (started and any("over the wire" in line for line in d.lines)):
        return False
    inst = w.agents[src].call("observe")["instances"].get("web-1")
    return bool(inst and inst["handoff_url"])


def assert_moved(w: World, dst: str, src: str, uuid: str, before: dict[str, float]) -> None:
    """web-1 runs on dst only, as the same VM (uuid, uptime and counter went on), nothing left on src."""
    [(node, inst)] = w.copies("web-1")
    assert (node, inst["uuid"], inst["state"], inst["handoff_url"]) == (dst, uuid, "running", None)
    body = wait_for(lambda: http(f"http://{w.address(dst)}:8080/cgi-bin/state"), 60, f"HTTP on {dst}")
    after = state_of(body)
    assert after["uptime"] > before["uptime"] and after["counter"] >= before["counter"], (before, after)
    assert leftovers(w, src, uuid) == []


def test_sigterm_mid_handoff_lets_the_handoff_finish(w: World) -> None:
    """SIGTERM while the daemon hands web-1 off: the handoff completes, then the daemon exits 0."""
    commit, uuid, before = move_web1(w, "edge-a", "edge-b", "web-1 to edge-b")
    seen = len(w.events())
    d = Daemon.start(w)
    try:
        wait_for(lambda: handoff_running(w, d, seen, "edge-a"), 300, "the handoff to stream", d.lines)
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(600)
    finally:
        d.kill()
        w.cloudlet.set_link(1000, "edge-a")
    out = d.output()
    assert d.proc.returncode == 0, out
    assert "Received SIGTERM" in out
    new = w.events()[seen:]
    done = [
        e
        for e in new
        if e["event"] == "action" and e["action"] == "handoff:instance/web-1" and e["result"] == "done"
    ]
    assert done and done[0]["node"] == "edge-b", out
    assert new[-1]["event"] == "daemon" and new[-1]["result"] == "stop"
    assert not (w.state / "lock.json").exists()
    assert_moved(w, "edge-b", "edge-a", uuid, before)
    # What was queued behind the handoff (here: pruning the snapshot edge-a no longer needs) was not
    # started, so the revision is attempted but not recorded as applied.
    not_run = [e for e in new if e["event"] == "action" and e["result"] == "not_run"]
    assert all(e["message"] == "not started: the daemon is stopping" for e in not_run), not_run
    status = json.loads((w.state / "status.json").read_text())
    assert status["last_attempted"]["git_commit"] == commit
    assert (status["last_applied"]["git_commit"] == commit) == (not not_run), status
    print(
        f"SIGTERM mid-handoff: the handoff finished in {done[0]['duration']:.1f} s before the exit; "
        f"not started: {[e['action'] for e in not_run]}"
    )


def test_sigkill_mid_handoff_then_restart_converges(w: World) -> None:
    """SIGKILL while the daemon hands web-1 off (the nodes roll the handoff back or finish it on their
    own), then a new daemon: it reports the interrupted handoff, breaks the dead daemon's lock, and
    ends with web-1 on the desired node only, the same VM, nothing left on the other node."""
    commit, uuid, before = move_web1(w, "edge-b", "edge-a", "web-1 back to edge-a")
    seen = len(w.events())
    d = Daemon.start(w)
    try:
        wait_for(lambda: handoff_running(w, d, seen, "edge-b"), 300, "the handoff to stream", d.lines)
        d.kill()
        assert (w.state / "lock.json").exists()  # the dead daemon's lock is left behind
        w.cloudlet.set_link(1000, "edge-b")

        # The nodes on their own: no VM lost, none duplicated, the handoff mark gone once they settle.
        def settled() -> list[tuple[str, dict[str, Any]]] | None:
            found = w.copies("web-1")
            return found if all(not i["handoff_url"] for _, i in found) else None

        after_kill = wait_for(settled, 180, "the nodes to settle after the kill")
        print(f"after SIGKILL: web-1 on {[(n, i['state']) for n, i in after_kill]}")
        assert len(after_kill) == 1 and after_kill[0][1]["uuid"] == uuid, after_kill
        # The receiver notices the source's abort and cleans up (it gives libvirt up to 30 s to drop
        # the incoming domain first).
        t_kill = time.monotonic()
        other = "edge-a" if after_kill[0][0] == "edge-b" else "edge-b"
        wait_for(lambda: not leftovers(w, other, uuid), 90, f"the receiver on {other} to clean up")
        print(f"after SIGKILL: {other} clean {time.monotonic() - t_kill:.1f} s after the nodes settled")
        seen2 = len(w.events())
        d2 = Daemon.start(w)
        try:
            status = w.state / "status.json"
            wait_for(
                lambda: (
                    d2.alive()
                    and (json.loads(status.read_text()).get("last_applied") or {}).get("git_commit") == commit
                ),
                600,
                "the restarted daemon to converge",
                d2.lines,
            )
            d2.proc.send_signal(signal.SIGTERM)
            d2.proc.wait(300)
        finally:
            d2.kill()
    finally:
        d.kill()
        w.cloudlet.set_link(1000, "edge-b")
    assert d2.proc.returncode == 0, d2.output()
    new = w.events()[seen2:]
    assert any(
        e["event"] == "resume" and e["action"] == "handoff:instance/web-1" and e["result"] == "interrupted"
        for e in new
    ), d2.output()
    assert any(e["event"] == "daemon" and e["result"] == "lock_broken" for e in new), d2.output()
    assert "The last run was killed while running handoff:instance/web-1" in d2.output()
    assert not (w.state / "lock.json").exists()
    assert_moved(w, "edge-a", "edge-b", uuid, before)
