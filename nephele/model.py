"""The shared vocabulary: what the user wants (Desired, from the manifest) and what the nodes have
(Observed, from the agents, or from a recorded JSON file). Plain frozen dataclasses, no I/O.

Identity: nodes, images, snapshots and instances are named by the manifest. On a node, an image is
also known by its content id (sha256 hex of its disk and memory, see node/), an instance by its
libvirt UUID; `title` on a node is the manifest's instance name.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MANIFEST_API_VERSION = "nephele.dev/v1"
OBSERVED_FORMAT = "nephele.observed/v1"


class InstanceState(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass(frozen=True, order=True)
class PortMap:
    """A host port on the instance's node forwarded to a guest port."""

    host: int
    guest: int

    def __str__(self) -> str:
        return f"{self.host}:{self.guest}"

    @classmethod
    def parse(cls, text: str) -> PortMap:
        host, _, guest = text.partition(":")
        return cls(int(host), int(guest or host))


# ---------------------------------------------------------------------------------------- desired


@dataclass(frozen=True)
class NodeSpec:
    name: str
    address: str
    ssh_user: str = "root"
    ssh_port: int = 22
    ssh_key: str | None = None
    handoff_port: int = 8022
    root: str = "/var/nephele"
    link_mbit: float | None = None  # uplink rate used for handoff estimates; policy default if None
    max_bandwidth_mbit: float | None = None  # cap on what a handoff into or out of this node sends


@dataclass(frozen=True)
class ImageSpec:
    name: str
    source: str | None
    nodes: tuple[str, ...]  # where it must be present (the manifest default is every node)
    content_id: str | None = None  # pin: expected content id (prefix) of the image


@dataclass(frozen=True)
class SnapshotSpec:
    name: str
    image: str
    source: str | None
    nodes: tuple[str, ...] = ()  # extra nodes to pre-stage it on; instances' nodes always get it


@dataclass(frozen=True)
class InstanceSpec:
    name: str
    snapshot: str
    node: str
    ports: tuple[PortMap, ...] = ()
    state: InstanceState = InstanceState.RUNNING
    prune: bool = True  # False: never pruned even when removed from the manifest


@dataclass(frozen=True)
class Policy:
    prune: bool = False
    parallelism: int = 4
    max_parallel_handoffs: int = 1
    max_handoffs_per_node: int = 1
    downtime_budget_s: float = 5.0
    transfer_budget_bytes: int | None = None
    link_mbit: float = 20.0  # default node-to-node link rate for estimates
    max_bandwidth_mbit: float | None = None  # cap on every handoff's rate (nodes may set lower ones)
    handoff_timeout_s: float | None = None  # a handoff not converged by then is given up (VM stays put)
    auto_converge: bool = True  # QEMU may slow a guest that dirties memory faster than the link carries


def bandwidth_cap(policy: Policy, *nodes: NodeSpec) -> float | None:
    """The rate cap (Mbit/s) of a transfer between these nodes: the lowest the policy and either end
    set, None when nobody set one."""
    caps = [c for c in (policy.max_bandwidth_mbit, *(n.max_bandwidth_mbit for n in nodes)) if c is not None]
    return min(caps) if caps else None


@dataclass(frozen=True)
class Desired:
    """A validated manifest. Mappings keep the manifest's order."""

    name: str
    nodes: Mapping[str, NodeSpec]
    images: Mapping[str, ImageSpec]
    snapshots: Mapping[str, SnapshotSpec]
    instances: Mapping[str, InstanceSpec]
    policy: Policy = field(default_factory=Policy)
    source: str = "<manifest>"


# --------------------------------------------------------------------------------------- observed


@dataclass(frozen=True)
class ObservedImage:
    name: str
    content_id: str
    disk_bytes: int = 0
    memory_bytes: int = 0


@dataclass(frozen=True)
class ObservedSnapshot:
    name: str
    image: str  # image name
    content_id: str = ""
    delta_bytes: int = 0  # size of the stored delta (what a copy would move before dedup)


@dataclass(frozen=True)
class ObservedInstance:
    name: str  # the manifest's instance name (libvirt title)
    uuid: str
    snapshot: str
    state: InstanceState
    ports: tuple[PortMap, ...] = ()
    started: str | None = None
    handoff_url: str | None = None  # set while a handoff out of this node runs
    manifest: str | None = None  # which manifest created it (ownership); None = not nephele's
    memory_bytes: int = 0
    dirty_bytes: int = 0  # bytes of memory+disk differing from its image, if the node knows
    prune: bool = True  # the instance's `prune` flag, kept on the node so a removed instance keeps it


