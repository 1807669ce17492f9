"""The handoff port's channels on loopback: the hello (token, mutual proof, encryption agreement) and the
encrypted record layer (round trips, large transfers, and a relay on the link that changes, reorders,
replays, injects or cuts records), plus plain mode byte for byte as before."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from nephele.errors import HandoffError
from nephele.handoff import channel as ch
from nephele.handoff.forward import forward

WAIT = 10.0

Mangle = Callable[[int, bytes], list[bytes]]


class Port:
    """A listener for one handoff, its accepted channels in a queue."""

    def __init__(self, *, encrypt: bool = True) -> None:
        self.hid, self.token = ch.new_handoff_id(), ch.new_token()
        self.listener = ch.HandoffListener("127.0.0.1", 0, self.hid, self.token, encrypt=encrypt)
        self.accepted: queue.Queue[ch.Accepted] = queue.Queue()
        threading.Thread(target=self.listener.accept_loop, args=(self.accepted.put,), daemon=True).start()

    def connect(
        self, channel: int = ch.MEMORY, *, encrypt: bool = True, port: int | None = None
    ) -> socket.socket:
        return ch.connect_channel(
            "127.0.0.1", port or self.listener.port, self.hid, self.token, channel, encrypt=encrypt
        )

    def pair(self, *, encrypt: bool = True, port: int | None = None) -> tuple[socket.socket, socket.socket]:
        client = self.connect(encrypt=encrypt, port=port)
        return client, self.accepted.get(timeout=WAIT).sock

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def port() -> Iterator[Port]:
    p = Port()
    yield p
    p.close()


def send_and_end(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 20):
        out += data
    return bytes(out)


def test_encrypted_round_trip_both_directions_with_half_close(port: Port) -> None:
    client, server = port.pair()
    assert isinstance(client, ch.SealedSocket) and isinstance(server, ch.SealedSocket)
    client.sendall(b"hello from the source")
    assert server.recv(100) == b"hello from the source"
    server.sendall(b"and back")
    assert client.recv(3) == b"and"  # partial reads of one record
    assert client.recv(100) == b" back"
    client.shutdown(socket.SHUT_WR)  # the memory source's end of stream; the return path stays open
    assert server.recv(100) == b""
    server.sendall(b"late return path")
    assert client.recv(100) == b"late return path"
    server.close()
    assert client.recv(100) == b""
    assert client.recv(100) == b""  # stays at the end
    client.close()


@pytest.mark.parametrize("encrypt", [True, False])
def test_large_transfers_both_directions_at_once(encrypt: bool) -> None:
    p = Port(encrypt=encrypt)
    try:
        client, server = p.pair(encrypt=encrypt)
        up, down = os.urandom(24 << 20), os.urandom(9 << 20)
        got: dict[str, bytes] = {}

        def receive(name: str, s: socket.socket) -> None:
            got[name] = read_all(s)

        threads = [
            threading.Thread(target=receive, args=("up", server)),
            threading.Thread(target=receive, args=("down", client)),
        ]
        for t in threads:
            t.start()
        sender = threading.Thread(target=send_and_end, args=(server, down))
        sender.start()
        mv = memoryview(up)
        for off in range(0, len(up), 3_000_001):  # odd sizes: records split and joined anywhere
            client.sendall(mv[off : off + 3_000_001])
        client.shutdown(socket.SHUT_WR)
        sender.join(WAIT)
        for t in threads:
            t.join(WAIT)
        assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
        assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
        if encrypt:
            assert isinstance(client, ch.SealedSocket)
            records = -(-len(up) // ch.MAX_RECORD)
            assert client.wire_out >= len(up) + records * (13 + ch.TAG_LEN)
        client.close()
        server.close()
    finally:
        p.close()


def test_messages_over_an_encrypted_channel_count_wire_bytes(port: Port) -> None:
    client, server = port.pair()
    tx, rx = ch.MsgSender(client), ch.MsgReader(server)
    payloads = [b"", b"x", os.urandom(ch.MAX_RECORD - 5), os.urandom(ch.MAX_RECORD), os.urandom(5 << 20)]

    def send() -> None:
        for i, pl in enumerate(payloads):
            tx.send(i, pl)
        client.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    for i, pl in enumerate(payloads):
        assert rx.read() == (i, pl)
    assert rx.read() is None
    t.join(WAIT)
    assert isinstance(client, ch.SealedSocket) and isinstance(server, ch.SealedSocket)
    assert tx.bytes == client.wire_out - (13 + ch.TAG_LEN)  # all but the close record
    assert rx.bytes == server.wire_in
    client.close()
    server.close()


def test_pending_sees_plaintext_already_decrypted(port: Port) -> None:
    client, server = port.pair()
    tx, rx = ch.MsgSender(client), ch.MsgReader(server)
    tx.send(1, b"a")
    tx.send(2, b"b")
    deadline = time.monotonic() + WAIT
    while not rx.pending():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert rx.read() == (1, b"a")
    assert rx.pending()  # the second message is held in the reader or the socket, not on the wire
    assert rx.read() == (2, b"b")
    client.close()
    server.close()


def test_forwarding_through_an_encrypted_channel_is_a_drop_in() -> None:
    """forward.py (disk and control channels) on both ends, unchanged, over an encrypted channel."""
    p = Port()
    try:
        wan_src, wan_dst = p.pair()
        a_app, a_local = socket.socketpair()
        b_local, b_app = socket.socketpair()
        t1 = threading.Thread(target=forward, args=(a_local, wan_src), daemon=True)
        t2 = threading.Thread(target=forward, args=(b_local, wan_dst), daemon=True)
        t1.start()
        t2.start()
        data = os.urandom(6 << 20) + bytes(4 << 20)  # compressible tail: DATA_LZ4 messages too
        threading.Thread(target=send_and_end, args=(a_app, data)).start()
        assert read_all(b_app) == data
        b_app.sendall(b"reply")
        b_app.shutdown(socket.SHUT_WR)
        assert read_all(a_app) == b"reply"
        t1.join(WAIT)
        t2.join(WAIT)
        assert not t1.is_alive() and not t2.is_alive()
        a_app.close()
        b_app.close()
    finally:
        p.close()


# ------------------------------------------------------------------------------------------- the hello


def test_wrong_token_or_id_is_refused_before_anything_is_read(port: Port) -> None:
    with pytest.raises(HandoffError, match="refused"):
        ch.connect_channel("127.0.0.1", port.listener.port, port.hid, ch.new_token(), ch.MEMORY)
    with pytest.raises(HandoffError, match="refused"):
        ch.connect_channel("127.0.0.1", port.listener.port, ch.new_handoff_id(), port.token, ch.DISK)
    # a client without the token streaming data right after its hello gets no answer and no channel
    with socket.create_connection(("127.0.0.1", port.listener.port)) as raw:
        raw.recv(64)
        raw.sendall(struct.pack(">4sBBH", b"NPHC", ch.VERSION, ch.MEMORY, 1) + bytes(64) + b"QEVM" * 1000)
        raw.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(16) == b""
    assert port.accepted.empty()
    assert len(port.listener.refused) == 3 and all("bad hello" in r for r in port.listener.refused)


def test_an_old_protocol_version_is_refused_by_name(port: Port) -> None:
    with socket.create_connection(("127.0.0.1", port.listener.port)) as raw:
        raw.recv(64)
        raw.sendall(struct.pack(">4sBBH16s32s", b"NPHC", 1, ch.MEMORY, 0, port.hid, bytes(32)))
        raw.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(16) == b""
    deadline = time.monotonic() + WAIT
    while not port.listener.refused:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "protocol version 1" in port.listener.refused[0]
    assert port.accepted.empty()


def test_a_sniffed_hello_cannot_be_replayed(port: Port) -> None:
    """Record a good client's hello off the link and send it again on a new connection."""
    hello = bytearray()
    up = socket.create_server(("127.0.0.1", 0))

    def relay() -> None:
        a, _ = up.accept()
        b = socket.create_connection(("127.0.0.1", port.listener.port))
        b.settimeout(WAIT)
        a.sendall(b.recv(64))
        hello.extend(ch.recv_exact(a, ch.HELLO_LEN))
        b.sendall(hello)
        a.sendall(ch.recv_exact(b, ch.ANSWER_LEN))
        a.close()
        b.close()

    t = threading.Thread(target=relay, daemon=True)
    t.start()
    good = port.connect(port=up.getsockname()[1])
    t.join(WAIT)
    port.accepted.get(timeout=WAIT)
    good.close()
    with socket.create_connection(("127.0.0.1", port.listener.port)) as raw:
        raw.settimeout(WAIT)
        raw.recv(64)
        raw.sendall(bytes(hello))
        with contextlib.suppress(ConnectionResetError):
            assert raw.recv(16) == b""
    up.close()
    assert port.accepted.empty()


