"""The handoff port: authenticated, optionally encrypted channels between the source and destination nodes.

Every TCP connection to a destination's handoff port (default 8022) starts with a challenge, and nothing
the client sends is interpreted before it passed:

    server -> client   GREETING (8 bytes) + server nonce (16 random bytes, fresh per connection)
    client -> server   HELLO: magic "NPHC", u8 version (2), u8 channel, u16 flags (bit 0: encrypt),
                       handoff id (16 bytes), client nonce (16 random bytes),
                       HMAC-SHA256(token, "hello" | server nonce | client nonce | id | channel | flags)
    server -> client   status (2 bytes: "OK", or "NE" = the other end wants the other encryption setting),
                       HMAC-SHA256(token, "accept" | status | the same transcript): the server holds the
                       token too (mutual authentication); a bad HELLO gets no answer, only a close

The token is 32 random bytes made by the controller for one handoff and given to both nodes over SSH
(the agent); it never crosses the node link. The flags are under both MACs, so nobody on the link can
turn encryption off (or on) for a connection; a mismatch between the two nodes' settings is refused with
a message that says so. Threat model: docs/handoff.md, "The handoff port and its threat model".

Encrypted channels (``SealedSocket``) then carry records in both directions, each under its own key
(HKDF-SHA256 of the token, salted with both nonces, bound to id, channel and flags):

    u8 type (DATA 0x17 | CLOSE 0x15), u64 sequence number, u32 length, AES-256-GCM ciphertext + 16-byte tag

with the 13-byte header as associated data and the sequence number as the GCM nonce. A changed byte, a
record replayed, reordered or taken from another connection, and a stream that ends without the
authenticated CLOSE record are all reported as ``ChannelIntegrityError``. Plain channels carry the bytes
as they are.

Either way, both directions carry messages: u8 type, u32 length, payload (``send_msg``/``MsgReader``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nephele.errors import HandoffError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

GREETING = b"NPHHO1\r\n"  # unchanged from version 1, so an old client is refused by version, not ignored
HELLO_MAGIC = b"NPHC"
VERSION = 2
NONCE_LEN = 16
ID_LEN = 16
TOKEN_LEN = 32
MAC_LEN = 32
FLAG_ENCRYPT = 0x0001
_HELLO_HEAD = struct.Struct(">4sBBH")  # magic, version, channel, flags: checked before the rest is read
_HELLO_REST = struct.Struct(">16s16s32s")  # handoff id, client nonce, mac
HELLO_LEN = _HELLO_HEAD.size + _HELLO_REST.size
OK = b"OK"
MISMATCH = b"NE"
ANSWER_LEN = 2 + MAC_LEN
HELLO_TIMEOUT = 10.0
USER_TIMEOUT_MS = 20_000

# Default for both ends. bench/channel_crypto.py measures the cost (docs/handoff.md quotes it): AES-GCM
# runs at GB/s per core here, orders of magnitude above any WAN link this carries.
ENCRYPT_DEFAULT = True

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


def _transcript(s_nonce: bytes, c_nonce: bytes, handoff_id: bytes, channel: int, flags: int) -> bytes:
    return s_nonce + c_nonce + handoff_id + struct.pack(">BH", channel, flags)


def _mac(token: bytes, label: bytes, data: bytes) -> bytes:
    # distinct labels: a client's hello MAC can never serve as a server's answer, or the other way round
    return hmac.new(token, b"nephele-handoff-v2 " + label + b"\0" + data, hashlib.sha256).digest()


def _keys(token: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key), fresh for every connection (both nonces)."""
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=transcript[: 2 * NONCE_LEN],
        info=b"nephele-handoff-v2 channel keys\0" + transcript[2 * NONCE_LEN :],
    ).derive(token)
    return okm[:32], okm[32:]


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


def _setting(encrypt: bool) -> str:
    return "encrypted" if encrypt else "unencrypted (plain)"


