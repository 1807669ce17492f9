"""Text and JSON output of a plan; the plan value itself (determinism, JSON round trip)."""

from __future__ import annotations

import json
from typing import Any

from plandata import MANIFEST, observed_dict

from nephele import manifest
from nephele.model import Desired, Observed
from nephele.reconcile.actions import PLAN_FORMAT_VERSION, Action, Plan
from nephele.reconcile.plan import plan
from nephele.reconcile.render import NO_CHANGES, render_json, render_text


def test_text_shows_symbols_reasons_estimate_and_summary(desired: Desired, observed: Observed) -> None:
    text = render_text(plan(desired, observed))
    assert "  » instance/web-1  edge-a → edge-b  ~43 MiB, ~23 s @ 20 Mbit/s (wave 1)\n" in text
    assert "      because: placement changed edge-a → edge-b\n" in text
    assert "  + instance/web-2  start on edge-a (running, 9090:80)\n" in text
    assert "      because: not on any node\n" in text
    assert "(estimated by a model, see docs/plan.md)" in text
    assert text.endswith("Plan: 1 to start, 0 to change, 1 to hand off, 0 to stop, 0 to prune.\n")


def test_text_dependency_line_and_change_symbols() -> None:
    d = manifest.loads(MANIFEST.replace('"9090:80"', '"9091:80"'), "m.yaml")
    obs = observed_dict()
    obs["nodes"]["edge-b"] = {}
    obs["nodes"]["edge-a"]["instances"]["web-2"] = {
        "uuid": "u2",
        "snapshot": "web",
        "state": "running",
        "ports": ["9090:80"],
        "manifest": "demo",
    }
    text = render_text(plan(d, Observed.from_dict(obs)))
    assert "  + image/tiny      import to edge-b from tiny.zip\n" in text
    assert "      after:   import_image:image/tiny@edge-b\n" in text
    assert "  ~ instance/web-2  ports 9090:80 → 9091:80 on edge-a\n" in text
    assert "Plan: 0 to start, 1 to change, 1 to hand off, 0 to stop, 0 to prune, 2 to import.\n" in text


def test_no_changes(desired: Desired) -> None:
    obs = observed_dict()
    web1 = obs["nodes"]["edge-a"]["instances"].pop("web-1")
    obs["nodes"]["edge-b"] = {**obs["nodes"]["edge-b"], "instances": {"web-1": web1}}
    obs["nodes"]["edge-a"]["instances"]["web-2"] = {**web1, "uuid": "u2", "ports": ["9090:80"]}
    p = plan(desired, Observed.from_dict(obs))
    assert not p.has_changes
    assert render_text(p) == NO_CHANGES + "\n"


def test_unknown_and_errors_never_claim_no_changes(desired: Desired) -> None:
    obs = observed_dict()
    obs["nodes"]["edge-b"] = {"reachable": False, "error": "timeout"}
    obs["nodes"]["edge-a"]["instances"]["intruder"] = {
        "uuid": "x",
        "snapshot": "web",
        "state": "running",
        "ports": ["9090:80"],
    }
    text = render_text(plan(desired, Observed.from_dict(obs)))
    assert NO_CHANGES not in text
    assert "  ? instance/web-1 on edge-b: node edge-b is unreachable: timeout\n" in text
    assert "  x host port 9090 on edge-a is held by instance/intruder" in text
    assert text.endswith("The plan has 1 error and cannot be applied.\n")


def test_json_is_versioned_and_complete(desired: Desired, observed: Observed) -> None:
    doc = json.loads(render_json(plan(desired, observed)))
    assert doc["format_version"] == PLAN_FORMAT_VERSION == "1"
    assert doc["changes"] is True
    assert doc["summary"]["handoff"] == 1 and doc["summary"]["start"] == 1 and doc["summary"]["total"] == 2
    keys = {"id", "kind", "symbol", "address", "node", "source_node", "reason", "depends_on", "preconditions"}
    keys |= {"ports", "old_ports", "state", "source", "mode", "wave", "estimate"}
    for a in doc["actions"]:
        assert set(a) == keys
    handoff: dict[str, Any] = next(a for a in doc["actions"] if a["kind"] == "handoff")
    assert handoff["symbol"] == "»" and handoff["source_node"] == "edge-a" and handoff["node"] == "edge-b"
    assert handoff["estimate"]["model"] == "nephele.estimate/v1"
    facts = [(p["fact"], p["node"]) for p in handoff["preconditions"]]
    assert ("instance", "edge-a") in facts and ("instance_absent", "edge-b") in facts
    assert ("port_free", "edge-b") in facts
    assert doc["warnings"] == [] and doc["errors"] == [] and doc["unknown"] == []


def test_json_round_trip_gives_the_same_plan(desired: Desired, observed: Observed) -> None:
    p = plan(desired, observed)
    again = Plan.from_dict(json.loads(render_json(p)))
    assert again == p
    assert all(isinstance(a, Action) for a in again.actions)


def test_plan_is_deterministic_whatever_the_json_key_order(desired: Desired) -> None:
    obs = observed_dict()
    obs["nodes"]["edge-a"]["instances"]["zz-old"] = {
        "uuid": "z",
        "snapshot": "web",
        "state": "running",
        "manifest": "demo",
    }
    obs["nodes"]["edge-a"]["instances"]["aa-old"] = {
        "uuid": "a",
        "snapshot": "web",
        "state": "running",
        "manifest": "demo",
    }
    reordered = {"format": obs["format"], "nodes": dict(reversed(list(obs["nodes"].items())))}
    reordered["nodes"]["edge-a"]["instances"] = dict(
        reversed(list(obs["nodes"]["edge-a"]["instances"].items()))
    )
    one = plan(desired, Observed.from_dict(obs))
    two = plan(desired, Observed.from_dict(reordered))
    assert one == two
    assert render_text(one) == render_text(two)
    assert [w.address for w in one.warnings] == ["instance/aa-old", "instance/zz-old"]


def test_handoffs_without_sizes_say_so(desired: Desired) -> None:
    obs = observed_dict()
    del obs["nodes"]["edge-a"]["instances"]["web-1"]["dirty_bytes"]
    text = render_text(plan(desired, Observed.from_dict(obs)))
    assert "  » instance/web-1  edge-a → edge-b  (no estimate: the node reported no sizes) (wave 1)\n" in text
    assert "Handoffs: 1 in 1 wave(s) (at most 1 at once), no estimate (the nodes reported no sizes)\n" in text
