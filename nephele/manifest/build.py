"""Validated manifest data -> the typed Desired state (nephele.model). Defaults live in the model's
dataclasses; this module only fills what the manifest says."""

from __future__ import annotations

from typing import Any

from nephele.manifest.units import parse_duration, parse_size
from nephele.model import (
    Desired,
    ImageSpec,
    InstanceSpec,
    InstanceState,
    NodeSpec,
    Policy,
    PortMap,
    SnapshotSpec,
)


def build(data: dict[str, Any], source: str) -> Desired:
    """Only called on data that passed the schema and the cross-reference checks."""
    nodes = {name: _node(name, spec) for name, spec in data["nodes"].items()}
    images = {
        name: ImageSpec(
            name=name,
            source=spec.get("source"),
            nodes=tuple(spec.get("nodes", nodes)),
            content_id=spec.get("id"),
        )
        for name, spec in (data.get("images") or {}).items()
    }
    snapshots = {
        name: SnapshotSpec(
            name=name, image=spec["image"], source=spec.get("source"), nodes=tuple(spec.get("nodes", ()))
        )
        for name, spec in (data.get("snapshots") or {}).items()
    }
    instances = {
        name: InstanceSpec(
            name=name,
            snapshot=spec["snapshot"],
            node=spec["node"],
            ports=tuple(PortMap.parse(p) for p in spec.get("ports", ())),
            state=InstanceState(spec.get("state", InstanceState.RUNNING.value)),
            prune=spec.get("prune", InstanceSpec.prune),
        )
        for name, spec in (data.get("instances") or {}).items()
    }
    return Desired(
        name=data["metadata"]["name"],
        nodes=nodes,
        images=images,
        snapshots=snapshots,
        instances=instances,
        policy=_policy(data.get("policy") or {}),
        source=source,
    )


def _node(name: str, spec: dict[str, Any]) -> NodeSpec:
    ssh = spec.get("ssh") or {}
    link = spec.get("linkMbit")
    cap = spec.get("maxBandwidthMbit")
    return NodeSpec(
        name=name,
        address=spec["address"],
        ssh_user=ssh.get("user", NodeSpec.ssh_user),
        ssh_port=ssh.get("port", NodeSpec.ssh_port),
        ssh_key=ssh.get("key"),
        handoff_port=spec.get("handoffPort", NodeSpec.handoff_port),
        root=spec.get("root", NodeSpec.root),
        link_mbit=float(link) if link is not None else None,
        max_bandwidth_mbit=float(cap) if cap is not None else None,
    )


def _policy(spec: dict[str, Any]) -> Policy:
    d = Policy()
    downtime = spec.get("downtimeBudget")
    transfer = spec.get("transferBudget")
    cap = spec.get("maxBandwidthMbit")
    timeout = spec.get("handoffTimeout")
    return Policy(
        prune=spec.get("prune", d.prune),
        parallelism=spec.get("parallelism", d.parallelism),
        max_parallel_handoffs=spec.get("maxParallelHandoffs", d.max_parallel_handoffs),
        max_handoffs_per_node=spec.get("maxHandoffsPerNode", d.max_handoffs_per_node),
        downtime_budget_s=parse_duration(downtime) if downtime is not None else d.downtime_budget_s,
        transfer_budget_bytes=parse_size(transfer) if transfer is not None else d.transfer_budget_bytes,
        link_mbit=float(spec.get("linkMbit", d.link_mbit)),
        max_bandwidth_mbit=float(cap) if cap is not None else d.max_bandwidth_mbit,
        # 0 (like no value): no limit
        handoff_timeout_s=(parse_duration(timeout) or None) if timeout is not None else d.handoff_timeout_s,
        auto_converge=bool(spec.get("autoConverge", d.auto_converge)),
    )