def test_a_server_without_the_token_is_not_trusted() -> None:
    """Mutual authentication: a fake handoff port that answers OK without the token is refused."""
    fake = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        c, _ = fake.accept()
        c.sendall(ch.GREETING + os.urandom(ch.NONCE_LEN))
        ch.recv_exact(c, ch.HELLO_LEN)
        c.sendall(ch.OK + bytes(ch.MAC_LEN))
        time.sleep(0.5)
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    with pytest.raises(HandoffError, match="did not prove it holds the handoff token"):
        ch.connect_channel(
            "127.0.0.1", fake.getsockname()[1], ch.new_handoff_id(), ch.new_token(), ch.CONTROL
        )
    fake.close()


@pytest.mark.parametrize("server_encrypts", [True, False])
def test_an_encryption_mismatch_is_refused_with_a_clear_message(server_encrypts: bool) -> None:
    p = Port(encrypt=server_encrypts)
    try:
        asked, expects = (
            ("an unencrypted", "an encrypted") if server_encrypts else ("an encrypted", "an unen")
        )
        with pytest.raises(
            HandoffError,
            match=f"encryption mismatch: this node asked for {asked} .*the destination expects {expects}",
        ):
            p.connect(ch.DISK, encrypt=not server_encrypts)
        assert p.accepted.empty()
        assert len(p.listener.refused) == 1 and "encryption mismatch" in p.listener.refused[0]
        good = p.connect(ch.DISK, encrypt=server_encrypts)  # the agreed setting still works
        assert p.accepted.get(timeout=WAIT).channel == ch.DISK
        good.close()
    finally:
        p.close()


