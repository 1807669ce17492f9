"""Executor unit tests on a fake cloudlet (tests/reconcile/fakenodes.py): order, limits, retries with a
fake sleeper, permanent failures, re-checked preconditions, no-ops, inventory, journal and resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fakenodes import FakeCloudlet, fake_handoff

from nephele import manifest
from nephele.errors import NodeUnreachable, PlanError, RemoteError
from nephele.model import Desired
from nephele.reconcile.actions import Action, ActionKind, Plan
from nephele.reconcile.execute import ApplyOptions, ApplyResult, Status, apply
from nephele.reconcile.inventory import InventoryStore
from nephele.reconcile.journal import Journal, read_events
from nephele.reconcile.observe import TransportPool, observe
from nephele.reconcile.plan import plan

BASE = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {{name: demo}}
nodes:
{nodes}
images:
  tiny: {{source: tiny.zip}}
snapshots:
  web: {{image: tiny, source: web.zip}}
instances:
{instances}
policy: {policy}
"""


def write_manifest(
    tmp: Path, nodes: list[str], instances: dict[str, str], policy: str = "{prune: true}"
) -> Desired:
    (tmp / "tiny.zip").write_bytes(b"image")
    (tmp / "web.zip").write_bytes(b"snapshot")
    text = BASE.format(
        nodes="\n".join(f"  {n}: {{address: 10.0.0.{i + 1}}}" for i, n in enumerate(nodes)),
        instances="\n".join(f"  {k}: {v}" for k, v in instances.items()),
        policy=policy,
    )
    path = tmp / "cloudlet.yaml"
    path.write_text(text)
    return manifest.load(path)


def two_nodes(tmp: Path, **kw: Any) -> Desired:
    return write_manifest(
        tmp,
        ["edge-a", "edge-b"],
        {
            "web-1": '{snapshot: web, node: edge-a, ports: ["8080:80"]}',
            "web-2": '{snapshot: web, node: edge-b, ports: ["8080:80"]}',
        },
        **kw,
    )


def make_plan(d: Desired, fc: FakeCloudlet, inv: InventoryStore | None = None) -> Plan:
    pool = TransportPool(d, fc.factory)
    obs = observe(d, pool, timeout=5)
    inventory = inv.reconcile(obs) if inv else None
    return plan(d, obs, inventory)


def run(
    d: Desired,
    fc: FakeCloudlet,
    p: Plan,
    tmp: Path,
    sleeps: list[float] | None = None,
    **opts: Any,
) -> tuple[ApplyResult, list[str]]:
    lines: list[str] = []
    result = apply(
        p,
        d,
        TransportPool(d, fc.factory),
        ApplyOptions(**opts),
        inventory=InventoryStore(tmp / "state", d.name),
        say=lines.append,
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
        handoff_fn=fake_handoff,
    )
    return result, lines


def overlap(fc: FakeCloudlet, op: str) -> int:
    """The most `op` calls that were in flight at the same moment."""
    spans = [(s, e) for _, o, _, s, e in fc.calls if o == op]
    points = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    best = cur = 0
    for _, delta in points:
        cur += delta
        best = max(best, cur)
    return best


def status_of(result: ApplyResult, action_id: str) -> Status:
    return next(r.status for r in result.results if r.action.id == action_id)


# ---------------------------------------------------------------------------------------------------


