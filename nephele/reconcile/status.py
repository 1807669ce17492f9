"""Status: per instance, where the manifest wants it and where it is, and one condition (Argo/Flux
vocabulary):

    Ready        on its desired node, in its desired state, with its desired ports
    Progressing  an apply is working on it right now, or a handoff of it is in flight
    Degraded     it differs from the manifest (missing, wrong node, state or ports), or the last apply
                 failed on it (the error is shown)
    Unknown      the node that should hold it did not answer, and no other node reports it

Pure: built from the manifest, a fresh observation, the apply record (status.json) and the lock.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from nephele.model import Desired, InstanceState, Observed, ObservedInstance

STATUS_FORMAT_VERSION = "1"


@dataclass(frozen=True)
class InstanceStatus:
    name: str
    desired_node: str
    desired_state: str
    desired_ports: tuple[str, ...]
    node: str | None  # where it is (None: nowhere that answered)
    state: str | None
    ports: tuple[str, ...]
    uuid: str | None
    condition: str
    reason: str
    last_error: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "desired": {
                "node": self.desired_node,
                "state": self.desired_state,
                "ports": list(self.desired_ports),
            },
            "actual": (
                {"node": self.node, "state": self.state, "ports": list(self.ports), "uuid": self.uuid}
                if self.node
                else None
            ),
            "condition": self.condition,
            "reason": self.reason,
            "last_error": self.last_error,
        }


def _copies(name: str, desired: Desired, observed: Observed) -> list[tuple[str, ObservedInstance]]:
    out = []
    for node, obs in observed.nodes.items():
        if obs.reachable:
            inst = obs.instances.get(name)
            if inst is not None and inst.manifest in (desired.name, None):
                out.append((node, inst))
    return out


def instance_statuses(
    desired: Desired,
    observed: Observed,
    *,
    errors: Mapping[str, str] | None = None,
    in_flight: Collection[str] = (),
    apply_running: bool = False,
) -> list[InstanceStatus]:
    """`errors`: address -> last error from the apply record; `in_flight`: addresses a running apply
    is acting on (from its journal)."""
    errors = errors or {}
    out = []
    for spec in desired.instances.values():
        address = f"instance/{spec.name}"
        copies = _copies(spec.name, desired, observed)
        here = next(((n, i) for n, i in copies if n == spec.node), None)
        rank = {InstanceState.RUNNING: 0, InstanceState.PAUSED: 1, InstanceState.STOPPED: 2}
        best = here or (min(copies, key=lambda c: rank[c[1].state]) if copies else None)
        want_ports = {str(p) for p in spec.ports}
        err = errors.get(address)
        target = observed.nodes.get(spec.node)
        condition, reason = "Ready", ""
        if best and best[1].handoff_url:
            condition, reason = "Progressing", f"handoff out of {best[0]} in flight ({best[1].handoff_url})"
        elif address in in_flight and apply_running:
            condition, reason = "Progressing", "an apply is acting on it now"
        elif best is None:
            if target is None or not target.reachable:
                since = f" since {target.since}" if target and target.since else ""
                condition, reason = "Unknown", f"node {spec.node} is unreachable{since}"
            elif spec.state is InstanceState.STOPPED:
                condition, reason = "Ready", "stopped (not created)"
            else:
                condition, reason = "Degraded", f"not on any node (desired on {spec.node})"
        elif best[0] != spec.node:
            condition, reason = "Degraded", f"on {best[0]}, the manifest places it on {spec.node}"
        elif best[1].state is not spec.state:
            condition, reason = "Degraded", f"{best[1].state.value}, the manifest says {spec.state.value}"
        elif spec.state is not InstanceState.STOPPED and {str(p) for p in best[1].ports} != want_ports:
            have = ", ".join(str(p) for p in best[1].ports) or "none"
            condition, reason = "Degraded", f"ports {have}, the manifest says {', '.join(sorted(want_ports))}"
        elif len(copies) > 1:
            others = ", ".join(n for n, _ in copies if n != spec.node)
            condition, reason = "Degraded", f"another copy is on {others}"
        if condition == "Degraded" and apply_running:
            condition, reason = "Progressing", f"{reason}; an apply is running"
        if condition == "Ready":
            err = None  # a past error that no longer shows is history, not a condition
        elif err and condition == "Degraded":
            reason = f"{reason}; last apply failed on it"
        out.append(
            InstanceStatus(
                name=spec.name,
                desired_node=spec.node,
                desired_state=spec.state.value,
                desired_ports=tuple(str(p) for p in spec.ports),
                node=best[0] if best else None,
                state=best[1].state.value if best else None,
                ports=tuple(str(p) for p in best[1].ports) if best else (),
                uuid=best[1].uuid if best else None,
                condition=condition,
                reason=reason,
                last_error=err,
            )
        )
    return out


def status_dict(
    desired: Desired,
    observed: Observed,
    instances: list[InstanceStatus],
    record: Mapping[str, Any],
    lock: Mapping[str, Any] | None,
    manifest_path: str,
    revision: Mapping[str, Any],
) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for s in instances:
        counts[s.condition] = counts.get(s.condition, 0) + 1
    return {
        "format_version": STATUS_FORMAT_VERSION,
        "manifest": desired.name,
        "manifest_path": manifest_path,
        "revision": dict(revision),
        "last_applied": record.get("last_applied"),
        "last_attempted": record.get("last_attempted"),
        "lock": dict(lock) if lock else None,
        "ready": all(s.condition == "Ready" for s in instances),
        "conditions": counts,
        "nodes": {
            n: {"reachable": o.reachable, "since": o.since, "error": o.error}
            if not o.reachable
            else {"reachable": True}
            for n, o in observed.nodes.items()
        },
        "instances": [s.to_dict() for s in instances],
    }


def render_json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _place(node: str | None, state: str | None, ports: tuple[str, ...]) -> str:
    if node is None:
        return "-"
    return f"{node} {state}" + (f" {','.join(ports)}" if ports else "")


def render_text(doc: Mapping[str, Any], instances: list[InstanceStatus]) -> str:
    lines = [f"Manifest {doc['manifest']} ({doc['manifest_path']}), revision {doc['revision']['text']}"]
    applied = doc.get("last_applied")
    lines.append(
        f"Last applied: {applied['revision']} at {applied['at']}"
        if applied
        else "Last applied: never (from here)"
    )
    attempted = doc.get("last_attempted")
    if attempted and not attempted.get("ok", True):
        lines.append(
            f"Last attempt: {attempted['revision']} at {attempted['at']} FAILED: {attempted.get('message')}"
        )
    if doc.get("lock"):
        lock = doc["lock"]
        lines.append(
            f"Apply running: {lock['holder']} (pid {lock['pid']}) since {lock['since']}, lock {lock['id']}"
        )
    lines.append("")
    rows = [("INSTANCE", "DESIRED", "ACTUAL", "CONDITION", "REASON")]
    for s in instances:
        rows.append(
            (
                s.name,
                _place(s.desired_node, s.desired_state, s.desired_ports),
                _place(s.node, s.state, s.ports),
                s.condition,
                s.reason,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        lines.append("  ".join(f"{c:<{w}}" for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    errors = [s for s in instances if s.last_error]
    if errors:
        lines.append("")
        lines.append("Last errors:")
        lines += [f"  {s.name}: {s.last_error}" for s in errors]
    dark = {n: v for n, v in doc["nodes"].items() if not v["reachable"]}
    lines.append("")
    if dark:
        lines.append("Unreachable nodes:")
        lines += [f"  {n}: since {v['since']}: {v['error']}" for n, v in dark.items()]
    n_ready = doc["conditions"].get("Ready", 0)
    summary = ", ".join(f"{v} {k}" for k, v in sorted(doc["conditions"].items()))
    lines.append(
        f"Ready: {n_ready} of {len(instances)} instance(s)" + (f" ({summary})" if summary else "") + "."
    )
    return "\n".join(lines) + "\n"
