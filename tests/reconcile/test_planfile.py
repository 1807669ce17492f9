"""Plan files (save/load round trip, bad files) and the stale-plan check apply will run."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from plandata import observed_dict

from nephele.errors import PlanError, StalePlanError
from nephele.model import Desired, Observed
from nephele.reconcile import planfile
from nephele.reconcile.plan import plan


def test_round_trip(tmp_path: Path, desired: Desired, observed: Observed) -> None:
    p = plan(desired, observed)
    saved = planfile.SavedPlan(p, "cloudlet.yaml", planfile.manifest_hash(b"manifest bytes"))
    path = tmp_path / "plan.json"
    planfile.save(path, saved)
    assert planfile.load(path) == saved
    assert json.loads(path.read_text())["format"] == planfile.PLANFILE_FORMAT


def test_manifest_hash_check(desired: Desired, observed: Observed) -> None:
    saved = planfile.SavedPlan(plan(desired, observed), "cloudlet.yaml", planfile.manifest_hash(b"v1"))
    planfile.check_manifest(saved, b"v1")
    with pytest.raises(StalePlanError, match=re.escape("the manifest cloudlet.yaml changed")):
        planfile.check_manifest(saved, b"v2")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "not a nephele plan file: Expecting value"),
        ('{"format": "other"}', "format is 'other'"),
        (
            '{"format": "nephele.planfile/v1", "manifest": {"path": "m", "sha256": "x"}}',
            "missing field 'plan'",
        ),
        (
            '{"format": "nephele.planfile/v1", "manifest": {"path": "m", "sha256": "x"}, '
            '"plan": {"format_version": "9"}}',
            "unsupported plan format_version '9'",
        ),
        ('{"format": "nephele.planfile/v1", "manifest": {"path": "m", "sha256": "x"}, "plan": []}', "list"),
        (
            '{"format": "nephele.planfile/v1", "manifest": {"path": "m", "sha256": "x"}, '
            '"plan": {"format_version": "1", "manifest": "d", "actions": [{"id": "x", "kind": "explode"}]}}',
            "'explode' is not a valid ActionKind",
        ),
    ],
)
def test_bad_plan_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(PlanError, match=re.escape(message)) as exc:
        planfile.load(path)
    assert str(exc.value).startswith(f"{path}: ")


def test_save_to_missing_directory_fails_cleanly(
    tmp_path: Path, desired: Desired, observed: Observed
) -> None:
    saved = planfile.SavedPlan(plan(desired, observed), "m", "x")
    with pytest.raises(PlanError, match="cannot write the plan file"):
        planfile.save(tmp_path / "missing" / "plan.json", saved)
    assert list(tmp_path.iterdir()) == []


def _stale(desired: Desired, change: Any) -> list[str]:
    before = observed_dict()
    p = plan(desired, Observed.from_dict(before))
    after = copy.deepcopy(before)
    change(after)
    return planfile.stale_preconditions(p, Observed.from_dict(after))


def test_fresh_observation_is_not_stale(desired: Desired, observed: Observed) -> None:
    assert planfile.stale_preconditions(plan(desired, observed), observed) == []


def test_instance_replaced_is_stale(desired: Desired) -> None:
    def change(o: dict[str, Any]) -> None:
        o["nodes"]["edge-a"]["instances"]["web-1"]["uuid"] = "u9"

    assert _stale(desired, change) == [
        "handoff:instance/web-1: expected instance web-1 running on edge-a with uuid u1, "
        "but it is another instance now (uuid u9)"
    ]


def test_state_changed_is_stale(desired: Desired) -> None:
    def change(o: dict[str, Any]) -> None:
        o["nodes"]["edge-a"]["instances"]["web-1"]["state"] = "paused"

    assert _stale(desired, change) == [
        "handoff:instance/web-1: expected instance web-1 running on edge-a with uuid u1, but it is paused now"
    ]


def test_port_taken_and_instance_appeared_are_stale(desired: Desired) -> None:
    def change(o: dict[str, Any]) -> None:
        o["nodes"]["edge-a"]["instances"]["web-2"] = {"uuid": "w", "snapshot": "web", "state": "running"}
        o["nodes"]["edge-b"]["instances"] = {
            "squatter": {"uuid": "s", "snapshot": "web", "state": "running", "ports": ["8080:80"]}
        }

    assert _stale(desired, change) == [
        "handoff:instance/web-1: expected host port 8080 free on edge-b, but instance squatter holds it now",
        "start_instance:instance/web-2: expected instance web-2 absent from edge-a, "
        "but it exists now (running, uuid w)",
    ]


def test_unreachable_node_and_missing_image_are_stale(desired: Desired) -> None:
    def change(o: dict[str, Any]) -> None:
        o["nodes"]["edge-b"] = {"reachable": False, "error": "timeout"}
        o["nodes"]["edge-a"]["images"] = {}

    stale = _stale(desired, change)
    assert (
        "handoff:instance/web-1: expected instance web-1 absent from edge-b, but node edge-b is "
        "unreachable (timeout)"
    ) in stale
    assert (
        "start_instance:instance/web-2: expected image tiny present on edge-a with content id "
        "aaaaaaaaaaaa, but the image is gone"
    ) in stale
