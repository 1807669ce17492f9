"""The plan as a value: actions, their preconditions and dependencies, diagnostics, and the Plan itself.

Everything here is a frozen dataclass with a JSON form (`to_dict` / `from_dict`) so that a saved plan can
be read back exactly (`nephele plan -out`, later `nephele apply PLANFILE`). The JSON layout is
`PLAN_FORMAT_VERSION` "1", documented in docs/plan.md; change it only additively, or bump the version.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nephele.model import InstanceState, PortMap

PLAN_FORMAT_VERSION = "1"


class ActionKind(enum.StrEnum):
    IMPORT_IMAGE = "import_image"
    REMOVE_IMAGE = "remove_image"
    DISTRIBUTE_SNAPSHOT = "distribute_snapshot"
    REMOVE_SNAPSHOT = "remove_snapshot"
    START_INSTANCE = "start_instance"
    STOP_INSTANCE = "stop_instance"
    PAUSE_INSTANCE = "pause_instance"
    RESUME_INSTANCE = "resume_instance"
    CHANGE_PORTS = "change_ports"
    HANDOFF = "handoff"
    PRUNE = "prune"


# The Terraform-style symbol of each kind, and the summary bucket it is counted in.
SYMBOL: Mapping[ActionKind, str] = {
    ActionKind.IMPORT_IMAGE: "+",
    ActionKind.DISTRIBUTE_SNAPSHOT: "+",
    ActionKind.START_INSTANCE: "+",
    ActionKind.REMOVE_IMAGE: "-",
    ActionKind.REMOVE_SNAPSHOT: "-",
    ActionKind.STOP_INSTANCE: "-",
    ActionKind.PRUNE: "-",
    ActionKind.CHANGE_PORTS: "~",
    ActionKind.PAUSE_INSTANCE: "~",
    ActionKind.RESUME_INSTANCE: "~",
    ActionKind.HANDOFF: "»",
}
BUCKET: Mapping[ActionKind, str] = {
    ActionKind.START_INSTANCE: "start",
    ActionKind.CHANGE_PORTS: "change",
    ActionKind.PAUSE_INSTANCE: "change",
    ActionKind.RESUME_INSTANCE: "change",
    ActionKind.HANDOFF: "handoff",
    ActionKind.STOP_INSTANCE: "stop",
    ActionKind.PRUNE: "prune",
    ActionKind.REMOVE_IMAGE: "prune",
    ActionKind.REMOVE_SNAPSHOT: "prune",
    ActionKind.IMPORT_IMAGE: "import",
    ActionKind.DISTRIBUTE_SNAPSHOT: "import",
}
BUCKETS = ("start", "change", "handoff", "stop", "prune", "import")


class Fact(enum.StrEnum):
    """An observable fact an action relies on; apply re-checks them against a fresh observation."""

    IMAGE_PRESENT = "image_present"  # name on node, with content_id when known
    IMAGE_ABSENT = "image_absent"
    SNAPSHOT_PRESENT = "snapshot_present"
    SNAPSHOT_ABSENT = "snapshot_absent"
    INSTANCE = "instance"  # name on node with uuid and state
    INSTANCE_ABSENT = "instance_absent"
    PORT_FREE = "port_free"  # no running/paused instance on node holds host port `port`


@dataclass(frozen=True)
class Precondition:
    fact: Fact
    node: str
    name: str = ""
    uuid: str = ""
    state: str = ""
    content_id: str = ""
    port: int = 0

    def describe(self) -> str:
        match self.fact:
            case Fact.IMAGE_PRESENT:
                cid = f" with content id {self.content_id[:12]}" if self.content_id else ""
                return f"image {self.name} present on {self.node}{cid}"
            case Fact.IMAGE_ABSENT:
                return f"image {self.name} absent from {self.node}"
            case Fact.SNAPSHOT_PRESENT:
                cid = f" with content id {self.content_id[:12]}" if self.content_id else ""
                return f"snapshot {self.name} present on {self.node}{cid}"
            case Fact.SNAPSHOT_ABSENT:
                return f"snapshot {self.name} absent from {self.node}"
            case Fact.INSTANCE:
                uuid = f" with uuid {self.uuid}" if self.uuid else ""
                return f"instance {self.name} {self.state} on {self.node}{uuid}"
            case Fact.INSTANCE_ABSENT:
                return f"instance {self.name} absent from {self.node}"
            case Fact.PORT_FREE:
                return f"host port {self.port} free on {self.node}"
        raise AssertionError(self.fact)  # pragma: no cover - the match is exhaustive

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fact": self.fact.value, "node": self.node}
        for key in ("name", "uuid", "state", "content_id", "port"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        out["description"] = self.describe()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Precondition:
        return cls(
            fact=Fact(d["fact"]),
            node=str(d["node"]),
            name=str(d.get("name", "")),
            uuid=str(d.get("uuid", "")),
            state=str(d.get("state", "")),
            content_id=str(d.get("content_id", "")),
            port=int(d.get("port", 0)),
        )


@dataclass(frozen=True)
class Estimate:
    """What a transfer is expected to cost, from the model in estimate.py (a model, not a measurement)."""

    bytes: int
    seconds: float
    link_mbit: float
    model: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes": self.bytes,
            "seconds": self.seconds,
            "link_mbit": self.link_mbit,
            "model": self.model,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Estimate:
        return cls(int(d["bytes"]), float(d["seconds"]), float(d["link_mbit"]), str(d["model"]))


@dataclass(frozen=True)
class Action:
    """One step of a plan. `node` is where it acts (the target of a handoff or a copy); `source_node` is
    where a handoff or a snapshot copy comes from (None: from the controller's `source` file)."""

    id: str
    kind: ActionKind
    address: str  # "instance/web-1", "image/tiny", "snapshot/web"
    node: str
    reason: str
    source_node: str | None = None
    depends_on: tuple[str, ...] = ()
    preconditions: tuple[Precondition, ...] = ()
    ports: tuple[PortMap, ...] = ()  # the instance's ports after the action
    old_ports: tuple[PortMap, ...] = ()  # before (change_ports, stop, handoff, prune)
    state: InstanceState | None = None  # the instance's state after the action (start, handoff)
    source: str | None = None  # import / distribute: the file to copy when no node has it
    mode: str | None = None  # handoff: "live" (running/paused) or "cold" (stopped)
    wave: int | None = None  # handoff: 1-based wave, see plan.assign_waves
    estimate: Estimate | None = None

    @property
    def symbol(self) -> str:
        return SYMBOL[self.kind]

    @property
    def name(self) -> str:
        return self.address.partition("/")[2]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind.value,
            "symbol": self.symbol,
            "address": self.address,
            "node": self.node,
            "source_node": self.source_node,
            "reason": self.reason,
            "depends_on": list(self.depends_on),
            "preconditions": [p.to_dict() for p in self.preconditions],
            "ports": [str(p) for p in self.ports],
            "old_ports": [str(p) for p in self.old_ports],
            "state": self.state.value if self.state else None,
            "source": self.source,
            "mode": self.mode,
            "wave": self.wave,
            "estimate": self.estimate.to_dict() if self.estimate else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Action:
        est = d.get("estimate")
        return cls(
            id=str(d["id"]),
            kind=ActionKind(d["kind"]),
            address=str(d["address"]),
            node=str(d["node"]),
            reason=str(d["reason"]),
            source_node=d.get("source_node"),
            depends_on=tuple(d.get("depends_on", ())),
            preconditions=tuple(Precondition.from_dict(p) for p in d.get("preconditions", ())),
            ports=tuple(PortMap.parse(p) for p in d.get("ports", ())),
            old_ports=tuple(PortMap.parse(p) for p in d.get("old_ports", ())),
            state=InstanceState(d["state"]) if d.get("state") else None,
            source=d.get("source"),
            mode=d.get("mode"),
            wave=d.get("wave"),
            estimate=Estimate.from_dict(est) if est else None,
        )


@dataclass(frozen=True)
class Diagnostic:
    """A warning or an error about one address (or the whole plan when address is empty)."""

    message: str
    address: str = ""

    def __str__(self) -> str:
        return self.message

    def to_dict(self) -> dict[str, str]:
        return {"address": self.address, "message": self.message}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Diagnostic:
        return cls(message=str(d["message"]), address=str(d.get("address", "")))


@dataclass(frozen=True)
class Unknown:
    """An object whose state cannot be known because its node did not answer."""

    address: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"address": self.address, "node": self.node, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Unknown:
        return cls(str(d["address"]), str(d["node"]), str(d["reason"]))


@dataclass(frozen=True)
class Plan:
    """The result of plan(): actions in a valid order (every dependency before its dependents)."""

    manifest: str
    actions: tuple[Action, ...] = ()
    warnings: tuple[Diagnostic, ...] = ()
    errors: tuple[Diagnostic, ...] = ()
    unknown: tuple[Unknown, ...] = ()
    targets: tuple[str, ...] = ()
    transfer_budget_bytes: int | None = None
    max_parallel_handoffs: int = 1
    meta: Mapping[str, Any] = field(default_factory=dict)  # e.g. the manifest file and its hash

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)

    def action(self, action_id: str) -> Action:
        for a in self.actions:
            if a.id == action_id:
                return a
        raise KeyError(action_id)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(BUCKETS, 0)
        for a in self.actions:
            out[BUCKET[a.kind]] += 1
        return out

    def handoff_totals(self) -> tuple[int, float]:
        """Bytes over all handoffs, and time if waves run one after another and a wave lasts as long
        as its slowest handoff."""
        total_bytes = 0
        by_wave: dict[int, float] = {}
        for a in self.actions:
            if a.kind is ActionKind.HANDOFF and a.estimate:
                total_bytes += a.estimate.bytes
                w = a.wave or 0
                by_wave[w] = max(by_wave.get(w, 0.0), a.estimate.seconds)
        return total_bytes, sum(by_wave.values(), 0.0)

    def summary(self) -> dict[str, Any]:
        total_bytes, seconds = self.handoff_totals()
        return {
            **self.counts(),
            "total": len(self.actions),
            "handoff_bytes": total_bytes,
            "handoff_seconds": round(seconds, 3),
            "handoff_waves": len({a.wave for a in self.actions if a.kind is ActionKind.HANDOFF}),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "manifest": self.manifest,
            "meta": dict(self.meta),
            "changes": self.has_changes,
            "targets": list(self.targets),
            "policy": {
                "transfer_budget_bytes": self.transfer_budget_bytes,
                "max_parallel_handoffs": self.max_parallel_handoffs,
            },
            "summary": self.summary(),
            "actions": [a.to_dict() for a in self.actions],
            "unknown": [u.to_dict() for u in self.unknown],
            "warnings": [w.to_dict() for w in self.warnings],
            "errors": [e.to_dict() for e in self.errors],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        version = d.get("format_version")
        if version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"unsupported plan format_version {version!r} (expected {PLAN_FORMAT_VERSION!r})"
            )
        policy = d.get("policy") or {}
        return cls(
            manifest=str(d["manifest"]),
            actions=tuple(Action.from_dict(a) for a in d.get("actions", ())),
            warnings=tuple(Diagnostic.from_dict(w) for w in d.get("warnings", ())),
            errors=tuple(Diagnostic.from_dict(e) for e in d.get("errors", ())),
            unknown=tuple(Unknown.from_dict(u) for u in d.get("unknown", ())),
            targets=tuple(d.get("targets", ())),
            transfer_budget_bytes=policy.get("transfer_budget_bytes"),
            max_parallel_handoffs=int(policy.get("max_parallel_handoffs", 1)),
            meta=dict(d.get("meta") or {}),
        )


def action_id(kind: ActionKind, address: str, node: str | None = None) -> str:
    """Stable ids: `handoff:instance/web-1`; per-node objects and stray instance copies add `@node`."""
    return f"{kind.value}:{address}@{node}" if node else f"{kind.value}:{address}"
