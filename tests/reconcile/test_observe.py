"""Live observation: parallel fan-out, per-node timeout, unreachable nodes (remembered since when),
malformed answers, transports that cannot be made."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fakenodes import FakeCloudlet

from nephele import manifest
from nephele.agent import AgentTransport, FakeTransport
from nephele.errors import AgentError, NodeUnreachable
from nephele.model import Desired, NodeSpec
from nephele.reconcile.observe import TransportPool, UnreachableLog, observe

MANIFEST = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: demo}
nodes:
  a: {address: 10.0.0.1}
  b: {address: 10.0.0.2}
  c: {address: 10.0.0.3}
instances: {}
"""


def desired() -> Desired:
    return manifest.loads(MANIFEST, "t.yaml")


def test_every_node_is_observed_in_parallel() -> None:
    fc = FakeCloudlet("a", "b", "c")
    fc.add_image("b")
    fc.add_instance("c", "web-1", ports=["8080:80"])
    fc.delay = {"observe": 0.3}
    t0 = time.monotonic()
    obs = observe(desired(), TransportPool(desired(), fc.factory), timeout=5)
    elapsed = time.monotonic() - t0
    assert elapsed < 0.6, elapsed  # three 0.3 s answers at once, not one after another
    assert fc.max_concurrent == 3
    assert all(o.reachable for o in obs.nodes.values())
    assert "tiny" in obs.nodes["b"].images
    assert obs.nodes["c"].instances["web-1"].ports[0].host == 8080


def test_a_dark_node_is_unreachable_and_the_others_are_observed(tmp_path: Path) -> None:
    fc = FakeCloudlet("a", "b", "c")
    fc.down = {"b"}
    log = UnreachableLog(tmp_path)
    obs = observe(desired(), TransportPool(desired(), fc.factory), timeout=5, log=log, now=lambda: "T1")
    assert obs.nodes["a"].reachable and obs.nodes["c"].reachable
    b = obs.nodes["b"]
    assert not b.reachable and b.since == "T1" and b.error and "connection refused" in b.error
    # The next run remembers since when; a recovered node is forgotten.
    obs2 = observe(desired(), TransportPool(desired(), fc.factory), timeout=5, log=log, now=lambda: "T2")
    assert obs2.nodes["b"].since == "T1"
    fc.down = set()
    obs3 = observe(desired(), TransportPool(desired(), fc.factory), timeout=5, log=log, now=lambda: "T3")
    assert obs3.nodes["b"].reachable and log.read() == {}
    fc.down = {"b"}
    obs4 = observe(desired(), TransportPool(desired(), fc.factory), timeout=5, log=log, now=lambda: "T4")
    assert obs4.nodes["b"].since == "T4"


def test_a_hanging_node_costs_one_timeout() -> None:
    fc = FakeCloudlet("a", "b", "c")

    def factory(spec: NodeSpec) -> AgentTransport:
        if spec.name == "b":
            return FakeTransport(lambda req: time.sleep(3) or {}, node="b")  # type: ignore[func-returns-value]
        return fc.transport(spec.name)

    t0 = time.monotonic()
    obs = observe(desired(), TransportPool(desired(), factory), timeout=0.5)
    assert time.monotonic() - t0 < 1.5
    assert obs.nodes["a"].reachable and obs.nodes["c"].reachable
    assert not obs.nodes["b"].reachable and "within 0.5 s" in (obs.nodes["b"].error or "")


def test_bad_answers_and_transport_failures_are_unreachable() -> None:
    fc = FakeCloudlet("a", "b", "c")

    def factory(spec: NodeSpec) -> AgentTransport:
        if spec.name == "a":
            raise AgentError("cannot read key file /nope", node="a")
        if spec.name == "b":
            return FakeTransport(
                lambda req: {"v": 1, "id": req["id"], "ok": True, "result": [1, 2]}, node="b"
            )
        return fc.transport(spec.name)

    obs = observe(desired(), TransportPool(desired(), factory), timeout=5)
    assert not obs.nodes["a"].reachable and "key file" in (obs.nodes["a"].error or "")
    assert not obs.nodes["b"].reachable and "expected an object" in (obs.nodes["b"].error or "")
    assert obs.nodes["c"].reachable


def test_transport_pool_makes_one_transport_per_node() -> None:
    made: list[str] = []
    fc = FakeCloudlet("a", "b", "c")

    def factory(spec: NodeSpec) -> Any:
        made.append(spec.name)
        return fc.transport(spec.name)

    pool = TransportPool(desired(), factory)
    observe(desired(), pool, timeout=5)
    observe(desired(), pool, timeout=5)
    assert sorted(made) == ["a", "b", "c"]
    try:
        pool("zzz")
    except AgentError as exc:
        assert "not a node of the manifest" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("an unknown node must be refused")
    pool.close()


def test_node_unreachable_is_temporary() -> None:
    assert NodeUnreachable("x").temporary