@dataclass(frozen=True)
class NodeObservation:
    node: str
    reachable: bool = True
    since: str | None = None  # when it was first seen unreachable (ISO 8601)
    error: str | None = None
    images: Mapping[str, ObservedImage] = field(default_factory=dict)
    snapshots: Mapping[str, ObservedSnapshot] = field(default_factory=dict)
    instances: Mapping[str, ObservedInstance] = field(default_factory=dict)

    @classmethod
    def unreachable(cls, node: str, since: str | None, error: str) -> NodeObservation:
        return cls(node=node, reachable=False, since=since, error=error)


@dataclass(frozen=True)
class Observed:
    nodes: Mapping[str, NodeObservation]

    def to_dict(self) -> dict[str, Any]:
        return {"format": OBSERVED_FORMAT, "nodes": {n: _node_to_dict(o) for n, o in self.nodes.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Observed:
        """Read a recorded observation (`nephele plan --observed FILE`). Raises ValueError/KeyError/TypeError
        on malformed input; the CLI turns those into a message naming the file."""
        fmt = data.get("format", OBSERVED_FORMAT)
        if fmt != OBSERVED_FORMAT:
            raise ValueError(f"unsupported observed-state format {fmt!r} (expected {OBSERVED_FORMAT!r})")
        return cls(nodes={name: _node_from_dict(name, raw) for name, raw in data["nodes"].items()})


def _node_to_dict(o: NodeObservation) -> dict[str, Any]:
    if not o.reachable:
        return {"reachable": False, "since": o.since, "error": o.error}
    return {
        "reachable": True,
        "images": {
            k: {"content_id": v.content_id, "disk_bytes": v.disk_bytes, "memory_bytes": v.memory_bytes}
            for k, v in o.images.items()
        },
        "snapshots": {
            k: {"image": v.image, "content_id": v.content_id, "delta_bytes": v.delta_bytes}
            for k, v in o.snapshots.items()
        },
        "instances": {
            k: {
                "uuid": v.uuid,
                "snapshot": v.snapshot,
                "state": v.state.value,
                "ports": [str(p) for p in v.ports],
                "started": v.started,
                "handoff_url": v.handoff_url,
                "manifest": v.manifest,
                "memory_bytes": v.memory_bytes,
                "dirty_bytes": v.dirty_bytes,
                "prune": v.prune,
            }
            for k, v in o.instances.items()
        },
    }


def _node_from_dict(name: str, raw: Mapping[str, Any]) -> NodeObservation:
    if not raw.get("reachable", True):
        return NodeObservation.unreachable(name, raw.get("since"), raw.get("error") or "unreachable")
    images = {
        k: ObservedImage(k, v["content_id"], int(v.get("disk_bytes", 0)), int(v.get("memory_bytes", 0)))
        for k, v in (raw.get("images") or {}).items()
    }
    snapshots = {
        k: ObservedSnapshot(k, v["image"], v.get("content_id", ""), int(v.get("delta_bytes", 0)))
        for k, v in (raw.get("snapshots") or {}).items()
    }
    instances = {
        k: ObservedInstance(
            name=k,
            uuid=v.get("uuid", ""),
            snapshot=v["snapshot"],
            state=InstanceState(v.get("state", "running")),
            ports=tuple(PortMap.parse(p) for p in v.get("ports", ())),
            started=v.get("started"),
            handoff_url=v.get("handoff_url"),
            manifest=v.get("manifest"),
            memory_bytes=int(v.get("memory_bytes", 0)),
            dirty_bytes=int(v.get("dirty_bytes", 0)),
            prune=bool(v.get("prune", True)),
        )
        for k, v in (raw.get("instances") or {}).items()
    }
    return NodeObservation(node=name, images=images, snapshots=snapshots, instances=instances)


@dataclass(frozen=True)
class InventoryEntry:
    kind: str  # "image" | "snapshot" | "instance"
    name: str
    node: str


@dataclass(frozen=True)
class Inventory:
    """What nephele created for one manifest (Flux-style inventory): only these may be pruned."""

    manifest: str
    entries: frozenset[InventoryEntry] = frozenset()

    def owns(self, kind: str, name: str, node: str) -> bool:
        return InventoryEntry(kind, name, node) in self.entries

    def to_dict(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "entries": [
                {"kind": e.kind, "name": e.name, "node": e.node}
                for e in sorted(self.entries, key=lambda e: (e.kind, e.name, e.node))
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inventory:
        return cls(
            manifest=data["manifest"],
            entries=frozenset(
                InventoryEntry(e["kind"], e["name"], e["node"]) for e in data.get("entries", ())
            ),
        )
