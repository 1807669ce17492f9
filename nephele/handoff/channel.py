"""The handoff port: authenticated channels between the source and destination nodes.

Every TCP connection to a destination's handoff port (default 8022) starts with a challenge, and nothing
the client sends is interpreted before it passed:

    server -> client   GREETING (8 bytes) + nonce (16 random bytes, fresh per connection)
    client -> server   HELLO: magic "NPHC", u8 version, u8 channel, u16 0, handoff id (16 bytes),
                       HMAC-SHA256(token, nonce | handoff id | channel) (32 bytes)
    server -> client   b"OK" and the channel runs; anything else: the server closes the connection

The token is 32 random bytes made by the controller for one handoff and given to both nodes over SSH
(the agent). Threat model: the node link is not trusted for confidentiality (handoff traffic is not
encrypted; use a VPN/WireGuard between sites for that), but nobody may feed a destination QEMU or libvirtd
without the token: a sniffed HELLO cannot be replayed (per-connection nonce), the token itself never
crosses the link, the listener serves only the one announced handoff and stops with it.

After the hello, both directions carry messages: u8 type, u32 length, payload (``send_msg``/``MsgReader``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from nephele.errors import HandoffError

GREETING = b"NPHHO1\r\n"
HELLO_MAGIC = b"NPHC"
VERSION = 1
NONCE_LEN = 16
ID_LEN = 16
TOKEN_LEN = 32
_HELLO = struct.Struct(">4sBBH16s32s")
HELLO_LEN = _HELLO.size
OK = b"OK"
HELLO_TIMEOUT = 10.0
USER_TIMEOUT_MS = 20_000

MEMORY = 1
DISK = 2
CONTROL = 3
CHANNEL_NAMES = {MEMORY: "memory", DISK: "disk", CONTROL: "libvirt control"}

_MSG = struct.Struct(">BI")
MAX_MSG = 80 << 20  # larger than any delta frame batch the sender makes


def new_token() -> bytes:
    return os.urandom(TOKEN_LEN)


def new_handoff_id() -> bytes:
    return os.urandom(ID_LEN)


def _mac(token: bytes, nonce: bytes, handoff_id: bytes, channel: int) -> bytes:
    return hmac.new(token, nonce + handoff_id + bytes((channel,)), hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def tune(sock: socket.socket, *, sndbuf: int | None = None) -> None:
    """No Nagle (small return-path and NBD messages must not wait); optionally a small send buffer so
    little data sits outside QEMU's accounting; keepalives so a dead peer is noticed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, val in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 2), ("TCP_KEEPCNT", 5)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), val)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # data unacknowledged this long: the link is dead
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    if sndbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)


def connect_channel(
    host: str, port: int, handoff_id: bytes, token: bytes, channel: int, *, timeout: float = 15.0
) -> socket.socket:
    """Open one channel to a destination's handoff port (client side of the hello)."""
    what = f"{CHANNEL_NAMES.get(channel, channel)} channel to {host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise HandoffError(f"cannot open the {what}: {exc}") from None
    try:
        greeting = recv_exact(sock, len(GREETING) + NONCE_LEN)
        if greeting[: len(GREETING)] != GREETING:
            raise HandoffError(f"{what}: not a nephele handoff port")
        nonce = greeting[len(GREETING) :]
        sock.sendall(
            _HELLO.pack(HELLO_MAGIC, VERSION, channel, 0, handoff_id, _mac(token, nonce, handoff_id, channel))
        )
        if recv_exact(sock, len(OK)) != OK:
            raise HandoffError(f"{what}: refused")
    except (OSError, ConnectionError) as exc:
        sock.close()
        raise HandoffError(f"{what}: the destination refused the handoff ({exc})") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    tune(sock)
    return sock


@dataclass
class Accepted:
    sock: socket.socket
    channel: int
    peer: str