def connect_channel(
    host: str,
    port: int,
    handoff_id: bytes,
    token: bytes,
    channel: int,
    *,
    timeout: float = 15.0,
    encrypt: bool = ENCRYPT_DEFAULT,
) -> socket.socket:
    """Open one channel to a destination's handoff port (client side of the hello). With ``encrypt`` the
    result is a ``SealedSocket``: the same socket API, every byte sealed on the wire."""
    what = f"{CHANNEL_NAMES.get(channel, channel)} channel to {host}:{port}"
    flags = FLAG_ENCRYPT if encrypt else 0
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise HandoffError(f"cannot open the {what}: {exc}") from None
    try:
        greeting = recv_exact(sock, len(GREETING) + NONCE_LEN)
        if greeting[: len(GREETING)] != GREETING:
            raise HandoffError(f"{what}: not a nephele handoff port")
        c_nonce = os.urandom(NONCE_LEN)
        tr = _transcript(greeting[len(GREETING) :], c_nonce, handoff_id, channel, flags)
        sock.sendall(
            _HELLO_HEAD.pack(HELLO_MAGIC, VERSION, channel, flags)
            + _HELLO_REST.pack(handoff_id, c_nonce, _mac(token, b"hello", tr))
        )
        answer = recv_exact(sock, ANSWER_LEN)
        status, proof = answer[:2], answer[2:]
        expected = _mac(token, b"accept" + status, tr)
        if status not in (OK, MISMATCH) or not hmac.compare_digest(proof, expected):
            raise HandoffError(f"{what}: refused: the destination did not prove it holds the handoff token")
        if status == MISMATCH:
            raise HandoffError(
                f"{what}: refused: encryption mismatch: this node asked for an {_setting(encrypt)} channel, "
                f"the destination expects an {_setting(not encrypt)} one (both nodes of a handoff must be "
                "given the same setting)"
            )
    except (OSError, ConnectionError) as exc:
        sock.close()
        raise HandoffError(f"{what}: the destination refused the handoff ({exc})") from None
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    tune(sock)
    if not encrypt:
        return sock
    c2s, s2c = _keys(token, tr)
    return SealedSocket.wrap(sock, send_key=c2s, recv_key=s2c)


@dataclass
class Accepted:
    sock: socket.socket  # a SealedSocket on an encrypted handoff
    channel: int
    peer: str


