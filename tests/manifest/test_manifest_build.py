"""The typed result: defaults, order, and every field reaching the model."""

from __future__ import annotations

import nephele.manifest as manifest
from nephele.model import ImageSpec, InstanceSpec, InstanceState, NodeSpec, PortMap, SnapshotSpec

TEXT = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: lab}
nodes:
  zeta: {address: 10.0.0.9}
  alpha:
    address: edge.example.org
    ssh: {user: nephele, port: 2222, key: ~/.ssh/id_ed25519}
    handoffPort: 9000
    root: /srv/nephele
    linkMbit: 50
images:
  base: {source: artifacts/base.zip, id: 0123456789abcdef}
  pinned: {nodes: [alpha]}
snapshots:
  web: {image: base, source: artifacts/web.zip, nodes: [zeta]}
  db: {image: pinned}
instances:
  web-2: {snapshot: web, node: zeta}
  db-1: {snapshot: db, node: alpha, ports: ["5432:5432", "8080:80"], state: paused, prune: false}
"""


def test_every_field_reaches_the_model() -> None:
    d = manifest.loads(TEXT, "lab.yaml")
    assert (d.name, d.source) == ("lab", "lab.yaml")
    # manifest order is kept
    assert list(d.nodes) == ["zeta", "alpha"]
    assert list(d.instances) == ["web-2", "db-1"]
    assert d.nodes["zeta"] == NodeSpec(name="zeta", address="10.0.0.9")
    assert d.nodes["alpha"] == NodeSpec(
        name="alpha",
        address="edge.example.org",
        ssh_user="nephele",
        ssh_port=2222,
        ssh_key="~/.ssh/id_ed25519",
        handoff_port=9000,
        root="/srv/nephele",
        link_mbit=50.0,
    )
    assert d.images["base"] == ImageSpec("base", "artifacts/base.zip", ("zeta", "alpha"), "0123456789abcdef")
    assert d.images["pinned"] == ImageSpec("pinned", None, ("alpha",), None)
    assert d.snapshots["web"] == SnapshotSpec("web", "base", "artifacts/web.zip", ("zeta",))
    assert d.snapshots["db"] == SnapshotSpec("db", "pinned", None, ())
    assert d.instances["web-2"] == InstanceSpec("web-2", "web", "zeta")
    assert d.instances["db-1"] == InstanceSpec(
        "db-1", "db", "alpha", (PortMap(5432, 5432), PortMap(8080, 80)), InstanceState.PAUSED, prune=False
    )
    assert isinstance(d.nodes["alpha"].link_mbit, float)