class HandoffListener:
    """The destination's handoff port for one announced handoff. ``accept_loop`` authenticates each
    connection (in a thread of its own, so a silent client cannot block the others) and hands the good
    ones to ``on_channel``; bad ones are closed and counted in ``refused``."""

    def __init__(self, address: str, port: int, handoff_id: bytes, token: bytes) -> None:
        if len(token) != TOKEN_LEN or len(handoff_id) != ID_LEN:
            raise HandoffError("handoff token or id has the wrong length")
        self.handoff_id = handoff_id
        self._token = token
        self.refused: list[str] = []
        self._closed = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((address, port))
        except OSError as exc:
            self.sock.close()
            where = f"{address or '*'}:{port}"
            raise HandoffError(
                f"cannot listen on the handoff port {where}: {exc.strerror} (another handoff into this node "
                "may be running)"
            ) from None
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def authenticate(self, conn: socket.socket, peer: str) -> int | None:
        try:
            conn.settimeout(HELLO_TIMEOUT)
            nonce = os.urandom(NONCE_LEN)
            conn.sendall(GREETING + nonce)
            magic, version, channel, _r, hid, mac = _HELLO.unpack(recv_exact(conn, HELLO_LEN))
            good = (
                magic == HELLO_MAGIC
                and version == VERSION
                and channel in CHANNEL_NAMES
                and hmac.compare_digest(hid, self.handoff_id)
                and hmac.compare_digest(mac, _mac(self._token, nonce, hid, channel))
            )
            if not good:
                self.refused.append(f"{peer}: bad hello")
                conn.close()
                return None
            conn.sendall(OK)
            conn.settimeout(None)
            tune(conn)
            return int(channel)
        except (OSError, ConnectionError, struct.error) as exc:
            self.refused.append(f"{peer}: {exc}")
            conn.close()
            return None

    def accept_loop(self, on_channel: Callable[[Accepted], None]) -> None:
        while not self._closed.is_set():
            try:
                r, _, _ = select.select([self.sock], [], [], 0.5)
            except (OSError, ValueError):
                return
            if not r:
                continue
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            peer = addr[0]

            def run(conn: socket.socket = conn, peer: str = peer) -> None:
                ch = self.authenticate(conn, peer)
                if ch is not None:
                    on_channel(Accepted(conn, ch, peer))

            threading.Thread(target=run, name="handoff-hello", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()


# --------------------------------------------------------------------------------------------- messages


class ChannelClosed(HandoffError):
    pass


def pack_msg(mtype: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return _MSG.pack(mtype, len(payload)) + bytes(payload)


class MsgSender:
    """Thread-safe message writer with byte accounting."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.bytes = 0

    def send(self, mtype: int, payload: bytes | bytearray | memoryview = b"") -> None:
        head = _MSG.pack(mtype, len(payload))
        with self.lock:
            self.sock.sendall(head)
            if payload:
                self.sock.sendall(payload)
            self.bytes += len(head) + len(payload)


class MsgReader:
    """Reads whole messages; ``pending()`` says whether a message may be read without blocking long."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.bytes = 0
        self.eof = False

    def pending(self) -> bool:
        if len(self.buf) >= _MSG.size:
            (n,) = struct.unpack_from(">I", self.buf, 1)
            if len(self.buf) >= _MSG.size + n:
                return True
        if self.eof:
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            self.eof = True
            return False
        self.bytes += len(data)
        self.buf += data
        return True

    def read(self) -> tuple[int, bytes] | None:
        """The next message, or None at a clean end of stream (between messages)."""
        while len(self.buf) < _MSG.size:
            if not self._fill():
                if self.buf:
                    raise ChannelClosed(f"channel closed inside a message header ({len(self.buf)} bytes)")
                return None
        mtype, n = _MSG.unpack_from(self.buf, 0)
        if n > MAX_MSG:
            raise HandoffError(f"channel message of {n} bytes is larger than allowed")
        while len(self.buf) < _MSG.size + n:
            if not self._fill():
                raise ChannelClosed(
                    f"channel closed inside a message ({len(self.buf) - _MSG.size} of {n} bytes)"
                )
        payload = bytes(self.buf[_MSG.size : _MSG.size + n])
        del self.buf[: _MSG.size + n]
        return mtype, payload