def test_plain_mode_is_unchanged_on_the_wire() -> None:
    """Unencrypted, the bytes after the hello are the message framing itself, as before encryption."""
    p = Port(encrypt=False)
    try:
        client, server = p.pair(encrypt=False)
        assert type(client) is socket.socket and type(server) is socket.socket
        tx = ch.MsgSender(client)
        tx.send(7, b"payload")
        tx.send(9)
        client.shutdown(socket.SHUT_WR)
        assert read_all(server) == ch.pack_msg(7, b"payload") + ch.pack_msg(9)
        assert tx.bytes == 2 * 5 + 7
        client.close()
        server.close()
    finally:
        p.close()


def test_the_two_directions_and_connections_have_different_keys(port: Port) -> None:
    c1, s1 = port.pair()
    c2, s2 = port.pair()
    assert isinstance(c1, ch.SealedSocket) and isinstance(s1, ch.SealedSocket)
    assert isinstance(c2, ch.SealedSocket)
    probe = b"same plaintext" * 4
    sealed = {
        bytes(s._seal(ch.REC_DATA, memoryview(probe)))
        for s in (c1, s1, c2)  # each at sequence number 0
    }
    assert len(sealed) == 3
    for s in (c1, s1, c2, s2):
        s.close()


# --------------------------------------------------------------------------------- attacks on the link


