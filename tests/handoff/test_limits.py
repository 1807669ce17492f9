"""Handoff limits and checks without VMs: the bandwidth cap's token bucket on a real socket pair, what
the destination compares with its libvirt capabilities (the domain's platform, read from its XML), and
the forwarder's checksum on plain channels."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
import zlib

import lz4.block
import pytest

from nephele.handoff import channel as ch
from nephele.handoff.forward import DATA, DATA_LZ4, ForwardStats, ThrottledSocket, TokenBucket, forward
from nephele.node.migrate import platform_of


def _drain(sock: socket.socket, n: int, out: list[float]) -> None:
    got = 0
    while got < n:
        data = sock.recv(1 << 16)
        if not data:
            break
        got += len(data)
    out.append(time.monotonic())


@pytest.mark.parametrize("rate", [2e6, 8e6])
def test_a_throttled_socket_sends_at_the_cap(rate: float) -> None:
    a, b = socket.socketpair()
    n = int(rate)  # one second's worth
    ends: list[float] = []
    reader = threading.Thread(target=_drain, args=(b, n, ends))
    reader.start()
    t = ThrottledSocket.wrap(a, TokenBucket(rate))
    t0 = time.monotonic()
    t.sendall(b"x" * (n // 2))
    t.sendall(memoryview(b"y" * (n - n // 2)))
    reader.join(10)
    elapsed = ends[0] - t0
    burst = t.bucket.burst / rate
    assert 1.0 - burst - 0.05 <= elapsed <= 1.3, elapsed  # the cap holds, and costs no more than it must
    t.close()
    b.close()


def test_the_cap_is_shared_by_every_channel_of_a_handoff() -> None:
    rate = 4e6
    bucket = TokenBucket(rate)
    pairs = [socket.socketpair() for _ in range(2)]
    ends: list[float] = []
    readers = [threading.Thread(target=_drain, args=(p[1], int(rate / 2), ends)) for p in pairs]
    for r in readers:
        r.start()
    t0 = time.monotonic()
    senders = [
        threading.Thread(target=ThrottledSocket.wrap(p[0], bucket).sendall, args=(b"z" * int(rate / 2),))
        for p in pairs
    ]
    for s in senders:
        s.start()
    for th in senders + readers:
        th.join(10)
    assert max(ends) - t0 >= 1.0 - bucket.burst / rate - 0.05  # 2 x rate/2 bytes: about one second


def test_a_bucket_needs_a_positive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0)


DOMAIN = """<domain type='qemu'><name>x</name>
<os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>{cpu}</domain>"""


def test_platform_of_a_domain() -> None:
    p = platform_of(DOMAIN.format(cpu=""))
    assert p == {
        "arch": "x86_64",
        "machine": "pc-i440fx-7.2",
        "virt_type": "qemu",
        "cpu_mode": "",
        "cpu_model": "",
    }
    p = platform_of(DOMAIN.format(cpu="<cpu mode='custom'><model>Skylake-Client</model></cpu>"))
    assert (p["cpu_mode"], p["cpu_model"]) == ("custom", "Skylake-Client")
    assert platform_of(DOMAIN.format(cpu="<cpu mode='host-passthrough'/>"))["cpu_mode"] == "host-passthrough"


def _read_all(s: socket.socket) -> bytes:
    out = bytearray()
    with contextlib.suppress(OSError):
        while data := s.recv(1 << 16):
            out += data
    return bytes(out)


@pytest.mark.parametrize("compressible", [False, True])
def test_a_changed_byte_on_a_plain_forwarding_channel_never_reaches_the_local_side(
    compressible: bool,
) -> None:
    """The disk and control channels on a plain (unencrypted) handoff channel: a flipped byte in a
    DATA or DATA_LZ4 message is refused before anything is written to QEMU's NBD server / libvirtd."""
    wan_src, wan_dst = socket.socketpair()
    local, app = socket.socketpair()
    st = ForwardStats()
    t = threading.Thread(target=forward, args=(local, wan_dst), kwargs={"stats": st}, daemon=True)
    t.start()
    data = bytes(64 << 10) if compressible else os.urandom(64 << 10)
    crc = struct.pack(">I", zlib.crc32(data))
    if compressible:
        z = lz4.block.compress(data, store_size=False)
        msg = bytearray(ch.pack_msg(DATA_LZ4, crc + struct.pack(">I", len(data)) + z))
    else:
        msg = bytearray(ch.pack_msg(DATA, crc + data))
    msg[-7] ^= 0x01  # one bit, inside the payload
    wan_src.sendall(bytes(msg))
    got = _read_all(app)
    t.join(10)
    assert got == b""
    assert st.error is not None and ("checksum" in st.error or "LZ4" in st.error.upper()), st.error
    for s in (wan_src, app):
        s.close()


def test_an_intact_plain_forwarding_channel_delivers_every_byte() -> None:
    wan_src, wan_dst = socket.socketpair()
    a_app, a_local = socket.socketpair()
    b_local, b_app = socket.socketpair()
    threading.Thread(target=forward, args=(a_local, wan_src), daemon=True).start()
    threading.Thread(target=forward, args=(b_local, wan_dst), daemon=True).start()
    data = os.urandom(1 << 20) + bytes(1 << 20)

    def feed() -> None:
        a_app.sendall(data)
        a_app.shutdown(socket.SHUT_WR)

    threading.Thread(target=feed, daemon=True).start()
    assert _read_all(b_app) == data
    for s in (a_app, b_app):
        s.close()
