"""Watch daemon unit tests: triggers on a fake clock, git fast-forward on local repos, suspension,
supersede, invalid revisions, drift, dark nodes, the serve loop, --once exit codes. Nodes are the fake
cloudlet of tests/reconcile/fakenodes.py (no SSH, no libvirt)."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakenodes import FakeCloudlet

from nephele import manifest
from nephele.cli import cmd_watch
from nephele.cli.main import main
from nephele.errors import NepheleError
from nephele.model import Desired
from nephele.reconcile import events as eventlog
from nephele.reconcile.actions import ActionKind
from nephele.reconcile.execute import Status
from nephele.reconcile.observe import TransportPool, observe
from nephele.reconcile.plan import plan
from nephele.reconcile.triggers import Backoff, Debouncer, GitPoller, jittered
from nephele.reconcile.watch import (
    Suspension,
    Watcher,
    WatchOptions,
    hold,
    obsolete,
    read_state,
    read_suspension,
    resolve_manifest,
    set_suspension,
)

HEAD = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  edge-a: {address: 10.0.0.1}
  edge-b: {address: 10.0.0.2}
images:
  tiny: {source: tiny.zip}
snapshots:
  web: {image: tiny, source: web.zip}
"""


def write(tmp: Path, instances: dict[str, str], policy: str = "{prune: true}") -> Path:
    (tmp / "tiny.zip").write_bytes(b"image")
    (tmp / "web.zip").write_bytes(b"snapshot")
    body = "".join(f"  {k}: {v}\n" for k, v in instances.items()) or "  {}\n"
    path = tmp / "cloudlet.yaml"
    path.write_text(HEAD + "instances:\n" + body + f"policy: {policy}\n")
    return path


WEB1 = {"web-1": '{snapshot: web, node: edge-a, ports: ["8080:80"]}'}
WEB12 = {**WEB1, "web-2": "{snapshot: web, node: edge-b}"}


def watcher(path: Path, fc: FakeCloudlet, lines: list[str] | None = None, **kw: Any) -> Watcher:
    opts = WatchOptions(manifest=path, **kw)
    out = lines if lines is not None else []
    return Watcher(opts, factory=fc.factory, say=out.append, rng=random.Random(1))


def events(path: Path) -> list[dict[str, Any]]:
    return eventlog.read(path.parent / ".nephele" / "demo" / "events.jsonl")


def seeded(*nodes: str) -> FakeCloudlet:
    fc = FakeCloudlet("edge-a", "edge-b")
    for n in nodes:
        fc.add_image(n)
        fc.add_snapshot(n)
    return fc


# ------------------------------------------------------------------------------------ triggers


def test_debouncer_folds_a_burst_into_one_wakeup() -> None:
    d = Debouncer(quiet=0.5, max_wait=5.0)
    assert d.deadline() is None and not d.take(100.0)
    for t in (0.0, 0.2, 0.4, 0.6):
        d.touch(t)
    assert not d.take(1.0)  # 0.4 s after the last event
    assert d.take(1.1)
    assert not d.take(1.2)  # once


def test_debouncer_max_wait_bounds_an_endless_burst() -> None:
    d = Debouncer(quiet=0.5, max_wait=2.0)
    t = 0.0
    fired = None
    while t < 10:
        d.touch(t)
        if d.take(t):
            fired = t
            break
        t += 0.1
    assert fired is not None and 1.95 <= fired <= 2.05


def test_backoff_is_exponential_capped_jittered_down_and_reset_on_success() -> None:
    b = Backoff(initial=2.0, cap=60.0, jitter=0.1, rng=random.Random(7))
    now = 1000.0
    delays = []
    for _ in range(12):
        delays.append(b.failure("edge-b", now))
        assert not b.due("edge-b", now)
        assert b.due("edge-b", now + delays[-1])
    bases = [min(60.0, 2.0 * 2**i) for i in range(12)]
    for d, base in zip(delays, bases, strict=True):
        assert base * 0.9 <= d <= base
    assert max(delays) <= 60.0 and delays[-1] >= 54.0  # capped, and stays at the cap forever
    assert b.attempts("edge-b") == 12
    b.success("edge-b")
    assert b.due("edge-b", now) and b.attempts("edge-b") == 0
    assert 1.8 <= b.failure("edge-b", now) <= 2.0
    assert b.due("edge-a", now)  # keys are independent


