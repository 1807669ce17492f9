"""Table-driven planner tests: every tests/plan_cases/<case>.yaml is one case (pyinfra style).

A case is {description, manifest (inline YAML text), observed (nephele.observed/v1, `format` optional),
inventory?, options? {targets, ignore_transfer_budget}, expected {actions, warnings?, errors?, unknown?}}.
Each expected action gives id, kind and node; depends_on defaults to [] and is always compared;
source_node, wave, state, mode, ports and reason (a substring) are compared when given. Actions are
compared in plan order. warnings/errors are substrings matched one to one, in order; unknown lists
`ADDRESS@NODE`. On a mismatch both sides are printed as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from nephele import manifest
from nephele.model import Inventory, Observed
from nephele.reconcile.actions import Action, Plan
from nephele.reconcile.plan import PlanOptions, plan

CASES = Path(__file__).resolve().parent.parent / "plan_cases"
OPTIONAL = ("source_node", "wave", "state", "mode", "ports")


def load_case(path: Path) -> dict[str, Any]:
    case = yaml.safe_load(path.read_text())
    assert isinstance(case, dict), path
    unknown_keys = set(case) - {"description", "manifest", "observed", "inventory", "options", "expected"}
    assert not unknown_keys, f"{path.name}: unknown keys {unknown_keys}"
    return case


def run_case(path: Path) -> Plan:
    case = load_case(path)
    text = case["manifest"] if isinstance(case["manifest"], str) else yaml.safe_dump(case["manifest"])
    desired = manifest.loads(text, f"{path.name}#manifest")
    observed = Observed.from_dict({"format": "nephele.observed/v1", **case["observed"]})
    inventory = Inventory.from_dict(case["inventory"]) if case.get("inventory") else None
    opts = case.get("options") or {}
    options = PlanOptions(
        targets=tuple(opts.get("targets", ())),
        ignore_transfer_budget=opts.get("ignore_transfer_budget", False),
    )
    return plan(desired, observed, inventory, options)


def actual_view(a: Action, expected: dict[str, Any]) -> dict[str, Any]:
    full = a.to_dict()
    view = {"id": a.id, "kind": a.kind.value, "node": a.node, "depends_on": list(a.depends_on)}
    for key in OPTIONAL:
        if key in expected:
            view[key] = full[key]
    if "reason" in expected:
        view["reason"] = expected["reason"] if expected["reason"] in a.reason else a.reason
    return view


def expected_view(e: dict[str, Any]) -> dict[str, Any]:
    return {"depends_on": [], **e}


def matches(substrings: list[str], messages: list[str]) -> bool:
    return len(substrings) == len(messages) and all(s in m for s, m in zip(substrings, messages, strict=True))


CASE_FILES = sorted(CASES.glob("*.yaml"))


def test_there_are_enough_cases() -> None:
    assert len(CASE_FILES) >= 25


@pytest.mark.parametrize("path", CASE_FILES, ids=[p.stem for p in CASE_FILES])
def test_plan_case(path: Path) -> None:
    case = load_case(path)
    exp = case["expected"]
    result = run_case(path)
    exp_actions = [expected_view(e) for e in exp.get("actions", [])]
    got_actions = [
        actual_view(a, exp_actions[i] if i < len(exp_actions) else {}) for i, a in enumerate(result.actions)
    ]
    got: dict[str, list[Any]] = {
        "actions": got_actions,
        "warnings": [w.message for w in result.warnings],
        "errors": [e.message for e in result.errors],
        "unknown": [f"{u.address}@{u.node}" for u in result.unknown],
    }
    want: dict[str, list[Any]] = {
        "actions": exp_actions,
        "warnings": exp.get("warnings", []),
        "errors": exp.get("errors", []),
        "unknown": exp.get("unknown", []),
    }
    ok = (
        got["actions"] == want["actions"]
        and matches(want["warnings"], got["warnings"])
        and matches(want["errors"], got["errors"])
        and got["unknown"] == want["unknown"]
    )
    if not ok:
        print(f"--- {path.name}: {case.get('description', '')}")
        print("--- expected:\n" + yaml.safe_dump(want, sort_keys=False, allow_unicode=True))
        print("--- actual:\n" + yaml.safe_dump(got, sort_keys=False, allow_unicode=True))
    assert ok, f"{path.name}: plan differs from the expected one (both printed above)"
