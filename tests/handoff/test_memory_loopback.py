"""The memory channel between two raw QEMU 7.2 processes on loopback (no libvirt): the authenticated
channel, the delta-encoded stream rebuilt byte for byte, the return path, and verification failures that
leave the source running."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
from support import require

from nephele.errors import HandoffError
from nephele.handoff import channel as ch
from nephele.handoff.memory import MemoryDestination, MemorySource, MemoryStats, mem_ref_id
from tests.vmstate.qemu import COUNTER_ADDR, Vm, boot_disk

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    require(root=False, tools=("qemu-system-x86_64",))  # fail loudly, never skip


MEM_MB = 64


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port: int = sk.getsockname()[1]
        return port


class Corrupter:
    """A TCP relay on the node link that flips one byte after `at` bytes (source -> destination)."""

    def __init__(self, target: tuple[str, int], at: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target
        self.at = at
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(b, a, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(a, b, self.at), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, at: int | None) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if at is not None and seen <= at < seen + len(data):
                    buf = bytearray(data)
                    buf[at - seen] ^= 0x40
                    data = bytes(buf)
                seen += len(data)
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class Pair:
    """Source proxy (local listener for QEMU) + destination listener, as the handoff ops wire them."""

    def __init__(
        self, tmp: Path, dst_qemu_port: int, refs: dict[str, Path], *, via: int | None = None
    ) -> None:
        self.hid, self.token = ch.new_handoff_id(), ch.new_token()
        self.listener = ch.HandoffListener("127.0.0.1", 0, self.hid, self.token)
        self.src_stats: MemoryStats | None = None
        self.dst_stats: MemoryStats | None = None
        self.errors: list[BaseException] = []
        self.tmp = tmp
        self.refs = refs
        self.dst_qemu_port = dst_qemu_port
        self.wan_port = via or self.listener.port
        self.local = socket.create_server(("127.0.0.1", 0))
        self.port = self.local.getsockname()[1]
        threading.Thread(target=self.listener.accept_loop, args=(self._on_channel,), daemon=True).start()
        self.src_thread = threading.Thread(target=self._source, daemon=True)
        self.src_thread.start()
        self.dst_done = threading.Event()

    def _on_channel(self, acc: ch.Accepted) -> None:
        try:
            assert acc.channel == ch.MEMORY
            d = MemoryDestination(
                acc.sock, ("127.0.0.1", self.dst_qemu_port), self.refs, self.tmp / "scratch"
            )
            self.dst_stats = d.run()
        except BaseException as e:
            self.errors.append(e)
        finally:
            self.dst_done.set()

    def _source(self) -> None:
        try:
            q, _ = self.local.accept()
            wan = ch.connect_channel("127.0.0.1", self.wan_port, self.hid, self.token, ch.MEMORY)
            self.src_stats = MemorySource(q, wan, self.refs).run()
        except BaseException as e:
            self.errors.append(e)

    def close(self) -> None:
        self.listener.close()
        self.local.close()


def start_src(tmp: Path) -> Vm:
    vm = Vm(tmp, "src", mem_mb=MEM_MB, disk=boot_disk(tmp / "boot.img"))
    vm.qmp.caps(return_path=True)
    vm.qmp.cmd("migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": 1 << 30})
    deadline = time.monotonic() + 30
    while vm.qmp.read_u32(COUNTER_ADDR) < 3:  # the boot sector is dirtying memory
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return vm


def start_dst(tmp: Path, port: int) -> Vm:
    vm = Vm(tmp, "dst", mem_mb=MEM_MB, incoming="defer", paused=True)
    vm.qmp.caps(return_path=True)
    vm.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    return vm


@pytest.mark.parametrize("with_ref", [False, True])
def test_live_migration_through_the_memory_channel(tmp_path: Path, with_ref: bool) -> None:
    dport = free_port()
    with start_src(tmp_path) as src, start_dst(tmp_path, dport) as dst:
        refs: dict[str, Path] = {}
        if with_ref:  # a "base image" RAM both ends hold: the guest RAM a moment before the handoff
            refs[mem_ref_id("pc.ram")] = tmp_path / "base.ram"
            src.pmem(refs[mem_ref_id("pc.ram")], MEM_MB << 20)
        pair = Pair(tmp_path, dport, refs)
        before = src.qmp.read_u32(COUNTER_ADDR)
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{pair.port}")
        src.qmp.wait_migration(90)
        assert pair.dst_done.wait(30)
        pair.src_thread.join(30)
        assert not pair.errors, pair.errors
        dst.qmp.wait_migration(30)
        dst.qmp.cmd("cont")  # started with -S, as libvirt starts it
        deadline = time.monotonic() + 20
        while dst.qmp.status() != "running":
            assert time.monotonic() < deadline, dst.qmp.status()
            time.sleep(0.1)
        time.sleep(0.5)
        assert dst.qmp.read_u32(COUNTER_ADDR) > before  # the guest kept counting on the destination
        s, d = pair.src_stats, pair.dst_stats
        assert s is not None and d is not None
        assert s.error is None and d.error is None, (s.error, d.error)
        assert d.verified and s.sha256 == d.sha256 and s.stream_bytes == d.stream_bytes
        assert d.pages == s.pages > 0
        assert s.wan_in > 0  # the return path (PONG, SHUT) crossed back
        if with_ref:
            assert s.wan_out < s.stream_bytes / 4, (s.wan_out, s.stream_bytes)
            assert d.delta is not None and d.delta.kinds["memory"].by_ref > 0
        pair.close()


def test_a_corrupted_byte_on_the_link_stops_the_handoff_and_the_source_keeps_running(tmp_path: Path) -> None:
    dport = free_port()
    with start_src(tmp_path) as src, start_dst(tmp_path, dport) as dst:
        pair0 = Pair(tmp_path, dport, {})
        bad = Corrupter(("127.0.0.1", pair0.listener.port), at=300_000)
        pair0.wan_port = bad.port  # the source thread connects when QEMU does, so this takes effect
        src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{pair0.port}")
        with pytest.raises(Exception, match=r"migration failed|cancelled"):
            src.qmp.wait_migration(60)
        assert pair0.dst_done.wait(30)
        pair0.src_thread.join(30)
        assert pair0.dst_stats is not None and pair0.dst_stats.error
        assert not pair0.dst_stats.verified
        deadline = time.monotonic() + 10
        while src.qmp.status() != "running":
            assert time.monotonic() < deadline, src.qmp.status()
            time.sleep(0.1)
        c = src.qmp.read_u32(COUNTER_ADDR)
        time.sleep(0.5)
        assert src.qmp.read_u32(COUNTER_ADDR) > c  # still running and counting on the source
        # the destination never resumed: QEMU ends a failed incoming migration by exiting
        assert dst.proc.wait(10) != 0
        pair0.close()


def test_the_handoff_port_refuses_connections_without_the_token() -> None:
    hid, token = ch.new_handoff_id(), ch.new_token()
    lst = ch.HandoffListener("127.0.0.1", 0, hid, token)
    got: list[ch.Accepted] = []
    threading.Thread(target=lst.accept_loop, args=(got.append,), daemon=True).start()
    try:
        with pytest.raises(HandoffError, match="refused"):
            ch.connect_channel("127.0.0.1", lst.port, hid, ch.new_token(), ch.MEMORY)
        with pytest.raises(HandoffError, match="refused"):
            ch.connect_channel("127.0.0.1", lst.port, ch.new_handoff_id(), token, ch.DISK)
        with socket.create_connection(("127.0.0.1", lst.port)) as raw:  # arbitrary data
            raw.recv(64)
            raw.sendall(b"QEVM\x00\x00\x00\x03" + bytes(100))
            raw.settimeout(5)
            try:
                answer = raw.recv(16)
            except ConnectionResetError:
                answer = b""
            assert answer == b""  # closed without an OK
        good = ch.connect_channel("127.0.0.1", lst.port, hid, token, ch.CONTROL)
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert [a.channel for a in got] == [ch.CONTROL]
        assert len(lst.refused) == 3
        good.close()
    finally:
        lst.close()
