"""Property tests of the encrypted record layer on a socketpair (no listener): any way of cutting the
bytes into sends and reads gives the bytes back, and any bytes a stranger writes into the channel are
refused as ChannelIntegrityError, never delivered, never another exception, never a hang."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nephele.handoff import channel as ch


def sealed_pair() -> tuple[ch.SealedSocket, ch.SealedSocket]:
    a, b = socket.socketpair()
    k1, k2 = os.urandom(32), os.urandom(32)
    return ch.SealedSocket.wrap(a, send_key=k1, recv_key=k2), ch.SealedSocket.wrap(
        b, send_key=k2, recv_key=k1
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sends=st.lists(st.binary(max_size=3000) | st.integers(0, 200_000).map(bytes), max_size=8),
    reads=st.lists(st.integers(1, 100_000), min_size=1, max_size=10),
)
def test_any_split_of_sends_and_reads_round_trips(sends: list[bytes], reads: list[int]) -> None:
    a, b = sealed_pair()

    def send() -> None:
        for s in sends:
            a.sendall(s)
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    got = bytearray()
    i = 0
    while data := b.recv(reads[i % len(reads)]):
        assert len(data) <= reads[i % len(reads)]
        got += data
        i += 1
    t.join(10)
    assert bytes(got) == b"".join(sends)
    a.close()
    b.close()


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=400), valid_first=st.booleans())
def test_bytes_from_a_stranger_are_never_delivered(junk: bytes, valid_first: bool) -> None:
    a, b = sealed_pair()
    b.settimeout(10)
    if valid_first:
        a.sendall(b"genuine")
    raw = socket.socket(fileno=os.dup(a.fileno()))  # someone on the link writing into the stream
    raw.sendall(junk)
    raw.shutdown(socket.SHUT_WR)  # and ending it: no authenticated close record
    raw.close()
    got = bytearray()
    with pytest.raises(ch.ChannelIntegrityError):
        while data := b.recv(1 << 16):
            got += data
    assert bytes(got) == (b"genuine" if valid_first else b"")
    a.close()
    b.close()


@settings(max_examples=100, deadline=None)
@given(
    rtype=st.sampled_from([ch.REC_DATA, ch.REC_CLOSE]) | st.integers(0, 255),
    body=st.binary(min_size=0, max_size=300),
    genuine=st.integers(0, 3),
)
def test_forged_records_with_a_plausible_header_are_refused(rtype: int, body: bytes, genuine: int) -> None:
    """Right sequence number, right length, a type the reader knows: only the tag can tell."""
    a, b = sealed_pair()
    b.settimeout(10)
    for _ in range(genuine):
        a.sendall(b"g")
    raw = socket.socket(fileno=os.dup(a.fileno()))
    raw.sendall(struct.pack(">BQI", rtype, genuine, len(body)) + body)
    raw.shutdown(socket.SHUT_WR)
    raw.close()
    got = bytearray()
    with pytest.raises(ch.ChannelIntegrityError):
        while data := b.recv(1 << 16):
            got += data
    assert bytes(got) == b"g" * genuine
    a.close()
    b.close()
