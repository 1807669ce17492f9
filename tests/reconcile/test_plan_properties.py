"""Invariants of the planner over generated observations (hypothesis): whatever the nodes report, the
plan is well-formed, respects unreachable nodes and the prune rules, and its preconditions hold in the
very observation it was made from."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nephele import manifest
from nephele.model import Inventory, Observed
from nephele.reconcile.actions import ActionKind, Plan
from nephele.reconcile.plan import plan
from nephele.reconcile.planfile import stale_preconditions

MANIFEST = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  n1: {address: 10.0.0.1}
  n2: {address: 10.0.0.2, linkMbit: 10}
  n3: {address: 10.0.0.3}
images:
  base: {source: base.zip}
  alt: {source: alt.zip, nodes: [n1, n2]}
snapshots:
  web: {image: base, source: web.zip}
  db: {image: alt}
instances:
  w1: {snapshot: web, node: n1, ports: ["8080:80"]}
  w2: {snapshot: web, node: n2, ports: ["8080:80"], state: paused}
  d1: {snapshot: db, node: n2, ports: ["9000:5432"]}
  w3: {snapshot: web, node: n3, state: stopped}
policy: {prune: PRUNE, maxParallelHandoffs: 2, transferBudget: 1GiB}
"""
DESIRED = {p: manifest.loads(MANIFEST.replace("PRUNE", p), "props.yaml") for p in ("true", "false")}
NODES = ["n1", "n2", "n3", "n4"]  # n4 is not in the manifest
NAMES = ["w1", "w2", "d1", "w3", "old", "x"]
PORTS = ["8080:80", "9000:5432", "7000:70"]


@st.composite
def scenarios(draw: Any) -> tuple[str, dict[str, Any], dict[str, Any] | None]:
    nodes: dict[str, Any] = {}
    for n in NODES:
        if not draw(st.booleans()):
            if draw(st.integers(0, 3)) == 0:
                nodes[n] = {"reachable": False, "error": "timeout"}
            continue
        instances = {}
        for name in draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=4)):
            instances[name] = {
                "uuid": f"{name}-{n}",
                "snapshot": draw(st.sampled_from(["web", "db", "gone"])),
                "state": draw(st.sampled_from(["running", "paused", "stopped"])),
                "ports": draw(st.lists(st.sampled_from(PORTS), unique=True, max_size=2)),
                "manifest": draw(st.sampled_from(["demo", "demo", None, "other"])),
                "dirty_bytes": draw(st.sampled_from([0, 50 * 2**20, 3 * 2**30])),
                "prune": draw(st.booleans()),
            }
        nodes[n] = {
            "images": {
                i: {"content_id": "ab" * 32} for i in draw(st.sets(st.sampled_from(["base", "alt", "x"])))
            },
            "snapshots": {
                s: {"image": img}
                for s, img in draw(st.sets(st.sampled_from([("web", "base"), ("db", "alt"), ("old", "x")])))
            },
            "instances": instances,
        }
    inventory = None
    if draw(st.booleans()):
        kinds = st.tuples(
            st.sampled_from(["instance", "image", "snapshot"]),
            st.sampled_from([*NAMES, "base", "alt", "web", "db"]),
            st.sampled_from(NODES),
        )
        entries = draw(st.lists(kinds, unique=True, max_size=12))
        inventory = {
            "manifest": "demo",
            "entries": [{"kind": k, "name": m, "node": n} for k, m, n in entries],
        }
    return draw(st.sampled_from(["true", "false"])), {"nodes": nodes}, inventory


def check_invariants(p: Plan, observed: Observed, inv: Inventory | None, prune: bool) -> None:
    ids = [a.id for a in p.actions]
    assert len(ids) == len(set(ids)), ids
    position = {aid: i for i, aid in enumerate(ids)}
    cycle = any("dependency cycle" in e.message for e in p.errors)
    up = {n for n, o in observed.nodes.items() if o.reachable}
    for a in p.actions:
        for dep in a.depends_on:
            assert dep in position, (a.id, dep)
            assert cycle or position[dep] < position[a.id], (a.id, dep)
        assert a.node in up, a
        assert a.source_node is None or a.source_node in up, a
        if a.kind in (ActionKind.PRUNE, ActionKind.REMOVE_IMAGE, ActionKind.REMOVE_SNAPSHOT):
            kind = {"prune": "instance", "remove_image": "image", "remove_snapshot": "snapshot"}[a.kind.value]
            assert prune and inv is not None and inv.owns(kind, a.name, a.node), a
        if a.kind is ActionKind.PRUNE:
            assert observed.nodes[a.node].instances[a.name].prune, a
        if a.kind is ActionKind.HANDOFF:
            assert a.wave is not None and a.source_node != a.node
    # what the plan relies on is true of the observation it was made from
    assert stale_preconditions(p, observed) == []


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_plan_invariants(scenario: tuple[str, dict[str, Any], dict[str, Any] | None]) -> None:
    prune, obs_dict, inv_dict = scenario
    desired = DESIRED[prune]
    observed = Observed.from_dict(obs_dict)
    inv = Inventory.from_dict(inv_dict) if inv_dict else None
    p = plan(desired, observed, inv)
    check_invariants(p, observed, inv, prune == "true")
    assert plan(desired, observed, inv) == p  # deterministic
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p  # JSON round trip
