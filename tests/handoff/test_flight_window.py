"""The memory channel's end-to-end flight window: the source holds its next message while more than
FLIGHT_SECONDS of the link's rate (from the destination's ACKs) is sent but not yet read there."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from nephele.handoff import memory as m
from tests.handoff.test_switchover_check import run_pair


def make_source() -> m.MemorySource:
    q, _q2 = socket.socketpair()
    w, _w2 = socket.socketpair()
    return m.MemorySource(q, w, {})


def test_no_ack_yet_means_no_waiting() -> None:
    src = make_source()
    src.tx.bytes = 100 << 20
    t = time.monotonic()
    src._wait_for_room()
    assert time.monotonic() - t < 0.5


def test_the_sender_waits_until_the_destination_has_read_enough() -> None:
    src = make_source()
    src._on_ack(0)
    time.sleep(0.2)
    src._on_ack(1 << 20)  # ~5 MB/s: the window is max(256 KiB, 0.25 s of it)
    window = max(m.FLIGHT_MIN, src.link_rate() * m.FLIGHT_SECONDS)
    src.tx.bytes = (1 << 20) + int(window) + (2 << 20)  # 2 MiB more than the window in flight
    waiter = threading.Thread(target=src._wait_for_room, daemon=True)
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    src._on_ack(src.tx.bytes - int(window) + 1)
    waiter.join(2)
    assert not waiter.is_alive()


def test_a_destination_that_stops_acking_does_not_hang_the_sender() -> None:
    src = make_source()
    src._on_ack(0)
    time.sleep(0.1)
    src._on_ack(1 << 20)
    src.tx.bytes = 1 << 30
    m.FLIGHT_STALL, old = 0.3, m.FLIGHT_STALL
    try:
        t = time.monotonic()
        src._wait_for_room()
        assert 0.25 < time.monotonic() - t < 2
    finally:
        m.FLIGHT_STALL = old


def test_the_destination_acks_everything_before_it_waits(
    tmp_path: Path, case: tuple[bytes, dict[str, Path], dict[str, bytearray]]
) -> None:
    """A destination that has read everything says so before it blocks: a sender whose flight window is
    full would otherwise wait for an ACK that never comes (a 10 s stall at 100 Mbit/s, measured)."""
    stream, refs, _delivered = case
    got, src, dst = run_pair(tmp_path, stream, refs, None)
    assert got == stream and dst.verified  # type: ignore[attr-defined]
    assert src.acked == src.tx.bytes
