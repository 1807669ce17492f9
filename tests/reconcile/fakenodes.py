"""A fake cloudlet for executor tests: each node is a dict of images, snapshots and instances behind a
FakeTransport whose handler answers the agent ops apply uses, the way the node does (same result
shapes, typed errors). Faults: `down` nodes raise NodeUnreachable; `faults[(node, op)]` is a list of
exceptions raised by the next calls; `delay[op]` sleeps to make overlap measurable; `calls` records
(node, op, args, start, end) and `max_concurrent` the most ops in flight at once.

Handoffs: the fake answers the live handoff protocol that nephele.handoff.perform speaks
(handoff.prepare on the source, handoff.receive on the destination, handoff.send on the source); the
source's `handoff.send` is booked as op "instance.handoff" (calls, delay, faults, handoffs_in_flight),
the fake's one name for "the source side of a handoff", also answered directly.
"""

from __future__ import annotations

import json
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nephele.agent import FakeTransport, protocol
from nephele.errors import NepheleError, NodeUnreachable, RemoteError

CID = "ab" * 32
MUTATING = {
    "image.import",
    "image.import_delta",
    "image.rm",
    "snapshot.import",
    "snapshot.rm",
    "instance.run",
    "instance.start",
    "instance.stop",
    "instance.pause",
    "instance.resume",
    "instance.rm",
    "instance.set_ports",
    "instance.handoff",
}


@dataclass
class Inst:
    title: str
    uuid: str
    snapshot: str
    state: str = "running"
    ports: list[str] = field(default_factory=list)
    manifest: str | None = None
    prune: bool = True
    handoff_url: str | None = None


@dataclass
class Node:
    name: str
    images: dict[str, str] = field(default_factory=dict)  # name -> content id
    snapshots: dict[str, str] = field(default_factory=dict)  # name -> image
    instances: dict[str, Inst] = field(default_factory=dict)  # uuid -> instance
    files: set[str] = field(default_factory=set)