class HandoffListener:
    """The destination's handoff port for one announced handoff. ``accept_loop`` authenticates each
    connection (in a thread of its own, so a silent client cannot block the others) and hands the good
    ones to ``on_channel``; bad ones are closed and counted in ``refused``. ``encrypt`` is this handoff's
    setting: a client asking for the other one is refused (and told why)."""

    def __init__(
        self, address: str, port: int, handoff_id: bytes, token: bytes, *, encrypt: bool = ENCRYPT_DEFAULT
    ) -> None:
        if len(token) != TOKEN_LEN or len(handoff_id) != ID_LEN:
            raise HandoffError("handoff token or id has the wrong length")
        self.handoff_id = handoff_id
        self.encrypt = encrypt
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

    def _refuse(self, conn: socket.socket, why: str) -> None:
        self.refused.append(why)
        conn.close()

    def authenticate(self, conn: socket.socket, peer: str) -> Accepted | None:
        """The server side of the hello: the channel (wrapped when encrypted), or None if refused."""
        try:
            conn.settimeout(HELLO_TIMEOUT)
            s_nonce = os.urandom(NONCE_LEN)
            conn.sendall(GREETING + s_nonce)
            magic, version, channel, flags = _HELLO_HEAD.unpack(recv_exact(conn, _HELLO_HEAD.size))
            if magic != HELLO_MAGIC:
                self._refuse(conn, f"{peer}: bad hello")
                return None
            if version != VERSION:  # its hello may have another length: do not read on
                self._refuse(conn, f"{peer}: hello of protocol version {version}, this node speaks {VERSION}")
                return None
            hid, c_nonce, mac = _HELLO_REST.unpack(recv_exact(conn, _HELLO_REST.size))
            tr = _transcript(s_nonce, c_nonce, hid, channel, flags)
            good = (
                channel in CHANNEL_NAMES
                and flags & ~FLAG_ENCRYPT == 0
                and hmac.compare_digest(hid, self.handoff_id)
                and hmac.compare_digest(mac, _mac(self._token, b"hello", tr))
            )
            if not good:
                self._refuse(conn, f"{peer}: bad hello")
                return None
            encrypt = bool(flags & FLAG_ENCRYPT)
            if encrypt != self.encrypt:  # authenticated, so it may learn why (recorded before it does)
                self.refused.append(
                    f"{peer}: encryption mismatch: the source asked for an {_setting(encrypt)} "
                    f"{CHANNEL_NAMES[channel]} channel, this handoff is {_setting(self.encrypt)}"
                )
                with contextlib.suppress(OSError):
                    conn.sendall(MISMATCH + _mac(self._token, b"accept" + MISMATCH, tr))
                conn.close()
                return None
            conn.sendall(OK + _mac(self._token, b"accept" + OK, tr))
            conn.settimeout(None)
            tune(conn)
            if not encrypt:
                return Accepted(conn, int(channel), peer)
            c2s, s2c = _keys(self._token, tr)
            return Accepted(SealedSocket.wrap(conn, send_key=s2c, recv_key=c2s), int(channel), peer)
        except (OSError, ConnectionError, struct.error) as exc:
            self._refuse(conn, f"{peer}: {exc}")
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
                acc = self.authenticate(conn, peer)
                if acc is not None:
                    on_channel(acc)

            threading.Thread(target=run, name="handoff-hello", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.sock.close()


# --------------------------------------------------------------------------------------------- records


class ChannelClosed(HandoffError):
    pass


class ChannelIntegrityError(ChannelClosed):
    """An encrypted channel's bytes are not what the peer sent: changed, replayed, reordered, injected
    or cut short on the link. The channel is unusable from then on."""


REC_DATA = 0x17
REC_CLOSE = 0x15
_REC = struct.Struct(">BQI")  # type, sequence number, ciphertext length (with the tag)
TAG_LEN = 16
MAX_RECORD = 64 << 10  # plaintext per record: the receiver holds at most this much unverified
_RECV_CHUNK = 256 << 10
CLOSE_LOCK_WAIT = 2.0  # shutdown()/close() send the CLOSE record only if a sender frees the lock by then
CLOSE_SEND_WAIT = 5.0  # ... and only if the peer takes it by then (never hang an abort)


# cryptography >= 46 seals straight into the record buffer (one copy less per record); older ones copy
_ENCRYPT_INTO = hasattr(AESGCM, "encrypt_into")


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")


class SealedSocket(socket.socket):
    """A connected TCP socket whose bytes travel as AES-256-GCM records (format in the module doc).

    A drop-in for the code that holds a channel: ``recv``/``recv_into``/``sendall``/``send`` carry
    plaintext, ``shutdown(SHUT_WR|SHUT_RDWR)`` and ``close`` first send the authenticated CLOSE record (a
    bounded wait: an abort never hangs), so a peer reads ``b""`` exactly where a plain peer would, while
    an end without that record is reported as truncation. One reader thread and any number of sender
    threads may use it at once (as the channels' users do). Whatever would bypass the records (dup,
    sendfile, sendmsg, recvmsg, ...) raises."""

    _aead_tx: AESGCM
    _aead_rx: AESGCM
    _wlock: threading.Lock
    _rlock: threading.Lock
    _seq_tx: int
    _seq_rx: int
    _raw: bytearray
    _plain: bytes
    _pos: int
    _eof: bool
    _close_sent: bool  # no more records may be sent (the CLOSE went out, or a send broke mid-record)
    _shut_rd: bool
    _failure: ChannelIntegrityError | None
    wire_in: int
    wire_out: int
    # A rate limit on what this channel puts on the link: called with each record's size (header and tag
    # included) before it is sent, e.g. a token bucket's take. Set it instead of wrapping this socket in
    # another socket class: such a wrap detaches the descriptor, which would leave the records behind.
    pace: Callable[[int], None] | None

    @classmethod
    def wrap(cls, sock: socket.socket, *, send_key: bytes, recv_key: bytes) -> SealedSocket:
        """Take over ``sock``'s connection (``sock`` is detached and must not be used any more)."""
        family, type_, proto, timeout = sock.family, sock.type, sock.proto, sock.gettimeout()
        self = cls(family, type_, proto, fileno=sock.detach())
        self.settimeout(timeout)
        self._aead_tx, self._aead_rx = AESGCM(send_key), AESGCM(recv_key)
        self._wlock, self._rlock = threading.Lock(), threading.Lock()
        self._seq_tx = self._seq_rx = 0
        self._raw = bytearray()
        self._plain, self._pos = b"", 0
        self._eof = self._close_sent = self._shut_rd = False
        self._failure = None
        self.wire_in = self.wire_out = 0
        self.pace = None
        return self

    # -- sending -------------------------------------------------------------------------------------
    def _seal(self, rtype: int, data: memoryview) -> bytearray:
        n = len(data) + TAG_LEN
        head = _REC.pack(rtype, self._seq_tx, n)
        if _ENCRYPT_INTO:
            rec = bytearray(_REC.size + n)
            rec[: _REC.size] = head
            self._aead_tx.encrypt_into(_nonce(self._seq_tx), data, head, memoryview(rec)[_REC.size :])
        else:
            rec = bytearray(head)
            rec += self._aead_tx.encrypt(_nonce(self._seq_tx), data, head)
        self._seq_tx += 1
        return rec

    def sendall(self, data: ReadableBuffer, flags: int = 0, /) -> None:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "send flags on an encrypted handoff channel")
        mv = memoryview(data).cast("B")
        with self._wlock:
            if self._close_sent:
                raise BrokenPipeError(errno.EPIPE, "the encrypted channel was closed for sending")
            for off in range(0, len(mv), MAX_RECORD):
                rec = self._seal(REC_DATA, mv[off : off + MAX_RECORD])
                if self.pace is not None:
                    self.pace(len(rec))
                try:
                    super().sendall(rec)
                except BaseException:
                    self._close_sent = True  # part of a record may be out: nothing may follow it
                    raise
                self.wire_out += len(rec)

    def send(self, data: ReadableBuffer, flags: int = 0, /) -> int:
        self.sendall(data, flags)
        return memoryview(data).nbytes

    def _send_close(self) -> None:
        """Best effort, bounded: a peer that reads nothing, or a sender stuck holding the lock, means
        the connection is being torn down anyway; the peer then reports truncation."""
        if self.fileno() < 0 or not self._wlock.acquire(timeout=CLOSE_LOCK_WAIT):
            return
        try:
            if self._close_sent:
                return
            self._close_sent = True
            rec = memoryview(self._seal(REC_CLOSE, memoryview(b"")))
            deadline = time.monotonic() + CLOSE_SEND_WAIT
            with contextlib.suppress(OSError, ValueError):
                while rec:
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([], [self], [], left)[1]:
                        return
                    try:
                        sent = super().send(rec, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    self.wire_out += sent
                    rec = rec[sent:]
        finally:
            self._wlock.release()

    def shutdown(self, how: int, /) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_close()
        if how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._shut_rd = True  # an end of stream after this is our own doing, not the link's
        super().shutdown(how)

    def close(self) -> None:
        if self.fileno() >= 0:
            self._shut_rd = True
            self._send_close()
        super().close()

    # -- receiving -----------------------------------------------------------------------------------
    def _fail(self, why: str) -> NoReturn:
        self._failure = ChannelIntegrityError(f"encrypted handoff channel: {why}")
        raise self._failure

    def _fill(self) -> bool:
        data = super().recv(_RECV_CHUNK)
        if not data:
            return False
        self.wire_in += len(data)
        self._raw += data
        return True

    def _next_record(self) -> bool:
        """Decrypt the next DATA record into the plaintext buffer; False at the authenticated end."""
        while True:
            while len(self._raw) < _REC.size:
                if not self._fill():
                    self._truncated()
            rtype, seq, n = _REC.unpack_from(self._raw, 0)
            if seq != self._seq_rx:
                self._fail(
                    f"record #{seq} arrived where #{self._seq_rx} was due (replayed, reordered or injected "
                    "on the link)"
                )
            if rtype not in (REC_DATA, REC_CLOSE) or not TAG_LEN <= n <= MAX_RECORD + TAG_LEN:
                self._fail(f"record #{seq} has a corrupted header (type {rtype:#x}, length {n})")
            while len(self._raw) < _REC.size + n:
                if not self._fill():
                    self._truncated()
            head = bytes(self._raw[: _REC.size])
            try:
                plain = self._aead_rx.decrypt(
                    _nonce(seq), memoryview(self._raw)[_REC.size : _REC.size + n], head
                )
            except InvalidTag:
                self._fail(
                    f"record #{seq} failed authentication (changed on the link, or not from this peer)"
                )
            del self._raw[: _REC.size + n]
            self._seq_rx += 1
            if rtype == REC_CLOSE:
                if plain or self._raw:
                    self._fail(f"data after the close record #{seq}")
                self._eof = True
                return False
            if plain:  # an empty DATA record must not read as the end of stream
                self._plain, self._pos = plain, 0
                return True

    def _truncated(self) -> NoReturn:
        if self._shut_rd:  # we shut our own read side: end quietly, as a plain socket does
            self._eof = True
            raise _LocalEnd
        where = f" inside record #{self._seq_rx}" if self._raw else f" after {self._seq_rx} records"
        self._fail(
            f"the stream ended without its close record{where} (cut on the link, or the peer process died)"
        )

    def recv(self, bufsize: int, flags: int = 0, /) -> bytes:
        if flags:
            raise OSError(errno.EOPNOTSUPP, "recv flags on an encrypted handoff channel")
        with self._rlock:
            if self._failure is not None:
                raise self._failure
            if self._pos >= len(self._plain):
                if self._eof or bufsize <= 0:
                    return b""
                try:
                    if not self._next_record():
                        return b""
                except _LocalEnd:
                    return b""
            if self._pos == 0 and bufsize >= len(self._plain):
                out, self._plain = self._plain, b""
                return out
            out = self._plain[self._pos : self._pos + bufsize]
            self._pos += len(out)
            return out

    def recv_into(self, buffer: WriteableBuffer, nbytes: int = 0, flags: int = 0, /) -> int:
        view = memoryview(buffer).cast("B")
        data = self.recv(nbytes or len(view), flags)
        view[: len(data)] = data
        return len(data)

    def buffered(self) -> bool:
        """Whether a recv could return without waiting on the network (plaintext or bytes held here)."""
        return self._pos < len(self._plain) or bool(self._raw) or self._eof or self._failure is not None

    # -- everything that would go around the records -------------------------------------------------
    def detach(self) -> int:
        raise OSError(
            errno.EOPNOTSUPP,
            "an encrypted handoff channel cannot be detached (a socket made from its descriptor would send "
            "plaintext into the records); to limit its rate, set its .pace",
        )

    def _bypass(self, *_a: Any, **_k: Any) -> NoReturn:
        raise OSError(errno.EOPNOTSUPP, "not available on an encrypted handoff channel")

    dup = sendfile = sendmsg = sendto = recvmsg = recvmsg_into = recvfrom = recvfrom_into = _bypass


class _LocalEnd(Exception):
    """Internal: the raw stream ended after our own shutdown of the read side."""


# --------------------------------------------------------------------------------------------- messages


def pack_msg(mtype: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    return _MSG.pack(mtype, len(payload)) + bytes(payload)


class MsgSender:
    """Thread-safe message writer with byte accounting (bytes on the wire: record overhead included)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.bytes = 0

    def send(self, mtype: int, payload: bytes | bytearray | memoryview = b"") -> None:
        head = _MSG.pack(mtype, len(payload))
        sealed = self.sock if isinstance(self.sock, SealedSocket) else None
        with self.lock:
            if sealed is not None:
                before = sealed.wire_out
                if len(payload) <= MAX_RECORD - len(head):  # one record, not a 5-byte one plus another
                    sealed.sendall(head + bytes(payload))
                else:
                    sealed.sendall(head)
                    sealed.sendall(payload)
                self.bytes += sealed.wire_out - before
                return
            self.sock.sendall(head)
            if payload:
                self.sock.sendall(payload)
            self.bytes += len(head) + len(payload)


class MsgReader:
    """Reads whole messages; ``pending()`` says whether a message may be read without blocking long."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.bytes = 0  # on the wire: record overhead included when the channel is encrypted
        self.eof = False

    def pending(self) -> bool:
        if len(self.buf) >= _MSG.size:
            (n,) = struct.unpack_from(">I", self.buf, 1)
            if len(self.buf) >= _MSG.size + n:
                return True
        if self.eof or (isinstance(self.sock, SealedSocket) and self.sock.buffered()):
            return True
        r, _, _ = select.select([self.sock], [], [], 0)
        return bool(r)

    def _fill(self) -> bool:
        sealed = self.sock if isinstance(self.sock, SealedSocket) else None
        before = sealed.wire_in if sealed is not None else 0
        data = self.sock.recv(1 << 20)
        self.bytes += (sealed.wire_in - before) if sealed is not None else len(data)
        if not data:
            self.eof = True
            return False
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
