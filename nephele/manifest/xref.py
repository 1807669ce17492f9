"""Rules that relate one part of the manifest to another, which JSON Schema cannot express.

They run on the raw data even when the schema found problems (so that every problem is reported at
once), and skip whatever is not shaped as the schema wants: the schema already reported that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from nephele.errors import Problem
from nephele.manifest.yamlpos import Path, Positions, format_path

# The schema's name rule: a reference that breaks it was reported by the schema already.
_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


def _map(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _entries(data: Mapping[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, spec) for name, spec in _map(data, key).items() if isinstance(spec, dict)]


def _names(spec: Mapping[str, Any], key: str) -> list[tuple[int, str]]:
    value = spec.get(key)
    if not isinstance(value, list):
        return []
    return [(i, v) for i, v in enumerate(value) if isinstance(v, str)]


def _host_port(text: Any) -> int | None:
    if not isinstance(text, str):
        return None
    host, sep, guest = text.partition(":")
    if not (sep and host.isdigit() and guest.isdigit()):
        return None
    return int(host)


def check(data: Any, pos: Positions) -> list[Problem]:
    if not isinstance(data, dict):
        return []
    problems: list[Problem] = []
    nodes = _map(data, "nodes")
    images = _map(data, "images")
    snapshots = _map(data, "snapshots")

    def unknown(path: Path, value: str, kind: str) -> None:
        if _NAME.match(value):
            problems.append(pos.problem(path, f"'{value}' is not a declared {kind}"))

    for name, spec in _entries(data, "nodes"):
        (handoff, handoff_default, _), (ssh, _, _) = _node_ports(spec)
        if handoff == ssh:
            # Point at whichever of the two was written (handoffPort if both were).
            at: Path = ("nodes", name, "handoffPort")
            other = "ssh.port"
            if handoff_default:
                at, other = ("nodes", name, "ssh", "port"), "handoffPort"
            problems.append(pos.problem(at, f"{handoff} is also the node's {other}"))

    # Where each image must be present; the default is every node.
    image_nodes: dict[str, set[str]] = {}
    for name, spec in _entries(data, "images"):
        listed = _names(spec, "nodes")
        if "nodes" not in spec:
            image_nodes[name] = set(nodes)
        elif isinstance(spec["nodes"], list):
            image_nodes[name] = {n for _, n in listed}
        for i, node in listed:
            if node not in nodes:
                unknown(("images", name, "nodes", i), node, "node")

    for name, spec in _entries(data, "snapshots"):
        image = spec.get("image")
        if isinstance(image, str) and image not in images:
            unknown(("snapshots", name, "image"), image, "image")
        for i, node in _names(spec, "nodes"):
            path: Path = ("snapshots", name, "nodes", i)
            if node not in nodes:
                unknown(path, node, "node")
            elif isinstance(image, str) and image in image_nodes and node not in image_nodes[image]:
                problems.append(pos.problem(path, f"snapshot '{name}' needs {_missing_image(image, node)}"))

    # host port -> every place that uses it, per node
    used: dict[tuple[str, int], list[Path]] = {}
    for name, spec in _entries(data, "instances"):
        inode, snapshot = spec.get("node"), spec.get("snapshot")
        node_ok = isinstance(inode, str) and inode in nodes
        if isinstance(inode, str) and not node_ok:
            unknown(("instances", name, "node"), inode, "node")
        if isinstance(snapshot, str) and snapshot not in snapshots:
            unknown(("instances", name, "snapshot"), snapshot, "snapshot")
        elif isinstance(snapshot, str) and node_ok and isinstance(snapshots[snapshot], dict):
            image = snapshots[snapshot].get("image")
            if isinstance(image, str) and image in image_nodes and inode not in image_nodes[image]:
                message = f"snapshot '{snapshot}' needs {_missing_image(image, str(inode))}"
                problems.append(pos.problem(("instances", name, "node"), message))
        ports = spec.get("ports")
        if node_ok and isinstance(ports, list):
            for i, text in enumerate(ports):
                host = _host_port(text)
                if host is not None:
                    used.setdefault((str(inode), host), []).append(("instances", name, "ports", i))

    for (node, host), places in used.items():
        if len(places) > 1:
            for place in places:
                others = ", ".join(
                    f"{format_path(o)} (line {pos.value(o).line})" for o in places if o != place
                )
                message = f"host port {host} on node '{node}' is also used by {others}"
                problems.append(pos.problem(place, message))
        node_spec = nodes.get(node)
        if isinstance(node_spec, dict):
            for port, default, label in _node_ports(node_spec):
                if host == port:
                    where = "its default" if default else f"nodes.{node}.{label}"
                    message = f"host port {host} on node '{node}' is the node's own {label} ({where})"
                    problems.extend(pos.problem(place, message) for place in places)
    return problems


def _node_ports(spec: Mapping[str, Any]) -> list[tuple[int, bool, str]]:
    """The node's own listening ports: (port, is it the default, field name)."""
    ssh = spec.get("ssh")
    ssh_port = ssh.get("port") if isinstance(ssh, dict) else None
    handoff = spec.get("handoffPort")
    out: list[tuple[int, bool, str]] = []
    out.append((handoff, False, "handoffPort") if isinstance(handoff, int) else (8022, True, "handoffPort"))
    out.append((ssh_port, False, "ssh.port") if isinstance(ssh_port, int) else (22, True, "ssh.port"))
    return out


def _missing_image(image: str, node: str) -> str:
    return f"image '{image}', which is not present on node '{node}' (see images.{image}.nodes)"
