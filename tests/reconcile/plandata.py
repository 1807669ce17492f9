"""Shared inputs for the planner unit tests: one small manifest and observations built in code."""

from __future__ import annotations

from typing import Any

MANIFEST = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  edge-a: {address: 10.0.0.1}
  edge-b: {address: 10.0.0.2}
images:
  tiny: {source: tiny.zip}
snapshots:
  web: {image: tiny, source: web.zip}
instances:
  web-1: {snapshot: web, node: edge-b, ports: ["8080:80"]}
  web-2: {snapshot: web, node: edge-a, ports: ["9090:80"]}
policy: {prune: true}
"""


def inst(uuid: str, state: str = "running", ports: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
    return {
        "uuid": uuid,
        "snapshot": "web",
        "state": state,
        "ports": list(ports),
        "manifest": "demo",
        **extra,
    }


def observed_dict() -> dict[str, Any]:
    """web-1 runs on edge-a (desired edge-b: a handoff); web-2 is not there yet (a start)."""
    base = {"images": {"tiny": {"content_id": "aa" * 32}}, "snapshots": {"web": {"image": "tiny"}}}
    return {
        "format": "nephele.observed/v1",
        "nodes": {
            "edge-a": {
                **base,
                "instances": {"web-1": inst("u1", ports=("8080:80",), dirty_bytes=100 * 2**20)},
            },
            "edge-b": base,
        },
    }