class Relay:
    """A TCP relay on the node link. Client -> server: the hello verbatim, then each record through
    ``mangle(index, record) -> records to send``; ``cut_after`` stops (FIN) after that many records
    (``half``: after half of the next one)."""

    def __init__(
        self, target: int, mangle: Mangle | None = None, *, cut_after: int | None = None, half: bool = False
    ) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.target = target
        self.mangle = mangle or (lambda i, r: [r])
        self.cut_after = cut_after
        self.half = half
        self.records: list[bytes] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        a, _ = self.srv.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._back, args=(b, a), daemon=True).start()
        with contextlib.suppress(OSError, ConnectionError):
            b.sendall(ch.recv_exact(a, ch.HELLO_LEN))
            i = 0
            while True:
                try:
                    head = ch.recv_exact(a, 13)
                except ConnectionError:
                    break
                (n,) = struct.unpack_from(">I", head, 9)
                rec = head + ch.recv_exact(a, n)
                self.records.append(rec)
                if self.cut_after is not None and i >= self.cut_after:
                    if self.half:
                        b.sendall(rec[: len(rec) // 2])
                    break
                for out in self.mangle(i, rec):
                    b.sendall(out)
                i += 1
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    @staticmethod
    def _back(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def through(relay_factory: Callable[[int], Relay], sends: list[bytes]) -> tuple[bytes, BaseException | None]:
    """Send ``sends`` (one record each) through a relay and close; what the server read, and its error."""
    p = Port()
    try:
        relay = relay_factory(p.listener.port)
        client = p.connect(port=relay.port)
        server = p.accepted.get(timeout=WAIT).sock
        server.settimeout(WAIT)
        for s in sends:
            client.sendall(s)
        client.close()
        got = bytearray()
        try:
            while data := server.recv(1 << 20):
                got += data
        except HandoffError as exc:
            with pytest.raises(type(exc)):  # the channel stays failed
                server.recv(10)
            return bytes(got), exc
        finally:
            server.close()
        return bytes(got), None
    finally:
        p.close()


SENDS = [b"record zero", b"record one", b"record two"]


def test_an_untouched_relay_changes_nothing() -> None:
    got, err = through(lambda port: Relay(port), SENDS)
    assert err is None and got == b"".join(SENDS)


@pytest.mark.parametrize("where", [0, 5, 12, 13, 20, -1])  # header (type, seq, length), ciphertext, tag
def test_a_changed_byte_is_detected(where: int) -> None:
    def flip(i: int, rec: bytes) -> list[bytes]:
        if i != 1:
            return [rec]
        b = bytearray(rec)
        b[where] ^= 0x01
        return [bytes(b)]

    got, err = through(lambda port: Relay(port, flip), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError), err
    assert got == SENDS[0]  # nothing of the changed record or after it was delivered
    assert "record #1" in str(err)


def test_a_changed_length_field_cannot_make_the_reader_wait_or_allocate() -> None:
    def grow(i: int, rec: bytes) -> list[bytes]:
        return [rec[:9] + struct.pack(">I", 1 << 30) + rec[13:]] if i == 1 else [rec]

    got, err = through(lambda port: Relay(port, grow), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError) and "corrupted header" in str(err)
    assert got == SENDS[0]


def test_reordered_records_are_detected() -> None:
    held: list[bytes] = []

    def swap(i: int, rec: bytes) -> list[bytes]:
        if i == 0:
            held.append(rec)
            return []
        if i == 1:
            return [rec, held[0]]
        return [rec]

    got, err = through(lambda port: Relay(port, swap), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError)
    assert "record #1 arrived where #0 was due" in str(err)
    assert got == b""


def test_a_replayed_record_is_detected() -> None:
    def twice(i: int, rec: bytes) -> list[bytes]:
        return [rec, rec] if i == 1 else [rec]

    got, err = through(lambda port: Relay(port, twice), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError)
    assert "record #1 arrived where #2 was due" in str(err)
    assert got == SENDS[0] + SENDS[1]


def test_a_dropped_record_is_detected() -> None:
    got, err = through(lambda port: Relay(port, lambda i, r: [] if i == 1 else [r]), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError) and "#2 arrived where #1 was due" in str(err)
    assert got == SENDS[0]


def test_a_record_from_another_connection_of_the_same_handoff_is_detected() -> None:
    """Same token, same sequence number, but other nonces: other keys."""
    p = Port()
    try:
        first = Relay(p.listener.port)
        c1 = p.connect(port=first.port)
        s1 = p.accepted.get(timeout=WAIT).sock
        c1.sendall(b"from connection one")
        assert s1.recv(100) == b"from connection one"
        foreign = first.records[0]

        second = Relay(p.listener.port, lambda i, r: [foreign] if i == 0 else [r])
        c2 = p.connect(port=second.port)
        s2 = p.accepted.get(timeout=WAIT).sock
        s2.settimeout(WAIT)
        c2.sendall(b"from connection two")
        with pytest.raises(ch.ChannelIntegrityError, match="record #0 failed authentication"):
            s2.recv(100)
        for s in (c1, s1, c2, s2):
            s.close()
    finally:
        p.close()


@pytest.mark.parametrize("cut_after", [0, 2, 3])  # before any record, mid-stream, just the close record
def test_a_stream_cut_short_is_detected(cut_after: int) -> None:
    got, err = through(lambda port: Relay(port, cut_after=cut_after), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError), err
    assert "ended without its close record" in str(err)
    assert got == b"".join(SENDS[:cut_after])


def test_a_stream_cut_inside_a_record_is_detected() -> None:
    got, err = through(lambda port: Relay(port, cut_after=1, half=True), SENDS)
    assert isinstance(err, ch.ChannelIntegrityError) and "inside record #1" in str(err)
    assert got == SENDS[0]


def test_integrity_errors_are_handoff_errors_the_channel_users_catch() -> None:
    assert issubclass(ch.ChannelIntegrityError, ch.ChannelClosed)
    assert issubclass(ch.ChannelClosed, HandoffError)


# ---------------------------------------------------------------------------------- socket behaviour


def test_an_abort_from_another_thread_never_hangs_on_a_blocked_sender(port: Port) -> None:
    """A sender stuck because the peer reads nothing; another thread shuts the channel down to abort."""
    client, server = port.pair()
    errors: list[BaseException] = []

    def stuck() -> None:
        try:
            client.sendall(bytes(256 << 20))
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=stuck, daemon=True)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    client.shutdown(socket.SHUT_RDWR)
    t.join(WAIT)
    assert not t.is_alive() and errors
    assert time.monotonic() - t0 < ch.CLOSE_LOCK_WAIT + 2
    client.close()
    server.close()


def test_own_read_shutdown_ends_quietly(port: Port) -> None:
    client, server = port.pair()
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(server.recv(10)), daemon=True)
    t.start()
    time.sleep(0.2)
    server.shutdown(socket.SHUT_RDWR)  # our own abort: b"", as on a plain socket, not an integrity error
    t.join(WAIT)
    assert got == [b""]
    client.close()
    server.close()


def test_calls_that_would_bypass_the_records_are_refused(port: Port) -> None:
    client, server = port.pair()
    for call in (client.dup, lambda: client.sendmsg([b"x"]), lambda: client.recvfrom(10)):
        with pytest.raises(OSError, match="not available on an encrypted"):
            call()
    with pytest.raises(OSError):
        client.recv(10, socket.MSG_PEEK)
    client.sendall(b"x")
    client.close()
    with pytest.raises(OSError):
        client.sendall(b"after close")
    assert server.recv(10) == b"x"
    assert server.recv(10) == b""
    server.close()


def test_records_are_the_same_without_encrypt_into(port: Port, monkeypatch: pytest.MonkeyPatch) -> None:
    """Older cryptography releases lack AESGCM.encrypt_into; the fallback must make the same records."""
    client, server = port.pair()
    assert isinstance(client, ch.SealedSocket)
    monkeypatch.setattr(ch, "_ENCRYPT_INTO", False)
    slow = bytes(client._seal(ch.REC_DATA, memoryview(b"x" * 1000)))
    client._seq_tx -= 1
    monkeypatch.setattr(ch, "_ENCRYPT_INTO", True)
    fast = bytes(client._seal(ch.REC_DATA, memoryview(b"x" * 1000)))
    assert slow == fast
    client._seq_tx -= 1
    monkeypatch.setattr(ch, "_ENCRYPT_INTO", False)
    client.sendall(b"y" * 200_000)
    assert ch.recv_exact(server, 200_000) == b"y" * 200_000
    client.close()
    server.close()


def test_pace_sees_every_record_on_the_wire_and_detach_is_refused(port: Port) -> None:
    """The bandwidth cap hook: what crosses the link, record by record; a wrap by detaching is refused."""
    client, server = port.pair()
    assert isinstance(client, ch.SealedSocket)
    paced: list[int] = []
    client.pace = paced.append
    with pytest.raises(OSError, match=r"cannot be detached.*set its \.pace"):
        client.detach()
    data = os.urandom(3 * ch.MAX_RECORD + 10)
    sender = threading.Thread(target=send_and_end, args=(client, data))
    sender.start()
    assert read_all(server) == data
    sender.join(10)  # the close record is counted in wire_out after the peer may already have read it
    assert len(paced) == 4 and sum(paced) == client.wire_out - (13 + ch.TAG_LEN)  # the close is not paced
    client.close()
    server.close()