def test_jitter_spreads_within_ten_percent() -> None:
    rng = random.Random(3)
    values = [jittered(300.0, rng) for _ in range(200)]
    assert all(270.0 <= v <= 330.0 for v in values)
    assert max(values) - min(values) > 30  # not a constant


# ----------------------------------------------------------------------------------------- git


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A bare 'origin', the daemon's checkout and an operator's clone, both tracking origin/main."""
    bare = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    seed = tmp_path / "operator"
    git(tmp_path, "clone", "-q", str(bare), str(seed))
    git(seed, "checkout", "-q", "-b", "main")
    (seed / "cloudlet.yaml").write_text("v1\n")
    git(seed, "add", "cloudlet.yaml")
    git(seed, "commit", "-q", "-m", "v1")
    git(seed, "push", "-q", "origin", "main")
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", f"file://{bare}", str(checkout))
    return bare, checkout, seed


def test_git_poll_fast_forwards_to_a_pushed_commit(repos: tuple[Path, Path, Path]) -> None:
    _, checkout, op = repos
    poller = GitPoller(checkout)
    first = poller.poll()
    assert not first.moved and first.upstream == "origin/main"
    (op / "cloudlet.yaml").write_text("v2\n")
    git(op, "commit", "-q", "-am", "v2")
    git(op, "push", "-q", "origin", "main")
    pushed = git(op, "rev-parse", "HEAD")
    polled = poller.poll()
    assert polled.moved and polled.after == pushed and polled.before == first.after
    assert (checkout / "cloudlet.yaml").read_text() == "v2\n"
    assert git(checkout, "rev-parse", "HEAD") == pushed


def test_git_poll_refuses_a_diverged_checkout_and_leaves_it(repos: tuple[Path, Path, Path]) -> None:
    _, checkout, op = repos
    (checkout / "local.txt").write_text("x")
    git(checkout, "add", "local.txt")
    git(checkout, "commit", "-q", "-m", "local")
    mine = git(checkout, "rev-parse", "HEAD")
    (op / "cloudlet.yaml").write_text("v2\n")
    git(op, "commit", "-q", "-am", "v2")
    git(op, "push", "-q", "origin", "main")
    with pytest.raises(NepheleError, match="diverged; not fast-forwarding"):
        GitPoller(checkout).poll()
    assert git(checkout, "rev-parse", "HEAD") == mine


def test_git_poll_needs_a_work_tree_and_an_upstream(tmp_path: Path) -> None:
    with pytest.raises(NepheleError, match="not in a git work tree"):
        GitPoller(tmp_path)
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "f").write_text("x")
    git(tmp_path, "add", "f")
    git(tmp_path, "commit", "-q", "-m", "x")
    with pytest.raises(NepheleError, match="no upstream to follow"):
        GitPoller(tmp_path).poll()


# ---------------------------------------------------------------------------- plan filtering


def fake_plan(tmp: Path, fc: FakeCloudlet) -> tuple[Desired, Any]:
    d = manifest.load(tmp / "cloudlet.yaml")
    obs = observe(d, TransportPool(d, fc.factory), 5)
    return d, plan(d, obs)


def test_hold_drops_suspended_instances_and_what_depends_on_them(tmp_path: Path) -> None:
    write(tmp_path, WEB12)
    fc = seeded("edge-a")  # edge-b lacks image and snapshot
    _, p = fake_plan(tmp_path, fc)
    kept, held = hold(p, Suspension(instances=frozenset({"web-2"})))
    assert {a.id for a, _ in held} == {"start_instance:instance/web-2"}
    assert "start_instance:instance/web-1" in {a.id for a in kept.actions}
    assert any(a.kind is ActionKind.IMPORT_IMAGE for a in kept.actions)  # images are not held
    kept, held = hold(p, Suspension(manifest=True))
    assert not kept.actions and len(held) == len(p.actions)


def test_obsolete_compares_what_an_action_does_not_why(tmp_path: Path) -> None:
    write(tmp_path, WEB1)
    fc = seeded("edge-a", "edge-b")
    _, p1 = fake_plan(tmp_path, fc)
    start = p1.action("start_instance:instance/web-1")
    write(
        tmp_path,
        {
            "web-1": '{snapshot: web, node: edge-a, ports: ["8080:80"]}',
            "web-9": "{snapshot: web, node: edge-b}",
        },
    )
    _, same = fake_plan(tmp_path, fc)
    assert not obsolete(start, same)
    write(tmp_path, {"web-1": '{snapshot: web, node: edge-b, ports: ["8080:80"]}'})
    _, moved = fake_plan(tmp_path, fc)
    assert obsolete(start, moved)  # same id, other node


def test_suspension_file_round_trip(tmp_path: Path) -> None:
    assert read_suspension(tmp_path) == Suspension()
    set_suspension(tmp_path, ["instance/web-1", "instance/web-2"], True)
    set_suspension(tmp_path, ["instance/web-2"], False)
    assert read_suspension(tmp_path) == Suspension(False, frozenset({"web-1"}))
    set_suspension(tmp_path, [], True)
    assert read_suspension(tmp_path).manifest
    set_suspension(tmp_path, [], False)
    assert read_suspension(tmp_path) == Suspension()
    with pytest.raises(NepheleError, match="instance/NAME"):
        set_suspension(tmp_path, ["node/edge-a"], True)


def test_resolve_manifest_in_a_directory(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("x")
    assert resolve_manifest(str(tmp_path)) == tmp_path / "a.yaml"
    (tmp_path / "b.yml").write_text("x")
    with pytest.raises(NepheleError, match="exactly one"):
        resolve_manifest(str(tmp_path))
    (tmp_path / "cloudlet.yaml").write_text("x")
    assert resolve_manifest(str(tmp_path)) == tmp_path / "cloudlet.yaml"


# ----------------------------------------------------------------------------------- passes


def test_a_pass_converges_then_an_empty_pass_is_silent(tmp_path: Path) -> None:
    path = write(tmp_path, WEB12)
    fc = FakeCloudlet("edge-a", "edge-b")
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None
    out = w.run_pass(w.latest)
    assert out.result == "applied" and out.apply is not None and out.apply.ok
    assert [n for n, _ in fc.find("web-1")] == ["edge-a"] and [n for n, _ in fc.find("web-2")] == ["edge-b"]
    evs = events(path)
    ends = [e for e in evs if e["event"] == "action" and e["result"] == "done"]
    assert len(ends) == len(out.apply.results)
    start_web1 = next(e for e in ends if e["action"] == "start_instance:instance/web-1")
    assert start_web1["node"] == "edge-a" and start_web1["instance"] == "web-1"
    assert start_web1["revision"] == w.latest.text and start_web1["duration"] >= 0
    assert set(start_web1) >= {
        "ts",
        "revision",
        "action",
        "node",
        "instance",
        "result",
        "duration",
        "message",
    }
    status = json.loads((tmp_path / ".nephele" / "demo" / "status.json").read_text())
    assert status["last_applied"]["sha256"] == w.latest.sha
    n_events, n_calls = len(events(path)), len(fc.mutations())
    again = w.run_pass(w.latest)
    assert again.result == "in_sync"
    assert len(events(path)) == n_events and len(fc.mutations()) == n_calls  # nothing noisy, nothing done
    state = read_state(tmp_path / ".nephele" / "demo")
    assert state is not None and state["last_pass"]["result"] == "in_sync"


def test_drift_is_corrected_or_only_reported_without_self_heal(tmp_path: Path) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None and w.run_pass(w.latest).result == "applied"
    # Behind nephele's back: the VM is stopped, then removed.
    fc.find("web-1")[0][1].state = "stopped"
    out = w.run_pass(w.latest)
    assert out.result == "applied" and fc.find("web-1")[0][1].state == "running"
    assert any(e["event"] == "drift" and e["instance"] == "web-1" for e in events(path))

    lines: list[str] = []
    lazy = watcher(path, fc, lines, self_heal=False)
    lazy.prepare()
    assert lazy.latest is not None
    node = fc.nodes["edge-a"]
    node.instances.clear()
    before = len(fc.mutations())
    out = lazy.run_pass(lazy.latest)
    assert out.result == "drift" and out.exit_code == 2
    assert len(fc.mutations()) == before and not fc.find("web-1")
    drift = [e for e in events(path) if e["event"] == "drift" and e["result"] == "reported"]
    assert len(drift) == 1 and drift[0]["action"] == "start_instance:instance/web-1"
    lazy.run_pass(lazy.latest)  # the same drift again: not reported twice
    assert len([e for e in events(path) if e["event"] == "drift" and e["result"] == "reported"]) == 1
    # A new revision is applied even without self-heal (drift is only what the manifest did not ask).
    write(tmp_path, {"web-1": '{snapshot: web, node: edge-a, ports: ["8081:80"]}'})
    assert lazy.refresh()
    assert lazy.run_pass(lazy.latest).result == "applied"
    assert fc.find("web-1")[0][1].ports == ["8081:80"]
    # A newer revision partly applied (the port change done, web-2's start failed), then reverted to
    # the content applied before: a change to apply, not drift to leave alone.
    write(
        tmp_path,
        {
            "web-1": '{snapshot: web, node: edge-a, ports: ["8082:80"]}',
            "web-2": "{snapshot: web, node: edge-b}",
        },
    )
    fc.faults[("edge-b", "instance.run")] = [NepheleError("boom")]
    assert lazy.refresh() and lazy.run_pass(lazy.latest).result == "failed"
    assert fc.find("web-1")[0][1].ports == ["8082:80"]
    write(tmp_path, {"web-1": '{snapshot: web, node: edge-a, ports: ["8081:80"]}'})
    assert lazy.refresh()
    assert lazy.run_pass(lazy.latest).result == "applied"
    assert fc.find("web-1")[0][1].ports == ["8081:80"]


def test_an_invalid_revision_is_reported_and_the_last_good_stays_in_force(tmp_path: Path) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    lines: list[str] = []
    w = watcher(path, fc, lines)
    w.prepare()
    good = w.latest
    assert good is not None and w.run_pass(good).result == "applied"
    path.write_text(path.read_text().replace("node: edge-a", "node: edge-c"))
    assert w.refresh() is False and w.latest is good
    bad = [e for e in events(path) if e["event"] == "revision" and e["result"] == "invalid"]
    assert len(bad) == 1
    problem = bad[0]["problems"][0]
    assert problem.startswith(f"{path}:12:") and "edge-c" in problem  # FILE:LINE:COL
    assert any("is invalid; keeping" in line for line in lines)
    assert w.refresh() is False  # reported once
    assert len([e for e in events(path) if e["result"] == "invalid"]) == 1
    state = read_state(tmp_path / ".nephele" / "demo")
    assert state is not None and state["invalid_revision"]["problems"] == bad[0]["problems"]
    # Drift is still corrected against the last good revision.
    fc.nodes["edge-a"].instances.clear()
    assert w.run_pass(w.latest).result == "applied" and [n for n, _ in fc.find("web-1")] == ["edge-a"]
    # A restart with the broken file on disk keeps the last good revision too.
    w2 = watcher(path, fc)
    w2.prepare()
    assert w2.latest is not None and w2.latest.sha == good.sha and w2.invalid is not None


def test_a_dark_node_is_left_out_and_probed_with_backoff(tmp_path: Path) -> None:
    path = write(tmp_path, WEB12)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.down.add("edge-b")
    t = [0.0]
    w = Watcher(
        WatchOptions(manifest=path, backoff_initial=2.0, backoff_cap=8.0),
        factory=fc.factory,
        say=lambda s: None,
        clock=lambda: t[0],
        rng=random.Random(1),
    )
    w.prepare()
    assert w.latest is not None
    out = w.run_pass(w.latest)
    assert out.result == "applied"  # edge-a converged, edge-b's objects unknown
    assert [n for n, _ in fc.find("web-1")] == ["edge-a"] and not fc.find("web-2")
    assert "edge-b" in w.dark
    observes_b = sum(1 for n, op, *_ in fc.calls if n == "edge-b" and op == "observe")
    w.run_pass(w.latest)
    assert sum(1 for n, op, *_ in fc.calls if n == "edge-b" and op == "observe") == observes_b  # not asked
    for _ in range(5):  # probes keep failing: the wait grows to the cap and stays there
        t[0] = w.node_backoff.next_at("edge-b") or 0.0
        w.probing.add("edge-b")
        w._probe(w.latest, "edge-b")
    assert w.node_backoff.attempts("edge-b") == 6
    assert (w.node_backoff.next_at("edge-b") or 0) - t[0] <= 8.0
    fc.down.discard("edge-b")
    t[0] = w.node_backoff.next_at("edge-b") or 0.0
    w._probe(w.latest, "edge-b")
    assert "edge-b" not in w.dark and any("answers again" in p for p in w.pending)
    assert w.run_pass(w.latest).result == "applied"
    assert [n for n, _ in fc.find("web-2")] == ["edge-b"]
    kinds = [(e["event"], e["node"], e["result"]) for e in events(path) if e["event"] == "node"]
    assert kinds == [("node", "edge-b", "unreachable"), ("node", "edge-b", "reachable")]


def test_a_newer_revision_supersedes_queued_actions_but_not_a_running_handoff(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "web-1": '{snapshot: web, node: edge-b, ports: ["8080:80"]}',
            "web-2": "{snapshot: web, node: edge-a}",
        },
        policy="{prune: true, parallelism: 1}",
    )
    fc = seeded("edge-a", "edge-b")
    fc.add_instance("edge-a", "web-1", ports=["8080:80"])  # web-1 must move: a handoff
    fc.delay["instance.handoff"] = 1.0
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None
    first = w.latest

    def newer_revision() -> None:
        while not any(op == "instance.handoff" for _, op, *_ in fc.calls) and fc.handoffs_in_flight == 0:
            time.sleep(0.01)
        # The handoff runs; the new revision drops web-2 (its queued start is obsolete).
        write(
            tmp_path,
            {"web-1": '{snapshot: web, node: edge-b, ports: ["8080:80"]}'},
            "{prune: true, parallelism: 1}",
        )
        assert w.refresh()

    t = threading.Thread(target=newer_revision)
    t.start()
    out = w.run_pass(first)
    t.join()
    assert out.apply is not None
    by_id = {r.action.id: r for r in out.apply.results}
    assert by_id["handoff:instance/web-1"].status is Status.DONE  # never cut mid-way
    assert [n for n, _ in fc.find("web-1")] == ["edge-b"]
    assert by_id["start_instance:instance/web-2"].status is Status.NOT_RUN
    assert (by_id["start_instance:instance/web-2"].error or "").startswith("superseded by revision")
    assert out.result == "superseded" and not fc.find("web-2")
    assert w.run_pass(w.latest).result == "in_sync"


def test_suspended_instance_is_held_and_resumed(tmp_path: Path) -> None:
    path = write(tmp_path, WEB12)
    fc = FakeCloudlet("edge-a", "edge-b")
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None
    set_suspension(w.directory, ["instance/web-2"], True)
    out = w.run_pass(w.latest)
    assert out.result == "applied" and fc.find("web-1") and not fc.find("web-2")
    status = json.loads((w.directory / "status.json").read_text())
    assert status.get("last_applied") is None  # held work: not complete
    assert w.run_pass(w.latest).result == "suspended"
    set_suspension(w.directory, ["instance/web-2"], False)
    assert w.run_pass(w.latest).result == "applied" and fc.find("web-2")


# ---------------------------------------------------------------------------------- the loop


def test_serve_converges_on_file_edits_and_stops_cleanly(tmp_path: Path) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    lines: list[str] = []
    w = watcher(path, fc, lines, debounce=0.1, resync=3600)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(w.serve()))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not fc.find("web-1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fc.find("web-1"), lines
        path.write_text(path.read_text().replace("8080:80", "9090:80"))
        while fc.find("web-1")[0][1].ports != ["9090:80"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fc.find("web-1")[0][1].ports == ["9090:80"], lines
        # Drift between resyncs is noticed at the next wake-up (here: another file event).
        fc.nodes["edge-a"].instances.clear()
        path.write_text(path.read_text() + "# touch\n")
        while not fc.find("web-1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fc.find("web-1"), lines
    finally:
        w.stopping.set()
        w.wake.set()
        t.join(20)
    assert codes == [0]
    state = read_state(w.directory)
    assert state is not None and state["state"] == "stopped" and not state["alive"]
    assert state["revision_applied"]["revision"] == w.latest.text if w.latest else False


# ------------------------------------------------------------------------------------- --once


def test_once_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    monkeypatch.setattr(cmd_watch, "TRANSPORT_FACTORY", fc.factory)
    assert main(["watch", "-f", str(path), "--once"]) == 0
    assert fc.find("web-1")
    assert main(["watch", "-f", str(tmp_path), "--once"]) == 0  # a directory holding cloudlet.yaml
    fc.nodes["edge-a"].instances.clear()
    assert main(["watch", "-f", str(path), "--once", "--no-self-heal"]) == 2
    assert not fc.find("web-1")
    fc.faults[("edge-a", "instance.run")] = [RuntimeError("boom")]
    assert main(["watch", "-f", str(path), "--once"]) == 1
    assert main(["watch", "-f", str(path), "--once"]) == 0 and fc.find("web-1")
    path.write_text(path.read_text().replace("snapshot: web, node", "snapshot: nope, node"))
    assert main(["watch", "-f", str(path), "--once"]) == 1  # invalid: reported, last good kept
    err = capsys.readouterr().out
    assert f"{path}:" in err and "nope" in err and "keeping" in err


def test_suspend_and_resume_commands(tmp_path: Path, capsys: Any) -> None:
    path = write(tmp_path, WEB1)
    assert main(["watch", "suspend", "instance/web-1", "-f", str(path)]) == 0
    assert "suspended: instance/web-1" in capsys.readouterr().out
    assert read_suspension(tmp_path / ".nephele" / "demo").instances == {"web-1"}
    assert main(["watch", "resume", "-f", str(path)]) == 0
    assert read_suspension(tmp_path / ".nephele" / "demo") == Suspension()
    assert main(["watch", "suspend", "node/x", "-f", str(path)]) == 1


def test_status_shows_the_daemon_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from nephele.cli import cmd_status

    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    monkeypatch.setattr(cmd_watch, "TRANSPORT_FACTORY", fc.factory)
    monkeypatch.setattr(cmd_status, "TRANSPORT_FACTORY", fc.factory)
    assert main(["watch", "suspend", "instance/web-9", "-f", str(path)]) == 0
    assert main(["watch", "-f", str(path), "--once"]) == 0
    path.write_text(path.read_text().replace("node: edge-a", "node: edge-z"))
    assert main(["watch", "-f", str(path), "--once"]) == 1
    capsys.readouterr()
    path.write_text(path.read_text().replace("node: edge-z", "node: edge-a"))
    assert main(["status", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Watch daemon: not running" in out
    assert "last pass:" in out and "in_sync" in out  # the broken revision's pass kept the last good
    assert "revision applied: sha256:" in out
    assert "invalid revision" in out and "edge-z" in out
    assert "suspended: instance/web-9" in out
    assert main(["status", "-f", str(path), "-o", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["watch"]["last_pass"]["result"] == "in_sync" and doc["watch"]["alive"] is False


def wait(pred: Any, timeout: float, what: str, lines: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}:\n" + "\n".join(lines))


def test_serve_follows_a_git_branch_and_ignores_a_broken_commit(tmp_path: Path) -> None:
    bare = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    op = tmp_path / "operator"
    op.mkdir()
    git(op, "init", "-q", "-b", "main")
    write(op, WEB1)
    (op / ".gitignore").write_text(".nephele/\n")
    git(op, "add", ".")
    git(op, "commit", "-q", "-m", "web-1 on edge-a")
    git(op, "remote", "add", "origin", f"file://{bare}")
    git(op, "push", "-q", "-u", "origin", "main")
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", f"file://{bare}", str(checkout))
    fc = FakeCloudlet("edge-a", "edge-b")
    lines: list[str] = []
    w = watcher(checkout / "cloudlet.yaml", fc, lines, git_poll=0.2, resync=3600)
    t = threading.Thread(target=w.serve)
    t.start()
    try:
        wait(lambda: fc.find("web-1"), 20, "web-1", lines)
        # A commit moves web-1 to edge-b: the daemon fetches, fast-forwards, hands off, records it.
        manifest_file = op / "cloudlet.yaml"
        manifest_file.write_text(manifest_file.read_text().replace("node: edge-a", "node: edge-b"))
        git(op, "commit", "-q", "-am", "move web-1 to edge-b")
        git(op, "push", "-q")
        commit = git(op, "rev-parse", "HEAD")
        wait(lambda: [n for n, _ in fc.find("web-1")] == ["edge-b"], 20, "the handoff", lines)
        status = checkout / ".nephele" / "demo" / "status.json"
        wait(
            lambda: json.loads(status.read_text())["last_applied"]["git_commit"] == commit,
            10,
            "record",
            lines,
        )
        assert json.loads(status.read_text())["last_applied"]["revision"] == f"main@sha1:{commit[:12]}"
        # A broken commit: reported with FILE:LINE:COL, the nodes keep the previous revision.
        manifest_file.write_text(
            manifest_file.read_text().replace("snapshot: web, node", "snapshot: gone, node")
        )
        git(op, "commit", "-q", "-am", "broken")
        git(op, "push", "-q")
        broken = git(op, "rev-parse", "HEAD")

        def reported() -> bool:
            return any(
                e["event"] == "revision" and e["result"] == "invalid" and broken[:12] in e["revision"]
                for e in events(checkout / "cloudlet.yaml")
            )

        wait(reported, 20, "the invalid revision", lines)
        bad = next(e for e in events(checkout / "cloudlet.yaml") if e["result"] == "invalid")
        assert (
            bad["problems"][0].startswith(f"{checkout / 'cloudlet.yaml'}:") and "gone" in bad["problems"][0]
        )
        assert git(checkout, "rev-parse", "HEAD") == broken  # the checkout follows git ...
        fc.nodes["edge-b"].instances.clear()  # ... and drift is corrected against the last good one
        w.wake.set()
        w.pending.add("test: resync now")
        wait(lambda: [n for n, _ in fc.find("web-1")] == ["edge-b"], 20, "drift corrected", lines)
        assert json.loads(status.read_text())["last_applied"]["git_commit"] == commit
    finally:
        w.stopping.set()
        w.wake.set()
        t.join(20)
    assert not t.is_alive()


def test_should_start_veto_holds_an_action_and_its_dependents(tmp_path: Path) -> None:
    from nephele.reconcile.execute import apply

    write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    d, p = fake_plan(tmp_path, fc)
    asked: list[str] = []

    def veto(a: Any) -> str | None:
        asked.append(a.id)
        return "not started: test veto" if a.kind is ActionKind.DISTRIBUTE_SNAPSHOT else None

    result = apply(p, d, TransportPool(d, fc.factory), say=lambda s: None, should_start=veto)
    by = {r.action.id: r for r in result.results}
    snap = "distribute_snapshot:snapshot/web@edge-a"
    assert by[snap].status is Status.NOT_RUN and by[snap].error == "not started: test veto"
    start = by["start_instance:instance/web-1"]
    assert start.status is Status.NOT_RUN and (start.error or "").startswith("not started: it depends on")
    assert "start_instance:instance/web-1" not in asked  # never became startable
    assert by["import_image:image/tiny@edge-a"].status is Status.DONE  # independent work went on
    assert not result.ok and not fc.find("web-1")


def test_an_operators_apply_holding_the_lock_defers_the_pass(tmp_path: Path) -> None:
    from nephele.reconcile import locks

    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None
    held = locks.acquire(w.directory, "demo", "apply")
    out = w.run_pass(w.latest)
    assert out.result == "error" and out.retry and "another apply holds the lock" in out.message
    assert not fc.mutations()
    locks.release(w.directory, held)
    assert w.run_pass(w.latest).result == "applied"


def test_events_option_writes_where_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    monkeypatch.setattr(cmd_watch, "TRANSPORT_FACTORY", fc.factory)
    log = tmp_path / "logs" / "watch.jsonl"
    assert main(["watch", "-f", str(path), "--once", "--events", str(log)]) == 0
    recs = eventlog.read(log)
    assert recs[0]["event"] == "daemon" and any(r["event"] == "action" for r in recs)
    assert not (tmp_path / ".nephele" / "demo" / "events.jsonl").exists()


@pytest.mark.parametrize("ends_on", ["edge-b", "edge-a"])
def test_a_restart_mid_handoff_waits_then_resumes_or_retries(tmp_path: Path, ends_on: str) -> None:
    """A daemon killed during a handoff: the handoff goes on on the nodes (the source shows its
    handoff URL). The restarted daemon starts nothing for that instance while it is in flight; when it
    ends on the target, the cloudlet is in sync; when it was rolled back, a new handoff is started."""
    path = write(tmp_path, {"web-1": '{snapshot: web, node: edge-b, ports: ["8080:80"]}'})
    fc = seeded("edge-a", "edge-b")
    inst = fc.add_instance("edge-a", "web-1", ports=["8080:80"], handoff_url="tcp://10.0.0.2:8022")
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None
    out = w.run_pass(w.latest)
    assert out.result == "in_sync" and not fc.mutations()  # nothing started beside the one in flight
    assert "in progress" in out.message and out.requeue_after is not None  # looks again soon
    assert out.message.startswith("waiting for the handoff of web-1 in flight")
    status = tmp_path / ".nephele" / "demo" / "status.json"
    assert "last_applied" not in json.loads(status.read_text())  # not where the manifest wants it yet
    del fc.nodes["edge-a"].instances[inst.uuid]
    inst.handoff_url = None
    fc.nodes[ends_on].instances[inst.uuid] = inst  # the handoff ended (or was rolled back)
    out = w.run_pass(w.latest)
    if ends_on == "edge-b":
        assert out.result == "in_sync" and not fc.mutations()
    else:
        assert out.result == "applied" and ("edge-a", "instance.handoff") in fc.mutations()
    assert [n for n, _ in fc.find("web-1")] == ["edge-b"]
    assert json.loads(status.read_text())["last_applied"]["sha256"] == w.latest.sha


def test_git_poll_outside_a_work_tree_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    monkeypatch.setattr(cmd_watch, "TRANSPORT_FACTORY", fc.factory)
    assert main(["watch", "-f", str(path), "--git-poll", "10s"]) == 1
    assert not fc.mutations()


def test_a_second_daemon_on_the_same_manifest_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    monkeypatch.setattr(cmd_watch, "TRANSPORT_FACTORY", fc.factory)
    other = subprocess.Popen(["sleep", "30"])  # a live process standing in for the first daemon
    try:
        state = tmp_path / ".nephele" / "demo"
        state.mkdir(parents=True)
        import socket

        (state / "watch.json").write_text(
            json.dumps({"pid": other.pid, "host": socket.gethostname(), "state": "idle", "started": "x"})
        )
        assert main(["watch", "-f", str(path), "--once"]) == 1
        assert not fc.mutations()
    finally:
        other.kill()
        other.wait()
    assert main(["watch", "-f", str(path), "--once"]) == 0  # its process is gone: not a daemon any more


def test_an_unwritable_event_log_does_not_stop_the_pass(tmp_path: Path) -> None:
    path = write(tmp_path, WEB1)
    fc = FakeCloudlet("edge-a", "edge-b")
    w = watcher(path, fc)
    w.prepare()
    assert w.log is not None and w.latest is not None

    class Broken:
        def write(self, _: str) -> None:
            raise OSError(28, "No space left on device")

        def close(self) -> None:
            pass

    w.log._file = Broken()
    assert w.run_pass(w.latest).result == "applied" and fc.find("web-1")
    state = read_state(w.directory)
    assert state is not None and "No space left on device" in state["event_log_error"]


@pytest.mark.parametrize("operation", ["watch", "apply"])
def test_a_dead_daemons_lock_is_broken_at_start_even_with_nothing_to_do(
    tmp_path: Path, operation: str
) -> None:
    """A daemon killed mid-handoff whose handoff then ended on the nodes: the restarted daemon has
    nothing to apply (so it would never take the lock), yet the stale lock must not stay behind. An
    operator's apply lock is never broken."""
    from nephele.reconcile import locks

    path = write(tmp_path, {"web-1": '{snapshot: web, node: edge-b, ports: ["8080:80"]}'})
    fc = seeded("edge-a", "edge-b")
    fc.add_instance("edge-b", "web-1", ports=["8080:80"])
    state = tmp_path / ".nephele" / "demo"
    state.mkdir(parents=True)
    lock = locks.acquire(state, "demo", operation)
    dead = subprocess.Popen(["true"])
    dead.wait()
    doc = json.loads((state / "lock.json").read_text())
    (state / "lock.json").write_text(json.dumps({**doc, "pid": dead.pid}))
    w = watcher(path, fc)
    w.prepare()
    assert w.latest is not None
    broken = [e for e in events(path) if e["event"] == "daemon" and e["result"] == "lock_broken"]
    if operation == "watch":
        assert not (state / "lock.json").exists() and lock.id in broken[0]["message"]
    else:
        assert (state / "lock.json").exists() and not broken
    assert w.run_pass(w.latest).result == "in_sync"
