"""Manifest problems with their exact FILE:LINE:COL: path: message, every one reported at once.

Each case starts from BASE (a valid manifest, lines 1-12) and edits or appends lines."""

from __future__ import annotations

from pathlib import Path

import pytest

import nephele.manifest as manifest
from nephele.errors import ManifestError

FIXTURES = Path(__file__).parent / "fixtures"

BASE = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  edge-a: {address: 10.201.0.1}
  edge-b: {address: 10.201.0.2, handoffPort: 9022}
images:
  tiny: {nodes: [edge-a]}
snapshots:
  web: {image: tiny}
instances:
  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        manifest.loads(text, "m.yaml")
    return [str(p) for p in info.value.problems]


def edit(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


def test_base_is_valid() -> None:
    desired = manifest.loads(BASE, "m.yaml")
    assert desired.source == "m.yaml"
    assert desired.images["tiny"].nodes == ("edge-a",)


def test_broken_copy_of_the_example_reports_everything() -> None:
    path = FIXTURES / "broken.yaml"
    with pytest.raises(ManifestError) as info:
        manifest.load(path)
    f = str(path)
    assert [str(p) for p in info.value.problems] == [
        f"{f}:9:29: nodes.edge-a.ssh.port: '22' is not an integer (remove the quotes)",
        f"{f}:11:3: nodes.edge-b: missing required field 'address'",
        f"{f}:12:5: nodes.edge-b: unknown field 'adress' (did you mean 'address'?)",
        f"{f}:24:11: instances.web-1.node: 'edge-c' is not a declared node",
        f"{f}:25:13: instances.web-1.ports[0]: '80:abc' is not HOST:GUEST "
        "(two port numbers 1..65535, e.g. '8080:80')",
        f"{f}:26:12: instances.web-1.state: 'runing' is not one of running, paused, stopped",
        f"{f}:29:11: instances.web-2.node: snapshot 'web' needs image 'tiny', which is not present on node "
        "'edge-b' (see images.tiny.nodes)",
        f"{f}:30:13: instances.web-2.ports[0]: host port 8080 on node 'edge-b' is also used by "
        "instances.web-2.ports[1] (line 30)",
        f"{f}:30:24: instances.web-2.ports[1]: host port 8080 on node 'edge-b' is also used by "
        "instances.web-2.ports[0] (line 30)",
        f"{f}:33:24: policy.maxParallelHandoffs: 'one' is not an integer",
        f"{f}:34:19: policy.downtimeBudget: '5 seconds' is not a duration "
        "(e.g. '5s', '500ms', '2m', '1m30s')",
    ]


SCHEMA_CASES = [
    # (id, manifest text, expected problems)
    (
        "wrong apiVersion and kind",
        edit("nephele.dev/v1", "nephele.dev/v2").replace("kind: Cloudlet", "kind: Cluster"),
        [
            "m.yaml:1:13: apiVersion: 'nephele.dev/v2' is not supported (expected 'nephele.dev/v1')",
            "m.yaml:2:7: kind: 'Cluster' is not supported (expected 'Cloudlet')",
        ],
    ),
    (
        "missing top-level fields point at the document start",
        "nodes: {edge-a: {address: x}}\n",
        [
            "m.yaml:1:1: missing required field 'apiVersion'",
            "m.yaml:1:1: missing required field 'kind'",
            "m.yaml:1:1: missing required field 'metadata'",
        ],
    ),
    (
        "unknown top-level field",
        BASE + "instance: {}\n",
        ["m.yaml:13:1: unknown field 'instance' (did you mean 'instances'?)"],
    ),
    (
        "unknown field with no close match",
        edit("{name: demo}", "{name: demo, labels: {a: b}}"),
        ["m.yaml:3:24: metadata: unknown field 'labels'"],
    ),
    (
        "a scalar where a mapping belongs",
        edit("metadata: {name: demo}", "metadata: demo"),
        ["m.yaml:3:11: metadata: expected a mapping, got 'demo'"],
    ),
    (
        "the document is a list",
        "- a\n- b\n",
        ["m.yaml:1:1: expected a mapping, got a list"],
    ),
    (
        "nodes must be a non-empty mapping",
        BASE.replace(
            "nodes:\n  edge-a: {address: 10.201.0.1}\n  edge-b: {address: 10.201.0.2, handoffPort: 9022}\n",
            "nodes: {}\n",
        )
        .replace('instances:\n  web-1: {snapshot: web, node: edge-a, ports: ["8080:80"]}\n', "")
        .replace("{nodes: [edge-a]}", "{}"),
        ["m.yaml:4:8: nodes: must not be empty"],
    ),
    (
        "bad names point at the key",
        edit("  web: {image: tiny}", "  Web_1: {image: tiny}\n  web-: {image: tiny}"),
        [
            "m.yaml:10:3: snapshots: 'Web_1' is not a valid name (lowercase letters, digits and '-', "
            "starting with a letter, not ending with '-', at most 63 characters)",
            "m.yaml:11:3: snapshots: 'web-' is not a valid name (lowercase letters, digits and '-', "
            "starting with a letter, not ending with '-', at most 63 characters)",
            "m.yaml:13:21: instances.web-1.snapshot: 'web' is not a declared snapshot",
        ],
    ),
    (
        "node fields",
        edit(
            "{address: 10.201.0.1}",
            "{address: 'a b', ssh: {user: yes, port: 0, kee: k}, handoffPort: 70000, root: var, "
            "linkMbit: -1}",
        ),
        [
            "m.yaml:5:21: nodes.edge-a.address: 'a b' is not an IP address or host name",
            "m.yaml:5:40: nodes.edge-a.ssh.user: true is not a string (put it in quotes to make it one)",
            "m.yaml:5:51: nodes.edge-a.ssh.port: 0 is below the minimum 1",
            "m.yaml:5:54: nodes.edge-a.ssh: unknown field 'kee' (did you mean 'key'?)",
            "m.yaml:5:76: nodes.edge-a.handoffPort: 70000 is above the maximum 65535",
            "m.yaml:5:89: nodes.edge-a.root: 'var' is not an absolute path",
            "m.yaml:5:104: nodes.edge-a.linkMbit: -1 must be greater than 0",
        ],
    ),
    (
        "image fields",
        edit(
            "  tiny: {nodes: [edge-a]}",
            "  tiny: {nodes: [edge-a, edge-a], id: 1234abcd, source: ''}\n  other: {nodes: [], id: XYZ}",
        ),
        [
            "m.yaml:8:26: images.tiny.nodes[1]: 'edge-a' is listed twice",
            "m.yaml:8:57: images.tiny.source: must not be empty",
            "m.yaml:9:18: images.other.nodes: must list at least 1 item",
            "m.yaml:9:26: images.other.id: 'XYZ' is not a content id (8 to 64 hex digits 0-9a-f)",
        ],
    ),
    (
        "an all-digit id must be quoted",
        edit("{nodes: [edge-a]}", "{nodes: [edge-a], id: 12345678}"),
        ["m.yaml:8:31: images.tiny.id: 12345678 is not a string (put it in quotes to make it one)"],
    ),
    (
        "instance fields",
        edit(
            '{snapshot: web, node: edge-a, ports: ["8080:80"]}',
            '{snapshot: web, node: edge-a, ports: ["0:80", "80", 8080, "65536:1", "1:65535"], '
            "state: Running, prune: 'no', wave: 1}",
        ),
        [
            "m.yaml:12:48: instances.web-1.ports[0]: '0:80' is not HOST:GUEST (two port numbers 1..65535, "
            "e.g. '8080:80')",
            "m.yaml:12:56: instances.web-1.ports[1]: '80' is not HOST:GUEST (two port numbers 1..65535, "
            "e.g. '8080:80')",
            "m.yaml:12:62: instances.web-1.ports[2]: 8080 is not a string (put it in quotes to make it one)",
            "m.yaml:12:68: instances.web-1.ports[3]: '65536:1' is not HOST:GUEST (two port numbers 1..65535, "
            "e.g. '8080:80')",
            "m.yaml:12:98: instances.web-1.state: 'Running' is not one of running, paused, stopped",
            "m.yaml:12:114: instances.web-1.prune: 'no' is not true or false",
            "m.yaml:12:120: instances.web-1: unknown field 'wave'",
        ],
    ),
    (
        "instance missing fields point at its key",
        BASE + "  web-2: {}\n  web-3:\n",
        [
            "m.yaml:13:3: instances.web-2: missing required field 'node'",
            "m.yaml:13:3: instances.web-2: missing required field 'snapshot'",
            "m.yaml:14:9: instances.web-3: expected a mapping, got nothing",
        ],
    ),
    (
        "policy fields",
        BASE
        + "policy:\n"
        + "  prune: maybe\n"
        + "  parallelism: 0\n"
        + "  maxHandoffsPerNode: 1.5\n"
        + "  downtimeBudget: -1\n"
        + "  transferBudget: 2gb\n"
        + "  linkMbit: fast\n"
        + "  maxParallelHandoff: 2\n",
        [
            "m.yaml:14:10: policy.prune: 'maybe' is not true or false",
            "m.yaml:15:16: policy.parallelism: 0 is below the minimum 1",
            "m.yaml:16:23: policy.maxHandoffsPerNode: 1.5 is not an integer",
            "m.yaml:17:19: policy.downtimeBudget: -1 is below the minimum 0",
            "m.yaml:18:19: policy.transferBudget: '2gb' is not a size (e.g. '2GiB', '500MB', '64KiB')",
            "m.yaml:19:13: policy.linkMbit: 'fast' is not a number",
            "m.yaml:20:3: policy: unknown field 'maxParallelHandoff' (did you mean 'maxParallelHandoffs'?)",
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in SCHEMA_CASES], ids=[c[0] for c in SCHEMA_CASES]
)
def test_schema_problems(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


XREF_CASES = [
    (
        "unknown node, snapshot and image",
        edit("  web: {image: tiny}", "  web: {image: tinny}") + "  web-2: {snapshot: db, node: edge-c}\n",
        [
            "m.yaml:10:16: snapshots.web.image: 'tinny' is not a declared image",
            "m.yaml:13:21: instances.web-2.snapshot: 'db' is not a declared snapshot",
            "m.yaml:13:31: instances.web-2.node: 'edge-c' is not a declared node",
        ],
    ),
    (
        "image and snapshot nodes must be declared",
        edit("{nodes: [edge-a]}", "{nodes: [edge-a, edge-x]}").replace(
            "{image: tiny}", "{image: tiny, nodes: [edge-y]}"
        ),
        [
            "m.yaml:8:26: images.tiny.nodes[1]: 'edge-x' is not a declared node",
            "m.yaml:10:30: snapshots.web.nodes[0]: 'edge-y' is not a declared node",
        ],
    ),
    (
        "a host port used twice on one node: both places",
        BASE + '  web-2: {snapshot: web, node: edge-a, ports: ["9000:80", "8080:8080"]}\n',
        [
            "m.yaml:12:48: instances.web-1.ports[0]: host port 8080 on node 'edge-a' is also used by "
            "instances.web-2.ports[1] (line 13)",
            "m.yaml:13:59: instances.web-2.ports[1]: host port 8080 on node 'edge-a' is also used by "
            "instances.web-1.ports[0] (line 12)",
        ],
    ),
    (
        "a host port used three times",
        BASE + '  web-2: {snapshot: web, node: edge-a, ports: ["8080:1"]}\n'
        '  web-3: {snapshot: web, node: edge-a, ports: ["8080:2"]}\n',
        [
            "m.yaml:12:48: instances.web-1.ports[0]: host port 8080 on node 'edge-a' is also used by "
            "instances.web-2.ports[0] (line 13), instances.web-3.ports[0] (line 14)",
            "m.yaml:13:48: instances.web-2.ports[0]: host port 8080 on node 'edge-a' is also used by "
            "instances.web-1.ports[0] (line 12), instances.web-3.ports[0] (line 14)",
            "m.yaml:14:48: instances.web-3.ports[0]: host port 8080 on node 'edge-a' is also used by "
            "instances.web-1.ports[0] (line 12), instances.web-2.ports[0] (line 13)",
        ],
    ),
    (
        "a host port that is the node's own ssh or handoff port",
        BASE + '  web-2: {snapshot: web, node: edge-a, ports: ["22:22", "8022:80"]}\n',
        [
            "m.yaml:13:48: instances.web-2.ports[0]: host port 22 on node 'edge-a' is the node's own "
            "ssh.port (its default)",
            "m.yaml:13:57: instances.web-2.ports[1]: host port 8022 on node 'edge-a' is the node's own "
            "handoffPort (its default)",
        ],
    ),
    (
        "a node's handoff port is not its ssh port",
        edit("{address: 10.201.0.1}", "{address: 10.201.0.1, handoffPort: 22}").replace(
            "{address: 10.201.0.2, handoffPort: 9022}", "{address: 10.201.0.2, ssh: {port: 8022}}"
        ),
        [
            "m.yaml:5:46: nodes.edge-a.handoffPort: 22 is also the node's ssh.port",
            "m.yaml:6:45: nodes.edge-b.ssh.port: 8022 is also the node's handoffPort",
        ],
    ),
    (
        "a snapshot's image must be on the node of an instance using it",
        edit("node: edge-a,", "node: edge-b,"),
        [
            "m.yaml:12:32: instances.web-1.node: snapshot 'web' needs image 'tiny', which is not present "
            "on node 'edge-b' (see images.tiny.nodes)",
        ],
    ),
    (
        "a snapshot's image must be on the nodes it is staged on",
        edit("{image: tiny}", "{image: tiny, nodes: [edge-b]}"),
        [
            "m.yaml:10:30: snapshots.web.nodes[0]: snapshot 'web' needs image 'tiny', which is not "
            "present on node 'edge-b' (see images.tiny.nodes)",
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in XREF_CASES], ids=[c[0] for c in XREF_CASES])
def test_cross_reference_problems(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


EVERY_NODE = edit("{nodes: [edge-a]}", "{}")


@pytest.mark.parametrize(
    ("text", "instances"),
    [
        # The same host port on different nodes; an image without `nodes` is on every node.
        (EVERY_NODE + '  web-2: {snapshot: web, node: edge-b, ports: ["8080:80"]}\n', 2),
        # A node's own ports are reserved on that node only (edge-b's handoff port is 9022).
        (BASE + '  web-2: {snapshot: web, node: edge-a, ports: ["9022:80"]}\n', 2),
        # Two ports of one instance, different host ports, same guest port.
        (edit('["8080:80"]', '["8080:80", "8081:80"]'), 1),
        # Empty sections.
        (BASE.split("images:")[0] + "images:\nsnapshots:\ninstances:\n", 0),
    ],
)
def test_cross_reference_non_problems(text: str, instances: int) -> None:
    assert len(manifest.loads(text, "m.yaml").instances) == instances


def test_problems_in_one_part_do_not_hide_cross_references_elsewhere() -> None:
    text = (
        edit("{address: 10.201.0.1}", "{address: 10.201.0.1, bogus: 1}") + "  web-2: {snapshot: x, node: y}\n"
    )
    assert problems(text) == [
        "m.yaml:5:33: nodes.edge-a: unknown field 'bogus'",
        "m.yaml:13:21: instances.web-2.snapshot: 'x' is not a declared snapshot",
        "m.yaml:13:30: instances.web-2.node: 'y' is not a declared node",
    ]


def test_a_misspelt_reference_is_not_reported_twice() -> None:
    text = edit("{nodes: [edge-a]}", "{nodes: [Edge-A]}")
    assert problems(text) == [
        "m.yaml:8:18: images.tiny.nodes[0]: 'Edge-A' is not a valid name (lowercase letters, digits and '-', "
        "starting with a letter, not ending with '-', at most 63 characters)",
        # not also "'Edge-A' is not a declared node"; but the image is indeed missing from edge-a
        "m.yaml:12:32: instances.web-1.node: snapshot 'web' needs image 'tiny', which is not present "
        "on node 'edge-a' (see images.tiny.nodes)",
    ]


def test_cross_reference_name_rule_is_the_schema_rule() -> None:
    from nephele.manifest import xref

    assert xref._NAME.pattern == manifest.schema_document()["$defs"]["name"]["pattern"]  # type: ignore[index]
