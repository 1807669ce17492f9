"""The handoff cost model: the documented formula, link rates, and no estimate without sizes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nephele.model import Desired, InstanceState, ObservedInstance
from nephele.reconcile import estimate

MIB = 2**20


def _inst(memory: int = 0, dirty: int = 0) -> ObservedInstance:
    return ObservedInstance("w", "u", "web", InstanceState.RUNNING, memory_bytes=memory, dirty_bytes=dirty)


def test_live_handoff_follows_the_documented_formula(desired: Desired) -> None:
    e = estimate.handoff(desired, _inst(dirty=100 * MIB), "edge-a", "edge-b", live=True)
    assert e is not None
    wire = int(100 * MIB * 1.15 * (1 - 0.25) * 0.5)
    assert e.bytes == wire
    assert e.seconds == pytest.approx(wire * 8 / 20e6 + 5.0, abs=1e-3)
    assert e.link_mbit == 20.0


def test_unknown_dirty_bytes_uses_half_the_memory(desired: Desired) -> None:
    e = estimate.handoff(desired, _inst(memory=512 * MIB), "edge-a", "edge-b", live=True)
    f = estimate.handoff(desired, _inst(dirty=256 * MIB), "edge-a", "edge-b", live=True)
    assert e is not None and f is not None and e.bytes == f.bytes


def test_cold_handoff_has_no_precopy_resend(desired: Desired) -> None:
    live = estimate.handoff(desired, _inst(dirty=100 * MIB), "edge-a", "edge-b", live=True)
    cold = estimate.handoff(desired, _inst(dirty=100 * MIB), "edge-a", "edge-b", live=False)
    assert live is not None and cold is not None
    assert cold.bytes == pytest.approx(live.bytes / 1.15, rel=1e-6)


def test_no_sizes_no_estimate(desired: Desired) -> None:
    assert estimate.handoff(desired, _inst(), "edge-a", "edge-b", live=True) is None


def test_slowest_node_link_wins_over_policy(desired: Desired) -> None:
    nodes = dict(desired.nodes)
    nodes["edge-b"] = replace(nodes["edge-b"], link_mbit=5.0)
    d = replace(desired, nodes=nodes)
    assert estimate.link_mbit(d, "edge-a", "edge-b") == 5.0
    assert estimate.link_mbit(d, "edge-a") == 20.0  # edge-a declares nothing: policy default
    slow = estimate.handoff(d, _inst(dirty=100 * MIB), "edge-a", "edge-b", live=True)
    fast = estimate.handoff(desired, _inst(dirty=100 * MIB), "edge-a", "edge-b", live=True)
    assert slow is not None and fast is not None
    assert slow.seconds - 5.0 == pytest.approx(4 * (fast.seconds - 5.0), abs=1e-2)