def test_fresh_cloudlet_converges_and_a_second_apply_is_a_noop(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    p = make_plan(d, fc)
    assert p.counts()["start"] == 2 and p.counts()["import"] == 4
    result, lines = run(d, fc, p, tmp_path)
    assert result.ok, lines
    assert (
        result.summary_line()
        == "Apply complete: 2 started, 0 changed, 0 handed off, 0 stopped, 0 pruned, 4 imported."
    )
    assert [n for n, _ in fc.find("web-1")] == ["edge-a"] and [n for n, _ in fc.find("web-2")] == ["edge-b"]
    web1 = fc.find("web-1")[0][1]
    assert web1.manifest == "demo" and web1.ports == ["8080:80"]  # the node tags what nephele starts
    inv = json.loads((tmp_path / "state" / "inventory.json").read_text())
    assert {(e["kind"], e["name"], e["node"]) for e in inv["entries"]} == {
        ("image", "tiny", "edge-a"),
        ("image", "tiny", "edge-b"),
        ("snapshot", "web", "edge-a"),
        ("snapshot", "web", "edge-b"),
        ("instance", "web-1", "edge-a"),
        ("instance", "web-2", "edge-b"),
    }
    assert any(line.startswith("web-1: start on edge-a") and "done in" in line for line in lines)
    again = make_plan(d, fc)
    assert not again.has_changes and not again.errors


def test_dependencies_run_first(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.delay = {"image.import": 0.05, "snapshot.import": 0.05}
    result, _ = run(d, fc, make_plan(d, fc), tmp_path, parallelism=8, per_node=8)
    assert result.ok
    for node in ("edge-a", "edge-b"):
        span = {op: (s, e) for n, op, _, s, e in fc.calls if n == node and op != "observe"}
        assert span["image.import"][1] <= span["snapshot.import"][0] <= span["instance.run"][0]
        assert span["snapshot.import"][1] <= span["instance.run"][0]


def four_instances(tmp: Path, policy: str = "{prune: true}") -> tuple[Desired, FakeCloudlet]:
    nodes = ["n1", "n2", "n3", "n4"]
    d = write_manifest(
        tmp, nodes, {f"vm-{i}": f"{{snapshot: web, node: {n}}}" for i, n in enumerate(nodes)}, policy
    )
    fc = FakeCloudlet(*nodes)
    for n in nodes:
        fc.add_image(n)
        fc.add_snapshot(n)
    fc.delay = {"instance.run": 0.15}
    return d, fc


@pytest.mark.parametrize("parallelism", [1, 2, 4])
def test_parallelism_bounds_actions_in_flight(tmp_path: Path, parallelism: int) -> None:
    d, fc = four_instances(tmp_path)
    result, _ = run(d, fc, make_plan(d, fc), tmp_path, parallelism=parallelism)
    assert result.ok
    assert overlap(fc, "instance.run") == parallelism


def test_per_node_limit(tmp_path: Path) -> None:
    d = write_manifest(tmp_path, ["edge-a"], {f"vm-{i}": "{snapshot: web, node: edge-a}" for i in range(3)})
    fc = FakeCloudlet("edge-a")
    fc.add_image("edge-a")
    fc.add_snapshot("edge-a")
    fc.delay = {"instance.run": 0.1}
    result, _ = run(d, fc, make_plan(d, fc), tmp_path, parallelism=8, per_node=1)
    assert result.ok and overlap(fc, "instance.run") == 1
    fc2 = FakeCloudlet("edge-a")
    fc2.add_image("edge-a")
    fc2.add_snapshot("edge-a")
    fc2.delay = {"instance.run": 0.1}
    result, _ = run(d, fc2, make_plan(d, fc2), tmp_path, parallelism=8, per_node=3)
    assert result.ok and overlap(fc2, "instance.run") == 3


def handoff_setup(tmp: Path, policy: str) -> tuple[Desired, FakeCloudlet]:
    nodes = ["n1", "n2", "n3", "n4"]
    d = write_manifest(
        tmp, nodes, {"vm-a": "{snapshot: web, node: n2}", "vm-b": "{snapshot: web, node: n4}"}, policy
    )
    fc = FakeCloudlet(*nodes)
    for n in nodes:
        fc.add_image(n)
        fc.add_snapshot(n)
    fc.add_instance("n1", "vm-a")
    fc.add_instance("n3", "vm-b")
    fc.delay = {"instance.handoff": 0.15}
    return d, fc


def test_max_parallel_handoffs_is_respected(tmp_path: Path) -> None:
    d, fc = handoff_setup(tmp_path, "{maxParallelHandoffs: 1}")
    p = make_plan(d, fc)
    assert p.counts()["handoff"] == 2
    result, lines = run(d, fc, p, tmp_path, parallelism=8)
    assert result.ok, lines
    assert overlap(fc, "instance.handoff") == 1
    assert [n for n, _ in fc.find("vm-a")] == ["n2"] and [n for n, _ in fc.find("vm-b")] == ["n4"]
    assert any("vm-a: n1 → n2" in line and line.endswith("… 43%") for line in lines)


def test_parallel_handoffs_when_allowed(tmp_path: Path) -> None:
    d, fc = handoff_setup(tmp_path, "{maxParallelHandoffs: 2}")
    result, _ = run(d, fc, make_plan(d, fc), tmp_path, parallelism=8)
    assert result.ok and overlap(fc, "instance.handoff") == 2


def test_temporary_errors_are_retried_with_backoff(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.faults[("edge-a", "instance.run")] = [
        NodeUnreachable("timed out", node="edge-a"),
        RemoteError("conflict", "busy", node="edge-a", temporary=True),
    ]
    sleeps: list[float] = []
    result, lines = run(d, fc, make_plan(d, fc), tmp_path, sleeps=sleeps)
    assert result.ok, lines
    assert sleeps == [1.0, 2.0]
    r = next(r for r in result.results if r.action.id == "start_instance:instance/web-1")
    assert r.attempts == 3 and r.status is Status.DONE
    assert len(fc.find("web-1")) == 1
    assert any("retrying in 1 s (attempt 2 of 5)" in line for line in lines)


def test_backoff_is_capped_and_gives_up(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.faults[("edge-a", "instance.run")] = [NodeUnreachable("down", node="edge-a") for _ in range(10)]
    sleeps: list[float] = []
    result, _ = run(
        d, fc, make_plan(d, fc), tmp_path, sleeps=sleeps, retries=3, backoff_initial=10, backoff_max=15
    )
    assert sleeps == [10, 15, 15]
    r = next(r for r in result.results if r.action.id == "start_instance:instance/web-1")
    assert r.status is Status.FAILED and r.attempts == 4
    assert r.error and r.error.startswith("gave up after 4 attempts")
    assert status_of(result, "start_instance:instance/web-2") is Status.DONE
    assert not result.ok


def test_permanent_failure_skips_dependents_only(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.faults[("edge-b", "snapshot.import")] = [
        RemoteError("invalid_input", "web.zip: corrupt", node="edge-b")
    ]
    sleeps: list[float] = []
    result, lines = run(d, fc, make_plan(d, fc), tmp_path, sleeps=sleeps)
    assert sleeps == []  # a permanent error is not retried
    assert status_of(result, "distribute_snapshot:snapshot/web@edge-b") is Status.FAILED
    assert status_of(result, "start_instance:instance/web-2") is Status.SKIPPED
    assert status_of(result, "start_instance:instance/web-1") is Status.DONE
    assert fc.find("web-2") == [] and len(fc.find("web-1")) == 1
    line = result.summary_line()
    assert line.startswith("Apply failed: 1 failed (distribute_snapshot:snapshot/web@edge-b); 1 skipped")
    skipped = next(r for r in result.results if r.status is Status.SKIPPED)
    assert skipped.error and "depends on distribute_snapshot:snapshot/web@edge-b" in skipped.error
    doc = result.to_dict()
    assert doc["ok"] is False and doc["summary"]["failed"] == 1 and doc["summary"]["skipped"] == 1
    assert any("FAILED: node edge-b: web.zip: corrupt" in x for x in lines)


def test_precondition_rechecked_before_acting(tmp_path: Path) -> None:
    d = write_manifest(tmp_path, ["edge-a"], {"web-1": "{snapshot: web, node: edge-a, state: stopped}"})
    fc = FakeCloudlet("edge-a")
    fc.add_image("edge-a")
    fc.add_snapshot("edge-a")
    old = fc.add_instance("edge-a", "web-1")
    p = make_plan(d, fc)
    assert [a.kind for a in p.actions] == [ActionKind.STOP_INSTANCE]
    # Someone replaced the instance between plan and apply: same title, another VM.
    del fc.nodes["edge-a"].instances[old.uuid]
    fc.add_instance("edge-a", "web-1", uuid="another-uuid", state="paused")
    result, _ = run(d, fc, p, tmp_path)
    r = result.results[0]
    assert r.status is Status.FAILED
    assert r.error and "changed since the plan was made" in r.error and "another instance now" in r.error
    assert fc.mutations() == []


def test_effect_already_there_is_a_noop(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    for n in ("edge-a", "edge-b"):
        fc.add_image(n)
        fc.add_snapshot(n)
    p = make_plan(d, fc)
    fc.add_instance("edge-a", "web-1", ports=["8080:80"])  # e.g. an apply killed after the node ran it
    result, lines = run(d, fc, p, tmp_path)
    assert result.ok
    assert status_of(result, "start_instance:instance/web-1") is Status.NOOP
    assert ("edge-a", "instance.run") not in fc.mutations()
    assert len(fc.find("web-1")) == 1
    assert "1 already done" in result.summary_line()
    assert any("already done, nothing to do" in line for line in lines)


def test_plan_with_errors_is_refused(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.add_instance("edge-a", "squatter", manifest="other", ports=["8080:80"])
    p = make_plan(d, fc)
    assert p.errors
    with pytest.raises(PlanError, match="has errors"):
        apply(p, d, TransportPool(d, fc.factory))
    assert fc.mutations() == []


def test_handoff_prune_stop_ports_and_pause(tmp_path: Path) -> None:
    d = write_manifest(
        tmp_path,
        ["edge-a", "edge-b"],
        {
            "mover": "{snapshot: web, node: edge-b}",
            "sleeper": "{snapshot: web, node: edge-a, state: stopped}",
            "porter": '{snapshot: web, node: edge-a, ports: ["9000:80"]}',
            "napper": "{snapshot: web, node: edge-a, state: paused}",
        },
    )
    fc = FakeCloudlet("edge-a", "edge-b")
    for n in ("edge-a", "edge-b"):
        fc.add_image(n)
        fc.add_snapshot(n)
    for name in ("mover", "sleeper", "napper", "gone"):
        fc.add_instance("edge-a", name)
    fc.add_instance("edge-a", "porter", ports=["8000:80"])
    inv = InventoryStore(tmp_path / "state", "demo")
    p = make_plan(d, fc, inv)
    kinds = sorted(a.kind.value for a in p.actions)
    assert kinds == ["change_ports", "handoff", "pause_instance", "prune", "stop_instance"]
    result, lines = run(d, fc, p, tmp_path)
    assert result.ok, lines
    assert [n for n, _ in fc.find("mover")] == ["edge-b"]
    assert fc.find("gone") == []
    assert fc.find("sleeper")[0][1].state == "stopped"
    assert fc.find("napper")[0][1].state == "paused"
    assert fc.find("porter")[0][1].ports == ["9000:80"]
    entries = json.loads((tmp_path / "state" / "inventory.json").read_text())["entries"]
    assert {"kind": "instance", "name": "mover", "node": "edge-b"} in entries
    assert {"kind": "instance", "name": "mover", "node": "edge-a"} not in entries
    assert not any(e["name"] == "gone" for e in entries)
    assert not make_plan(d, fc, inv).has_changes


def test_prune_off_leaves_removed_instances(tmp_path: Path) -> None:
    d = write_manifest(
        tmp_path, ["edge-a"], {"keep": "{snapshot: web, node: edge-a}"}, policy="{prune: false}"
    )
    fc = FakeCloudlet("edge-a")
    fc.add_image("edge-a")
    fc.add_snapshot("edge-a")
    fc.add_instance("edge-a", "keep")
    fc.add_instance("edge-a", "gone")
    p = make_plan(d, fc, InventoryStore(tmp_path / "state", "demo"))
    assert not p.has_changes
    assert any("not pruned (policy.prune is off)" in w.message for w in p.warnings)


def test_killed_apply_resumes_without_duplicates(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    state = tmp_path / "state"

    def die() -> None:
        raise KeyboardInterrupt  # the controller dies right after the node started web-1

    fc.after[("edge-a", "instance.run")] = die
    journal = Journal(state)
    journal.begin(manifest="demo")
    p = make_plan(d, fc)
    result = apply(
        p,
        d,
        TransportPool(d, fc.factory),
        ApplyOptions(parallelism=1),
        journal=journal,
        inventory=InventoryStore(state, "demo"),
        say=lambda s: None,
    )
    assert result.interrupted and not result.ok
    # No run_end: as if the process had been killed. The next apply sees what was in flight.
    left = Journal(state).previous_interrupted()
    assert [i.action for i in left] == ["start_instance:instance/web-1"]
    inv = InventoryStore(state, "demo")
    p2 = make_plan(d, fc, inv)
    assert "start_instance:instance/web-1" not in [a.id for a in p2.actions]  # already there, tagged ours
    result2, lines = run(d, fc, p2, tmp_path)
    assert result2.ok, lines
    assert fc.made.count("web-1") == 1 and fc.made.count("web-2") == 1
    assert len(fc.find("web-1")) == 1 and len(fc.find("web-2")) == 1
    assert not make_plan(d, fc, inv).has_changes


def test_journal_records_every_step(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.faults[("edge-a", "instance.run")] = [NodeUnreachable("blip", node="edge-a")]
    journal = Journal(tmp_path / "state")
    journal.begin(manifest="demo")
    p = make_plan(d, fc)
    result = apply(
        p, d, TransportPool(d, fc.factory), journal=journal, say=lambda s: None, sleep=lambda s: None
    )
    journal.end(result.ok)
    events = read_events(tmp_path / "state" / "journal.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and events[-1]["ok"] is True
    assert kinds.count("done") == len(p.actions)
    assert [
        e["attempt"]
        for e in events
        if e.get("action") == "start_instance:instance/web-1" and e["event"] == "start"
    ] == [1, 2]
    assert any(e["event"] == "retry" and e["delay"] == 1.0 for e in events)
    assert Journal(tmp_path / "state").previous_interrupted() == []


def test_leftover_snapshot_and_image_are_pruned_in_order(tmp_path: Path) -> None:
    d = write_manifest(tmp_path, ["edge-a", "edge-b"], {"web-1": "{snapshot: web, node: edge-a}"})
    d = manifest.loads(
        (tmp_path / "cloudlet.yaml")
        .read_text()
        .replace("tiny: {source: tiny.zip}", "tiny: {source: tiny.zip, nodes: [edge-a]}"),
        str(tmp_path / "cloudlet.yaml"),
    )
    fc = FakeCloudlet("edge-a", "edge-b")
    for n in ("edge-a", "edge-b"):
        fc.add_image(n)
        fc.add_snapshot(n)
    fc.add_instance("edge-a", "web-1")
    inv = InventoryStore(tmp_path / "state", "demo")
    inv.reconcile(observe(d, TransportPool(d, fc.factory), timeout=5))
    for kind in (ActionKind.IMPORT_IMAGE, ActionKind.DISTRIBUTE_SNAPSHOT):  # as if nephele had put them there
        inv.record(
            Action(
                id="x",
                kind=kind,
                address=f"{'image/tiny' if kind is ActionKind.IMPORT_IMAGE else 'snapshot/web'}",
                node="edge-b",
                reason="",
            )
        )
    p = make_plan(d, fc, inv)
    assert [a.id for a in p.actions] == [
        "remove_snapshot:snapshot/web@edge-b",
        "remove_image:image/tiny@edge-b",
    ]
    result, lines = run(d, fc, p, tmp_path)
    assert result.ok, lines
    assert fc.nodes["edge-b"].snapshots == {} and fc.nodes["edge-b"].images == {}
    assert fc.nodes["edge-a"].snapshots and fc.nodes["edge-a"].images
    assert [op for n, op in fc.mutations()] == ["snapshot.rm", "image.rm"]


def test_a_timed_out_change_is_not_retried(tmp_path: Path) -> None:
    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.faults[("edge-a", "instance.run")] = [
        NodeUnreachable("the agent did not answer within 1800 s", node="edge-a")
    ]
    sleeps: list[float] = []
    result, _ = run(d, fc, make_plan(d, fc), tmp_path, sleeps=sleeps)
    r = next(r for r in result.results if r.action.id == "start_instance:instance/web-1")
    assert r.status is Status.FAILED and r.attempts == 1 and sleeps == []
    assert r.error and "may still be running on edge-a, so it is not retried" in r.error


def test_cold_handoff_is_refused_clearly(tmp_path: Path) -> None:
    from nephele.reconcile.execute import ActionFailed, HandoffRequest, live_handoff

    d = two_nodes(tmp_path)
    fc = FakeCloudlet("edge-a", "edge-b")
    req = HandoffRequest(
        instance="web-1",
        uuid="u",
        source=fc.transport("edge-a"),
        dest=fc.transport("edge-b"),
        source_spec=d.nodes["edge-a"],
        dest_spec=d.nodes["edge-b"],
        mode="cold",
        downtime_ms=5000,
        progress=lambda s: None,
    )
    with pytest.raises(ActionFailed, match=r"cold handoff .* is not supported yet"):
        live_handoff(req)
    assert fc.calls == []


def test_handoff_progress_line() -> None:
    from nephele.reconcile.execute import handoff_progress

    ev = {"iteration": 3, "wire_bytes": 12 * 2**20, "rate_bps": 2.3e6, "eta_s": 9.4}
    assert handoff_progress(ev) == "iteration 3  12.0 MiB over the wire  18.4 Mbit/s  ETA 9 s"
    assert handoff_progress({"paused": True}).startswith("stop-and-copy  0.0 MiB")


def test_default_handoff_speaks_the_handoff_protocol(tmp_path: Path) -> None:
    """The default handoff_fn (nephele.handoff.perform) against the fake's protocol ops."""
    d, fc = handoff_setup(tmp_path, "{maxParallelHandoffs: 1, downtimeBudget: 2s}")
    lines: list[str] = []
    result = apply(make_plan(d, fc), d, TransportPool(d, fc.factory), say=lines.append)
    assert result.ok, lines
    assert [n for n, _ in fc.find("vm-a")] == ["n2"] and [n for n, _ in fc.find("vm-b")] == ["n4"]
    prepare = [args for n, op, args, _, _ in fc.calls if op == "handoff.prepare"]
    assert len(prepare) == 2
    sends = [args for n, op, args, _, _ in fc.calls if op == "instance.handoff"]  # the fake's name
    assert [(a["timeout_s"], a["auto_converge"], a["downtime_ms"]) for a in sends] == [(None, True, 2000)] * 2
    assert any("vm-a: n1 → n2" in x and "initiated to tcp://10.0.0.2:8022" in x for x in lines)
    assert any(x.endswith("… iteration 1  1.0 MiB over the wire  20.0 Mbit/s  ETA 1 s") for x in lines)
    done = [x for x in lines if x.startswith("vm-a:") and "done in" in x]
    assert done and "downtime 0.05 s" in done[0] and "stats /var/nephele/logs/" in done[0]


NODE_COPY = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  edge-a: {address: 10.0.0.1}
  edge-b: {address: 10.0.0.2}
images:
  tiny: {}
snapshots:
  web: {image: tiny}
instances:
  web-2: {snapshot: web, node: edge-b}
policy: {prune: true}
"""


def node_copy(tmp: Path) -> tuple[Desired, FakeCloudlet]:
    path = tmp / "cloudlet.yaml"
    path.write_text(NODE_COPY)
    fc = FakeCloudlet("edge-a", "edge-b")
    fc.add_image("edge-a")
    fc.add_snapshot("edge-a")
    for n in ("edge-a", "edge-b"):
        fc.nodes[n].images["tiny-old"] = "cd" * 32  # a sibling both hold
    fc.nodes["edge-b"].images["other"] = "ef" * 32  # only the receiver holds it
    return manifest.load(path), fc


def test_an_image_copied_between_nodes_goes_as_a_delta_against_what_the_receiver_holds(
    tmp_path: Path,
) -> None:
    d, fc = node_copy(tmp_path)
    result, lines = run(d, fc, make_plan(d, fc), tmp_path)
    assert result.ok, lines
    [(node, args)] = [(n, a) for n, op, a, _, _ in fc.calls if op == "image.export_delta"]
    assert node == "edge-a" and args["refs"] == ["cd" * 32, "ef" * 32]  # every image edge-b holds
    assert [(n, op) for n, op in fc.mutations() if op.startswith("image.")] == [
        ("edge-b", "image.import_delta")
    ]
    assert not [op for _, op, _, _, _ in fc.calls if op == "image.export"]
    line = next(x for x in lines if x.startswith("image/tiny:") and "done in" in x)
    assert "from edge-a, 0.0 MiB sent (delta, against 1 image it holds; files: 0.0 MiB)" in line
    # The snapshot's export is already a delta against its image: copied as it is.
    assert ("edge-b", "snapshot.import") in fc.mutations()
    # Every file the copies made in the nodes' tmp/ was discarded afterwards.
    assert fc.nodes["edge-a"].files == set() and fc.nodes["edge-b"].files == set()
    assert [n for n, _ in fc.find("web-2")] == ["edge-b"]


@pytest.mark.parametrize("old", ["edge-a", "edge-b"])
def test_a_node_without_the_delta_ops_gets_the_whole_image(tmp_path: Path, old: str) -> None:
    d, fc = node_copy(tmp_path)
    fc.old_nodes = {old}
    result, lines = run(d, fc, make_plan(d, fc), tmp_path)
    assert result.ok, lines
    assert ("edge-b", "image.import") in fc.mutations()
    assert (
        f"{old} has no image.{'export' if old == 'edge-a' else 'import'}_delta: copying the whole image"
        in ("\n".join(lines))
    )
    assert "tiny" in fc.nodes["edge-b"].images


def test_handoff_carries_the_manifests_cap_timeout_and_auto_converge(tmp_path: Path) -> None:
    d = write_manifest(
        tmp_path,
        ["edge-a", "edge-b"],
        {"mover": "{snapshot: web, node: edge-b}"},
        policy="{prune: false, maxBandwidthMbit: 40, handoffTimeout: 5m, autoConverge: false}",
    )
    text = (
        (tmp_path / "cloudlet.yaml")
        .read_text()
        .replace("edge-b: {address: 10.0.0.2}", "edge-b: {address: 10.0.0.2, maxBandwidthMbit: 15}")
    )
    (tmp_path / "cloudlet.yaml").write_text(text)
    d = manifest.load(tmp_path / "cloudlet.yaml")
    fc = FakeCloudlet("edge-a", "edge-b")
    for n in ("edge-a", "edge-b"):
        fc.add_image(n)
        fc.add_snapshot(n)
    fc.add_instance("edge-a", "mover")
    seen: list[tuple[float | None, float | None, bool]] = []

    def capturing(req: Any) -> str:
        seen.append((req.bandwidth_mbit, req.timeout_s, req.auto_converge))
        return fake_handoff(req)

    result = apply(
        make_plan(d, fc),
        d,
        TransportPool(d, fc.factory),
        ApplyOptions(),
        inventory=InventoryStore(tmp_path / "state", d.name),
        say=lambda _line: None,
        sleep=lambda _s: None,
        handoff_fn=capturing,
    )
    assert result.ok and seen == [(15.0, 300.0, False)]  # edge-b's cap is below the policy's
