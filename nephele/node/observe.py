"""Observation: the node's full state in the shape of nephele.model.NodeObservation, serialised with the
field names of `Observed.to_dict()` so the controller reads it with `Observed.from_dict`."""

from __future__ import annotations

from typing import Any

from nephele.model import (
    InstanceState,
    NodeObservation,
    Observed,
    ObservedImage,
    ObservedInstance,
    ObservedSnapshot,
    PortMap,
)
from nephele.node import instances, snapshots
from nephele.node.runtime import NodeContext


def _unique(key: str, taken: dict[str, Any], suffix: str) -> str:
    # Two images (or instances) may share a name on a node; keep both visible rather than drop one.
    return key if key not in taken else f"{key}@{suffix}"


def node_observation(ctx: NodeContext, node: str) -> NodeObservation:
    imgs: dict[str, ObservedImage] = {}
    for rec in ctx.store.list_images():
        key = _unique(rec.name, imgs, rec.short_id)
        imgs[key] = ObservedImage(
            name=key,
            content_id=rec.content_id,
            disk_bytes=rec.size_of("disk.raw"),
            memory_bytes=rec.size_of("memory.save"),
        )
    snaps: dict[str, ObservedSnapshot] = {}
    for sn in snapshots.ls(ctx, {}):
        key = _unique(sn["name"], snaps, sn["id"])
        snaps[key] = ObservedSnapshot(
            name=key, image=sn["image_name"], content_id=sn["content_id"], delta_bytes=sn["delta_bytes"]
        )
    insts: dict[str, ObservedInstance] = {}
    for r in instances.ps(ctx, {}):
        key = _unique(r["title"], insts, r["uuid"][:8])
        insts[key] = ObservedInstance(
            name=key,
            uuid=r["uuid"],
            snapshot=r["snapshot"],
            state=InstanceState(r["state"]) if r["state"] in ("running", "paused") else InstanceState.STOPPED,
            ports=tuple(PortMap.parse(p) for p in r["ports"]),
            started=r["started"],
            handoff_url=r["handoff_url"],
            manifest=r["manifest"],
            memory_bytes=r["memory_bytes"],
            prune=r["prune"],
        )
    return NodeObservation(node=node, images=imgs, snapshots=snaps, instances=insts)


def observe(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    node = str(args.get("node") or ctx.hostname)
    obs = node_observation(ctx, node)
    result: dict[str, Any] = Observed(nodes={node: obs}).to_dict()["nodes"][node]
    return result