class FakeCloudlet:
    def __init__(self, *names: str) -> None:
        self.nodes = {n: Node(n) for n in names}
        self.down: set[str] = set()
        self.faults: dict[tuple[str, str], list[BaseException]] = {}
        self.delay: dict[str, float] = {}
        self.calls: list[tuple[str, str, dict[str, Any], float, float]] = []
        self.in_flight = 0
        self.max_concurrent = 0
        self.per_node_in_flight: dict[str, int] = {}
        self.max_per_node = 0
        self.handoffs_in_flight = 0
        self.max_handoffs = 0
        self.after: dict[tuple[str, str], Callable[[], None]] = {}  # run after an op succeeds
        self.lock = threading.Lock()
        self.made: list[str] = []
        self.handoff_done: dict[str, threading.Event] = {}
        self.handoff_dest: dict[str, str] = {}
        self.old_nodes: set[str] = set()  # nodes without the delta copy ops (an older nephele)

    # ---------------------------------------------------------------------------------- helpers

    def add_image(self, node: str, name: str = "tiny") -> None:
        self.nodes[node].images[name] = CID

    def add_snapshot(self, node: str, name: str = "web", image: str = "tiny") -> None:
        self.nodes[node].snapshots[name] = image

    def add_instance(self, node: str, title: str, **kw: Any) -> Inst:
        kw.setdefault("snapshot", "web")
        kw.setdefault("manifest", "demo")
        inst = Inst(title=title, uuid=kw.pop("uuid", str(uuidlib.uuid4())), **kw)
        self.nodes[node].instances[inst.uuid] = inst
        return inst

    def find(self, title: str) -> list[tuple[str, Inst]]:
        return [(n, i) for n, node in self.nodes.items() for i in node.instances.values() if i.title == title]

    def mutations(self) -> list[tuple[str, str]]:
        return [(n, op) for n, op, _, _, _ in self.calls if op in MUTATING]

    def factory(self, spec: Any) -> FakeTransport:
        return self.transport(spec.name)

    def transport(self, node: str) -> FakeTransport:
        t = _FileFakeTransport(lambda req: self.handle(node, req), node)
        t.cloudlet = self
        return t

    # ---------------------------------------------------------------------------------- handler

    def handle(
        self, node: str, req: dict[str, Any], progress: Callable[[str], None] | None = None
    ) -> dict[str, Any]:
        real_op, args = req["op"], req["args"]
        op = "instance.handoff" if real_op == "handoff.send" else real_op
        if node in self.down:
            raise NodeUnreachable("connection refused (fake)", node=node)
        with self.lock:
            queue = self.faults.get((node, op))
            fault = queue.pop(0) if queue else None
            self.in_flight += 1
            self.max_concurrent = max(self.max_concurrent, self.in_flight)
            if op != "observe":
                self.per_node_in_flight[node] = self.per_node_in_flight.get(node, 0) + 1
                self.max_per_node = max(self.max_per_node, self.per_node_in_flight[node])
            if op == "instance.handoff":
                self.handoffs_in_flight += 1
                self.max_handoffs = max(self.max_handoffs, self.handoffs_in_flight)
        start = time.monotonic()
        try:
            time.sleep(self.delay.get(op, 0.0))
            if fault is not None:
                raise fault
            try:
                if real_op.startswith("handoff."):
                    result = self.handoff_op(node, real_op, args, progress or (lambda line: None))
                else:
                    result = self.op(self.nodes[node], op, args)
            except NepheleError as exc:
                return protocol.error_response(req["id"], getattr(exc, "kind", "node"), str(exc))
            hook = self.after.pop((node, op), None)
            if hook:
                hook()
            return protocol.ok_response(req["id"], result)
        finally:
            with self.lock:
                self.in_flight -= 1
                if op != "observe":
                    self.per_node_in_flight[node] -= 1
                if op == "instance.handoff":
                    self.handoffs_in_flight -= 1
                self.calls.append((node, op, dict(args), start, time.monotonic()))

    def handoff_op(self, node: str, op: str, args: dict[str, Any], progress: Callable[[str], None]) -> Any:
        """The live handoff protocol (nephele.handoff.controller.perform), faked."""
        if op == "handoff.prepare":
            i = self._select(self.nodes[node], args["instance"])
            with self.lock:
                self.handoff_done[i.uuid] = threading.Event()
            return {"title": i.title, "uuid": i.uuid, "state": i.state}
        if op == "handoff.receive":
            uuid = args["instance"]["uuid"]
            with self.lock:
                self.handoff_dest[uuid] = node
            ready = {"event": "ready", "memory_port": 1, "disk_port": 2, "refs": []}
            progress("@handoff " + json.dumps(ready))
            if not self.handoff_done[uuid].wait(30):
                raise RemoteError("handoff", "the source never sent")
            return {"downtime_s": 0.05, "stats_file": f"/var/nephele/logs/{uuid}.stats"}
        if op == "handoff.send":
            src = self.nodes[node]
            i = src.instances[args["uuid"]]
            ev = {"event": "progress", "iteration": 1, "wire_bytes": 2**20, "rate_bps": 2.5e6, "eta_s": 1}
            progress("@handoff " + json.dumps(ev))
            progress("43%")
            del src.instances[i.uuid]
            self.nodes[self.handoff_dest[i.uuid]].instances[i.uuid] = i
            self.handoff_done[i.uuid].set()
            return {"elapsed_s": 0.2}
        raise RemoteError("unsupported", f"unknown op {op!r}")

    def _select(self, n: Node, ref: str) -> Inst:
        if ref in n.instances:
            return n.instances[ref]
        hits = [i for i in n.instances.values() if i.title == ref]
        if len(hits) != 1:
            raise RemoteError("not_found", f"no instance {ref!r}")
        return hits[0]

    def op(self, n: Node, op: str, args: dict[str, Any]) -> Any:
        match op:
            case "observe":
                return {
                    "reachable": True,
                    "images": {k: {"content_id": v} for k, v in n.images.items()},
                    "snapshots": {k: {"image": v, "content_id": f"{k}-cid"} for k, v in n.snapshots.items()},
                    "instances": {
                        i.title: {
                            "uuid": i.uuid,
                            "snapshot": i.snapshot,
                            "state": i.state,
                            "ports": i.ports,
                            "manifest": i.manifest,
                            "prune": i.prune,
                            "handoff_url": i.handoff_url,
                        }
                        for i in n.instances.values()
                    },
                }
            case "image.export_delta" | "image.import_delta" | "copy.discard" if n.name in self.old_nodes:
                raise RemoteError("unsupported", f"unknown op {op!r}")
            case "copy.discard":
                n.files.discard(args["path"])
                return {"path": args["path"], "removed": True}
            case "image.export_delta":
                n.files.add(args["dest"])
                shared = sorted(set(args["refs"]) & set(n.images.values()))
                return {"file": args["dest"], "file_bytes": 11, "whole_bytes": 1000, "refs": shared}
            case "image.import" | "snapshot.import" | "image.import_delta":
                if args["path"] not in n.files:
                    raise RemoteError("invalid_input", f"{args['path']}: no such file")
                n.files.discard(args["path"])  # an import removes its upload, as the node's does
                if op in ("image.import", "image.import_delta"):
                    n.images[args["name"]] = CID
                else:
                    n.snapshots[args["name"]] = "tiny"
                return {"name": args["name"], "created_new": True}
            case "image.export" | "snapshot.export":
                n.files.add(args["dest"])
                return {"file": args["dest"]}
            case "image.rm":
                name = next((k for k, v in n.images.items() if v == args["id"] or k == args["id"]), None)
                if name is None:
                    raise RemoteError("not_found", "no image")
                del n.images[name]
                return {"removed": True}
            case "snapshot.rm":
                ref = args["name"]
                if not any(ref in (k, f"{k}-cid") for k in n.snapshots):
                    raise RemoteError("not_found", f"no snapshot {ref!r}")
                n.snapshots = {k: v for k, v in n.snapshots.items() if ref not in (k, f"{k}-cid")}
                return {"removed": True}
            case "instance.run":
                if args["snapshot"] not in n.snapshots:
                    raise RemoteError("not_found", f"no snapshot {args['snapshot']!r}")
                held = {
                    p.split(":")[0] for i in n.instances.values() if i.state != "stopped" for p in i.ports
                }
                for p in args.get("ports", []):
                    if p.split(":")[0] in held:
                        raise RemoteError("conflict", f"host port {p} is already forwarded")
                inst = Inst(
                    title=args["title"],
                    uuid=str(uuidlib.uuid4()),
                    snapshot=args["snapshot"],
                    ports=list(args.get("ports", [])),
                    manifest=args.get("manifest"),
                    prune=args.get("prune", True),
                )
                n.instances[inst.uuid] = inst
                self.made.append(inst.title)
                return {"uuid": inst.uuid, "title": inst.title, "state": "running"}
            case "instance.start" | "instance.resume":
                i = self._select(n, args["instance"])
                i.state = "running"
                return {"uuid": i.uuid, "state": i.state}
            case "instance.stop":
                i = self._select(n, args["instance"])
                i.state = "stopped"
                return {"uuid": i.uuid, "state": i.state}
            case "instance.pause":
                i = self._select(n, args["instance"])
                i.state = "paused"
                return {"uuid": i.uuid, "state": i.state}
            case "instance.set_ports":
                i = self._select(n, args["instance"])
                i.ports = list(args["ports"])
                return {"uuid": i.uuid}
            case "instance.rm":
                i = self._select(n, args["instance"])
                del n.instances[i.uuid]
                return {"uuid": i.uuid, "state": "removed"}
            case "instance.handoff":
                i = self._select(n, args["instance"])
                dest = self.nodes[args["dest_node"]]
                del n.instances[i.uuid]
                dest.instances[i.uuid] = i
                return {"summary": f"moved to {args['dest_node']}"}
        raise RemoteError("unsupported", f"unknown op {op!r}")


def fake_handoff(req: Any) -> str:
    """A HandoffFn for the fake cloudlet: the source node's fake `instance.handoff` moves the record."""
    from nephele.agent import Agent

    Agent(req.source).call(
        "instance.handoff",
        {"instance": req.uuid or req.instance, "dest_node": req.dest_spec.name, "mode": req.mode},
        progress=req.progress,
    )
    req.progress("43%")
    return f"moved to {req.dest_spec.name}"


class _FileFakeTransport(FakeTransport):
    """File copies land in the fake node's file set instead of the local disk."""

    cloudlet: FakeCloudlet

    def call(self, request: Any, *, timeout: float | None = None, progress: Any = None) -> Any:
        self.requests.append(request)
        return self.cloudlet.handle(self.node, request, progress)

    def put_file(self, local: str | Path, remote: str) -> None:
        assert Path(local).is_file(), local
        self.cloudlet.nodes[self.node].files.add(remote)

    def get_file(self, remote: str, local: str | Path) -> None:
        if remote not in self.cloudlet.nodes[self.node].files:
            raise RemoteError("not_found", f"{remote}: no such file", node=self.node)
        Path(local).write_bytes(b"fake export")
