"""Handoff and copy cost estimates: a deliberately simple MODEL, not a measurement (docs/plan.md).

A live handoff moves what differs between the instance and its base image (both ends hold the image):

    raw    = dirty_bytes                        (memory + disk differing from the image, node-reported)
             or memory_bytes * UNKNOWN_DIRTY_FRACTION when the node does not know
    wire   = raw * PRECOPY_RESEND * (1 - DEDUP_SAVING) * COMPRESSION_RATIO
    time   = wire * 8 / link rate + HANDOFF_OVERHEAD_S

A cold handoff (stopped instance) moves only its disk delta (dirty_bytes is disk only then) and has no
pre-copy re-sends. The link rate is the slower of the two nodes' `linkMbit`, else `policy.linkMbit`.
A snapshot copied from another node moves its stored delta (already compressed) at the link rate.
The constants are named so later issues can calibrate them against measured handoffs.
"""

from __future__ import annotations

from nephele.model import Desired, ObservedInstance, ObservedSnapshot
from nephele.reconcile.actions import Estimate

MODEL = "nephele.estimate/v1"

UNKNOWN_DIRTY_FRACTION = 0.5  # share of guest RAM assumed to differ from the base when unknown
PRECOPY_RESEND = 1.15  # pages dirtied again during pre-copy rounds are sent again
DEDUP_SAVING = 0.25  # share of changed 4 KiB blocks sent as ZERO or REFERENCE markers
COMPRESSION_RATIO = 0.5  # lz4/zstd output / input on the remaining blocks
HANDOFF_OVERHEAD_S = 5.0  # connect, verify, switch over, release the source


def link_mbit(desired: Desired, *nodes: str | None) -> float:
    """The rate of the path between nodes: the slowest declared node link, else the policy default."""
    rates = [
        rate for n in nodes if n and n in desired.nodes and (rate := desired.nodes[n].link_mbit) is not None
    ]
    return min(rates) if rates else desired.policy.link_mbit


def transfer_seconds(nbytes: int, mbit: float) -> float:
    return nbytes * 8 / (mbit * 1_000_000)


def handoff(
    desired: Desired, inst: ObservedInstance, source: str, target: str, *, live: bool
) -> Estimate | None:
    """None when the node reported no sizes at all (memory_bytes and dirty_bytes both 0)."""
    if not inst.dirty_bytes and not inst.memory_bytes:
        return None
    if live:
        raw = inst.dirty_bytes or int(inst.memory_bytes * UNKNOWN_DIRTY_FRACTION)
        wire = int(raw * PRECOPY_RESEND * (1 - DEDUP_SAVING) * COMPRESSION_RATIO)
    else:
        wire = int(inst.dirty_bytes * (1 - DEDUP_SAVING) * COMPRESSION_RATIO)
    rate = link_mbit(desired, source, target)
    return Estimate(wire, round(transfer_seconds(wire, rate) + HANDOFF_OVERHEAD_S, 3), rate, MODEL)


def snapshot_copy(desired: Desired, snap: ObservedSnapshot, source: str, target: str) -> Estimate:
    rate = link_mbit(desired, source, target)
    return Estimate(snap.delta_bytes, round(transfer_seconds(snap.delta_bytes, rate), 3), rate, MODEL)
