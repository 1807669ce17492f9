"""A bidirectional forwarder between a local TCP connection and an authenticated channel, with lz4.

Used for the disk channel (QEMU's NBD mirror: request/response, so both directions matter) and the
libvirt control channel. Each local read becomes one message: DATA_LZ4 (u32 crc32 of the bytes, u32 raw
length, lz4 block) when that is smaller, else DATA (u32 crc32, the bytes); a half-close becomes EOF. The
crc32 is checked before anything is written locally: on a plain channel nothing else would notice a
changed byte on the way to QEMU's NBD server or libvirtd. ``NbdTap`` watches the NBD client's requests to
count what the disk mirror wrote (for the DISK row of the stats table).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lz4.block
import numpy as np

from nephele.handoff.channel import ChannelClosed, MsgReader, MsgSender

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer as Buffer

DATA = 1
DATA_LZ4 = 2
EOF = 3
CHUNK = 256 << 10
BLOCK = 4096


class TokenBucket:
    """A byte-rate limit shared by every channel of one handoff (the cap is per handoff, not per
    channel). Each writer reserves its bytes on one timeline and sleeps until its slot, allowing a burst
    of ``burst`` bytes ahead of it."""

    def __init__(self, rate_bps: float, burst: int = 32 << 10) -> None:
        if rate_bps <= 0:
            raise ValueError("the rate must be positive")
        self.rate = float(rate_bps)  # bytes per second
        self.burst = burst
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst / self.rate)
            self._next = start + n / self.rate
            wait = self._next - now - self.burst / self.rate
        if wait > 0:
            time.sleep(wait)


class ThrottledSocket(socket.socket):
    """A connected socket whose sends go through a TokenBucket (the rest is the socket itself)."""

    bucket: TokenBucket

    @classmethod
    def wrap(cls, sock: socket.socket, bucket: TokenBucket) -> ThrottledSocket:
        timeout = sock.gettimeout()
        out = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        out.settimeout(timeout)
        out.bucket = bucket
        return out

    def sendall(self, data: Buffer, flags: int = 0, /) -> None:
        view = memoryview(data).cast("B")
        step = max(1024, self.bucket.burst)
        for i in range(0, len(view), step):
            chunk = view[i : i + step]
            self.bucket.take(len(chunk))
            super().sendall(chunk, flags)

    def send(self, data: Buffer, flags: int = 0, /) -> int:
        view = memoryview(data).cast("B")[: self.bucket.burst]
        self.bucket.take(len(view))
        return super().send(view, flags)


@dataclass
class ForwardStats:
    local_in: int = 0  # bytes read from the local socket
    local_out: int = 0  # bytes written to the local socket
    wan_out: int = 0  # message bytes sent on the channel
    wan_in: int = 0
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class NbdTap:
    """Counts NBD WRITE / WRITE_ZEROES requests in a client->server byte stream (newstyle handshake:
    4 bytes of client flags, options, then requests)."""

    OPT_MAGIC = 0x49484156454F5054
    REQ_MAGIC = 0x25609513
    CMD_WRITE = 1
    CMD_WRITE_ZEROES = 6

    def __init__(self) -> None:
        self.buf = bytearray()
        self.state = 0  # 0 flags, 1 options/requests
        self.skip = 0  # payload bytes of the current write still to come
        self.zero_pending = bytearray()
        self.write_bytes = 0
        self.zero_bytes = 0  # written as WRITE_ZEROES or as all-zero 4 KiB blocks
        self.writes = 0
        self.broken = False
        # heatmap hook: ("disk", block numbers written, "data"|"zero") per request (nephele.handoff.heatmap)
        self.observer: Callable[[str, np.ndarray, str], None] | None = None

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        self.buf += data
        while True:
            if self.skip:
                n = min(self.skip, len(self.buf))
                self._payload(bytes(self.buf[:n]))
                del self.buf[:n]
                self.skip -= n
                if self.skip:
                    return
                continue
            if self.state == 0:
                if len(self.buf) < 4:
                    return
                del self.buf[:4]
                self.state = 1
                continue
            if len(self.buf) >= 8 and struct.unpack_from(">Q", self.buf)[0] == self.OPT_MAGIC:
                if len(self.buf) < 16:
                    return
                (n,) = struct.unpack_from(">I", self.buf, 12)
                if len(self.buf) < 16 + n:
                    return
                del self.buf[: 16 + n]
                continue
            if len(self.buf) < 28:
                return
            magic, _flags, cmd, _handle, off, length = struct.unpack_from(">IHHQQI", self.buf)
            if magic != self.REQ_MAGIC:
                self.broken = True  # not a stream this tap understands: stop counting, keep forwarding
                return
            del self.buf[:28]
            if cmd == self.CMD_WRITE:
                self.writes += 1
                self.write_bytes += length
                self.skip = length
            elif cmd == self.CMD_WRITE_ZEROES:
                self.writes += 1
                self.write_bytes += length
                self.zero_bytes += length
            if self.observer is not None and cmd in (self.CMD_WRITE, self.CMD_WRITE_ZEROES) and length:
                cls = "data" if cmd == self.CMD_WRITE else "zero"
                self.observer(
                    "disk", np.arange(off // BLOCK, -(-(off + length) // BLOCK), dtype=np.int64), cls
                )

    def _payload(self, data: bytes) -> None:
        self.zero_pending += data
        whole = len(self.zero_pending) // BLOCK * BLOCK
        if whole:
            rows = np.frombuffer(bytes(self.zero_pending[:whole]), np.uint64).reshape(-1, BLOCK // 8)
            self.zero_bytes += int((~rows.any(axis=1)).sum()) * BLOCK
            del self.zero_pending[:whole]


def _local_to_wan(local: socket.socket, tx: MsgSender, st: ForwardStats, tap: NbdTap | None) -> None:
    try:
        while True:
            data = local.recv(CHUNK)
            if not data:
                break
            st.local_in += len(data)
            if tap is not None:
                tap.feed(data)
            crc = struct.pack(">I", zlib.crc32(data))
            z = lz4.block.compress(data, store_size=False) if len(data) > 64 else b""
            if z and len(z) + 4 < len(data):
                tx.send(DATA_LZ4, crc + struct.pack(">I", len(data)) + z)
            else:
                tx.send(DATA, crc + data)
            st.wan_out = tx.bytes
        tx.send(EOF)
    except OSError as exc:
        st.error = st.error or f"local side: {exc}"
        with contextlib.suppress(OSError):
            tx.sock.shutdown(socket.SHUT_RDWR)
    finally:
        st.wan_out = tx.bytes


def _wan_to_local(rx: MsgReader, local: socket.socket, st: ForwardStats, tap: NbdTap | None) -> None:
    try:
        while True:
            msg = rx.read()
            if msg is None:
                break
            mtype, payload = msg
            st.wan_in = rx.bytes
            if mtype in (DATA, DATA_LZ4) and len(payload) < (4 if mtype == DATA else 8):
                raise ChannelClosed(f"a forwarded message of {len(payload)} bytes is too short")
            if mtype == DATA:
                out = payload[4:]
            elif mtype == DATA_LZ4:
                (n,) = struct.unpack_from(">I", payload, 4)
                out = lz4.block.decompress(payload[8:], uncompressed_size=n)
            elif mtype == EOF:
                break
            else:
                raise ChannelClosed(f"unexpected message type {mtype} on a forwarding channel")
            if struct.unpack_from(">I", payload)[0] != zlib.crc32(out):
                # a plain (unencrypted) channel has no other check: never hand QEMU or libvirtd bad bytes
                raise ChannelClosed(f"checksum mismatch in a forwarded message ({len(out)} bytes)")
            if tap is not None:
                tap.feed(out)
            local.sendall(out)
            st.local_out += len(out)
        with contextlib.suppress(OSError):
            local.shutdown(socket.SHUT_WR)
    except (OSError, ChannelClosed, lz4.block.LZ4BlockError) as exc:
        st.error = st.error or f"channel side: {exc}"
        with contextlib.suppress(OSError):
            local.shutdown(socket.SHUT_RDWR)
    finally:
        st.wan_in = rx.bytes


def forward(
    local: socket.socket,
    wan: socket.socket,
    *,
    tap: NbdTap | None = None,
    tap_in: NbdTap | None = None,
    stats: ForwardStats | None = None,
) -> ForwardStats:
    """Forward until both directions ended; closes both sockets. ``tap`` sees what the local side sends,
    ``tap_in`` what arrives from the channel. Returns the byte counts (``stats`` if given, updated live)."""
    st = stats or ForwardStats()
    tx, rx = MsgSender(wan), MsgReader(wan)
    t = threading.Thread(target=_wan_to_local, args=(rx, local, st, tap_in), daemon=True)
    t.start()
    _local_to_wan(local, tx, st, tap)
    t.join()
    for s in (local, wan):
        with contextlib.suppress(OSError):
            s.close()
    st.done.set()
    return st
