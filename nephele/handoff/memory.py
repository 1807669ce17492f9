"""The memory channel: QEMU's live migration stream through the delta engine, rebuilt byte for byte.

Source (``MemorySource``): reads the stream from the source QEMU (libvirtd hands QEMU the socket it
opened to our local listener), parses it (nephele.vmstate), and sends in stream order:

    TARGETS   JSON: the RAM blocks (name, size) from the MEM_SIZE record; the delta encoder starts
    OPAQUE    stream bytes that are not pages (headers, footers, commands, device state), lz4
    PAGES     a run of page records of one RAM block: u16 target, u32 n, n x be64 (offset | flags),
              the fill byte of each ZERO record, u64 xxh3 of the page payloads, then the delta frames
              (nephele.delta) of its PAGE records
    ITER      u32: QEMU's pre-copy iteration (from libvirt's job stats; progress and records)
    TAIL      the device state begins: the destination holds every byte from here on
    STOPPED   f64: the source VM stopped (wall clock, for the downtime)
    END       sha256 of the whole original stream + u64 length (after the delta END frame)
    ABORT     utf-8 reason: the source gave up

Destination -> source: RESUME first (what it kept of an earlier failed attempt, resume.py; empty if
nothing), then RETURN (the return path), ACK and ERROR. The source waits for RESUME before it declares
its delta references: the kept pages become hash-only references of the encoder.

Destination (``MemoryDestination``): feeds the delta frames to the decoder (which checks every frame's
checksum and sequence and, at END, the digest of every RAM block it rebuilt), re-emits each record with
``MigrationStreamWriter`` and keeps a running sha256 of what it rebuilt. The device tail is withheld from
the destination QEMU until the sender's whole-stream sha256 matches: on a mismatch, a corrupt frame or a
truncated stream the destination QEMU never gets the end of the stream, cannot resume, and libvirt
cancels the migration, which resumes the source.

Return path (libvirt always enables it): the destination QEMU's bytes go back as RETURN messages. Both
ends flush whatever they buffered before they block on a read, or the last bytes of the stream would
wait for data that only comes after them (the deadlock in reference LIBVIRT-PROXY.md).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.block
import numpy as np
import xxhash

from nephele.delta import BlockIndex, Decoder, Encoder, RefSet
from nephele.delta.decoder import Sink
from nephele.delta.stats import StreamStats
from nephele.errors import HandoffError, NepheleError
from nephele.handoff.channel import ChannelClosed, MsgReader, MsgSender
from nephele.handoff.ramcheck import SentPages
from nephele.handoff.resume import ResumeCache, decode_offer, held_blocks
from nephele.node.guestram import GuestRam
from nephele.vmstate import (
    PAGE_SIZE,
    DeviceTail,
    MigrationStreamParser,
    MigrationStreamWriter,
    Opaque,
    Page,
    RamBlocks,
    SectionEnd,
    SectionStart,
    StreamEnd,
    ZeroPage,
    event_bytes,
)
from nephele.vmstate.stream import SEC_END, SEC_FOOTER

TARGETS = 1
OPAQUE = 2
PAGES = 3
ITER = 4
TAIL = 5
STOPPED = 6
END = 7
ABORT = 8
CHECK = 9  # u8 checked, u32 pages corrected: what the switchover check did (for the records)
# destination -> source
RETURN = 20
ERROR = 21
ACK = 22  # u64: channel bytes the destination has read (what really crossed the link; every ACK_EVERY s)
RESUME = 23  # the destination's offer of pages kept from a failed attempt (resume.py), always sent first
RESUME_WAIT = 60.0  # the source waits this long for the offer before it encodes without one
ACK_EVERY = 0.05
# The source keeps at most this much of the link's recent rate in flight (sent, not yet read at the
# destination), so the network's buffers cannot hold seconds of data that would only drain after the VM
# stopped (2 s of a 2.9 s downtime measured through a path with MiBs of socket buffers). 0.25 s cost a
# quarter of the throughput at 20 Mbit/s: the loop (send, read there, ACK back) is slower than the RTT.
FLIGHT_SECONDS = 0.5
FLIGHT_MIN = 256 << 10
FLIGHT_STALL = 10.0  # no ACK progress for this long: stop waiting for them (TCP still flow-controls)

RAM_ZERO = 0x002
RAM_PAGE = 0x008
RAM_CONTINUE = 0x020
MAIN_RAM = "pc.ram"  # the block the switchover check reads from the guest's memfd
RUN_MAX = 512  # pages per PAGES message (2 MiB before encoding)
_U64 = struct.Struct(">Q")
_PAGES_HEAD = struct.Struct(">HI")


def _footer(section_id: int) -> bytes:
    return bytes((SEC_FOOTER,)) + section_id.to_bytes(4, "big")


def mem_ref_id(block: str) -> str:
    return f"mem:{block}"


@dataclass
class MemoryStats:
    """What the memory channel did, on either end."""

    stream_bytes: int = 0  # QEMU stream bytes (read at the source, written at the destination)
    corrected: int = 0  # pages QEMU never resent after the guest changed them (switchover check)
    checked: bool = False  # the switchover check ran (the guest's RAM was readable)
    # the switchover as the source proxy saw it (wall clock): the ram END section began (the VM is stopped),
    # the check was done, the stream ended; against stopped_at and the destination's resume
    final_at: float | None = None
    checked_at: float | None = None
    ended_at: float | None = None
    wan_out: int = 0
    wan_in: int = 0
    pages: int = 0
    zero_records: int = 0  # QEMU's own ZERO records (never reach the delta engine)
    iteration: int = 0  # pre-copy iterations (QEMU's, as libvirt reports them; ITER messages)
    sections: int = 0  # ram sections seen in the stream
    sha256: str = ""
    # resume (resume.py): blocks the destination offered from a failed attempt and the offer's size;
    # pages this attempt verified and kept for a next one (destination)
    resume_offered: int = 0
    resume_offer_bytes: int = 0
    resume_written: int = 0
    stopped_at: float | None = None
    ended: bool = False
    verified: bool = False
    error: str | None = None
    delta: StreamStats | None = None
    started: float = field(default_factory=time.time)

    def table_stats(self) -> StreamStats:
        """The delta stats with QEMU's ZERO records added to the memory ZEROS column."""
        st = StreamStats()
        if self.delta is not None:
            for k, v in self.delta.kinds.items():
                st.kinds[k] = type(v)(**vars(v))
            st.wire_bytes = self.delta.wire_bytes
            st.frames = self.delta.frames
        st.kind("memory").zeros += self.zero_records
        return st


def _lz4(data: bytes) -> bytes:
    z: bytes = lz4.block.compress(data, store_size=False)
    if len(z) + 1 < len(data):
        return b"\x01" + _U64.pack(len(data)) + z
    return b"\x00" + data


def _unlz4(payload: bytes) -> bytes:
    if payload[:1] == b"\x00":
        return payload[1:]
    (n,) = _U64.unpack_from(payload, 1)
    out: bytes = lz4.block.decompress(payload[9:], uncompressed_size=n)
    return out


class _Capture:
    """A file-like sink collecting what the delta encoder writes."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, b: bytes) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


# ------------------------------------------------------------------------------------------------ source


class MemorySource:
    """Source end of the memory channel for one migration connection."""

    def __init__(
        self,
        qemu: socket.socket,
        wan: socket.socket,
        refs: Mapping[str, Path],
        *,
        codec: str = "zstd",  # a WAN link is slower than zstd -3 on one core; lz4 for fast links
        on_iteration: Callable[[int], None] | None = None,
        dump: Any = None,
        guest_ram: Callable[[], GuestRam | None] | None = None,
    ) -> None:
        self.dump = dump  # debugging: a file that receives the raw stream
        self.guest_ram = guest_ram  # the switchover check reads the true RAM through it (ramcheck.py)
        self._check: SentPages | None = None
        self._final = False  # inside the ram END section (the VM is stopped) with a switchover check
        self._held: list[bytes] = []  # stream bytes after the END section's last page (its EOS, footer)
        self._emitted = 0  # stream bytes as the destination rebuilds them (QEMU's plus corrections)
        self.qemu = qemu
        self.wan = wan
        self.tx = MsgSender(wan)
        self.refs = dict(refs)
        self.codec = codec
        self.stats = MemoryStats()
        self.on_iteration = on_iteration
        self._enc: Encoder | None = None
        self._refset: RefSet | None = None
        self._cap = _Capture()
        self._targets: dict[str, int] = {}
        self._seen: list[np.ndarray] = []  # per RAM block: pages sent at least once
        self._seen_count = 0
        self._run: list[Page | ZeroPage] = []
        self._run_offsets: set[int] = set()
        self._opaque = bytearray()
        self._sha = hashlib.sha256()
        self.done = threading.Event()
        self.remote_error: str | None = None
        # channel bytes the destination has read: tx.bytes minus this is still in the network's buffers
        # (socket buffers, a proxy, a router queue), where it delays the switchover
        self.acked = 0
        self._acks: collections.deque[tuple[float, int]] = collections.deque()
        self._ack_cond = threading.Condition()
        self._offer = b""  # the destination's RESUME payload
        self._offer_evt = threading.Event()

    # -- sending -------------------------------------------------------------------------------------
    def _wait_offer(self, max_size: int) -> dict[str, BlockIndex]:
        """The destination's RESUME offer (hash-only references to pages it kept), or {} if none came.
        No kept file is larger than the largest RAM block (the offer's size bounds what this end
        allocates for it)."""
        deadline = time.monotonic() + RESUME_WAIT
        while not self._offer_evt.wait(0.05):
            if self.remote_error or self.done.is_set() or time.monotonic() > deadline:
                return {}
        return decode_offer(self._offer, max_size=max_size)

    def _send_delta_header(self, blocks: tuple[tuple[str, int], ...]) -> None:
        offer = self._wait_offer(max((size for _, size in blocks), default=0))
        refs: dict[str, Path | BlockIndex] = {**self.refs, **offer}  # the base first: it wins duplicates
        self._refset = RefSet.open(refs)
        self.stats.resume_offered = sum(int(held_blocks(ix).sum()) for ix in offer.values())
        self._enc = Encoder(self._refset, self._cap, self.codec)  # type: ignore[arg-type]
        info: list[dict[str, Any]] = []
        for name, size in blocks:
            base = mem_ref_id(name) if mem_ref_id(name) in self.refs else None
            # target names become scratch file names on the destination: no idstr (it may hold '/')
            self._targets[name] = self._enc.begin_target(f"ram{len(info)}", "memory", size, base)
            self._seen.append(np.zeros(-(-size // PAGE_SIZE), np.bool_))
            info.append({"name": name, "size": size})
            if name == MAIN_RAM and self.guest_ram is not None and self._check is None:
                ram = self.guest_ram()
                if ram is not None and ram.size == size:
                    self._check = SentPages(name, size, ram)
                elif ram is not None:
                    ram.close()
        self.tx.send(TARGETS, json.dumps({"blocks": info}).encode() + b"\n" + self._cap.take())

    def _on_ack(self, n: int) -> None:
        now = time.monotonic()
        with self._ack_cond:
            self.acked = n
            self._acks.append((now, n))
            while len(self._acks) > 2 and now - self._acks[1][0] >= 1.0:
                self._acks.popleft()
            self._ack_cond.notify_all()

    def link_rate(self) -> float:
        """Bytes per second the destination read over the last second (0: not known yet)."""
        with self._ack_cond:
            if len(self._acks) < 2:
                return 0.0
            (t0, a0), (t1, a1) = self._acks[0], self._acks[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0

    def _wait_for_room(self) -> None:
        """Hold the next message while more than FLIGHT_SECONDS of the link's rate is in flight."""
        rate = self.link_rate()
        if rate <= 0:
            return
        window = max(FLIGHT_MIN, rate * FLIGHT_SECONDS)
        deadline = time.monotonic() + FLIGHT_STALL
        with self._ack_cond:
            while self.tx.bytes - self.acked > window and not self.done.is_set():
                if self.remote_error or time.monotonic() > deadline:
                    return
                self._ack_cond.wait(0.05)

    def _flush_opaque(self) -> None:
        if self._opaque:
            self._wait_for_room()
            self.tx.send(OPAQUE, _lz4(bytes(self._opaque)))
            self._opaque.clear()

    def _flush_run(self) -> None:
        run = self._run
        if not run:
            return
        assert self._enc is not None
        block = run[0].block
        tidx = self._targets.get(block)
        if tidx is None:
            raise HandoffError(f"memory stream: page of RAM block {block!r} that MEM_SIZE did not declare")
        heads = np.empty(len(run), ">u8")
        fills = bytearray()
        nums: list[int] = []
        datas: list[bytes | memoryview] = []
        for i, ev in enumerate(run):
            cont = RAM_CONTINUE if ev.cont else 0
            if type(ev) is Page:
                heads[i] = ev.offset | RAM_PAGE | cont
                nums.append(ev.offset // PAGE_SIZE)
                datas.append(ev.data)
            else:
                assert type(ev) is ZeroPage
                heads[i] = ev.offset | RAM_ZERO | cont
                fills.append(ev.fill)
        check = 0
        track = self._check if self._check is not None and self._check.block == block else None
        if nums:
            raw = b"".join(datas)
            check = xxhash.xxh3_64_intdigest(raw)
            data = np.frombuffer(raw, np.uint8).reshape(-1, PAGE_SIZE)
            numbers = np.array(nums, np.int64)
            self._enc.put_blocks(tidx, numbers, data)
            if track is not None:
                track.pages(numbers, raw)
        seen = self._seen[tidx]
        idx = (heads.astype(np.uint64) >> np.uint64(12)).astype(np.int64)
        if track is not None and fills:
            track.fills(idx[(heads & np.uint64(RAM_ZERO)) != 0], fills)
        self._seen_count += int((~seen[idx]).sum())
        seen[idx] = True
        self.stats.pages += len(nums)
        self.stats.zero_records += len(run) - len(nums)
        self._wait_for_room()
        payload = (
            _PAGES_HEAD.pack(tidx, len(run))
            + heads.tobytes()
            + bytes(fills)
            + _U64.pack(check)
            + self._cap.take()
        )
        self.tx.send(PAGES, payload)
        self._run = []
        self._run_offsets = set()

    def _add_page(self, ev: Page | ZeroPage) -> None:
        if self._run and (ev.block != self._run[0].block or ev.offset in self._run_offsets):
            self._flush_run()
        self._run.append(ev)
        self._run_offsets.add(ev.offset)
        if len(self._run) >= RUN_MAX:
            self._flush_run()

    def _flush_all(self) -> None:
        self._flush_run()
        self._flush_opaque()

    @property
    def first_pass_done(self) -> bool:
        """Every page of RAM was sent once (QEMU's first pre-copy pass is over)."""
        total = sum(int(a.shape[0]) for a in self._seen)
        return bool(total > 0 and self._seen_count >= total)

    def send_iteration(self, n: int) -> None:
        if n != self.stats.iteration:
            self.stats.iteration = n
            with contextlib.suppress(OSError):
                self.tx.send(ITER, struct.pack(">I", n))

    def send_stopped(self, when: float) -> None:
        self.stats.stopped_at = when
        with contextlib.suppress(OSError):
            self.tx.send(STOPPED, struct.pack(">d", when))

    # -- loops ---------------------------------------------------------------------------------------
    def _return_path(self) -> None:
        """destination -> source: the return path bytes go to the source QEMU."""
        rx = MsgReader(self.wan)
        try:
            while True:
                msg = rx.read()
                if msg is None:
                    break
                mtype, payload = msg
                if mtype == RETURN:
                    self.qemu.sendall(payload)
                elif mtype == ERROR:
                    self.remote_error = payload.decode(errors="replace")
                    break
                elif mtype == ACK and len(payload) == 8:
                    self._on_ack(_U64.unpack(payload)[0])
                elif mtype == RESUME and not self._offer_evt.is_set():
                    self.stats.resume_offer_bytes = len(payload)
                    self._offer = payload  # decoded by the sending thread, which knows the RAM blocks
                    self._offer_evt.set()
        except (OSError, NepheleError) as exc:
            if not self.done.is_set():
                self.remote_error = self.remote_error or f"memory channel: {exc}"
        finally:
            self.stats.wan_in = rx.bytes
            # The destination is gone or finished: QEMU must not wait for a reply that cannot come.
            with contextlib.suppress(OSError):
                self.qemu.shutdown(socket.SHUT_RDWR if self.remote_error else socket.SHUT_WR)

    def run(self) -> MemoryStats:
        back = threading.Thread(target=self._return_path, name="handoff-return-path", daemon=True)
        back.start()
        parser = MigrationStreamParser()
        try:
            while True:
                if not select.select([self.qemu], [], [], 0)[0]:
                    self._flush_all()  # never block on QEMU with stream bytes held back
                data = self.qemu.recv(1 << 20)
                if not data:
                    break
                if self.dump is not None:
                    self.dump.write(data)
                self.stats.stream_bytes += len(data)
                for ev in parser.feed(data):
                    t = type(ev)
                    if t is Opaque and self._final:
                        self._held.append(bytes(ev.data))  # type: ignore[union-attr]
                        continue
                    if t is Page or t is ZeroPage:
                        if self._held:
                            self._release_held()
                        self._hash(event_bytes(ev))  # type: ignore[arg-type]
                        if self._opaque:
                            self._flush_opaque()
                        self._add_page(ev)  # type: ignore[arg-type]
                    elif t is Opaque:
                        self._opaque_in(ev.data)  # type: ignore[union-attr]
                    elif t is RamBlocks:
                        self._flush_all()
                        self._send_delta_header(ev.blocks)  # type: ignore[union-attr]
                    elif t is SectionEnd:
                        if self._final:
                            self._final = False
                            self._switchover_check(ev.section_id)  # type: ignore[union-attr]
                    elif t is SectionStart:
                        self._flush_all()
                        self._final = ev.kind == SEC_END and self._check is not None  # type: ignore[union-attr]
                        if ev.kind == SEC_END:  # type: ignore[union-attr]
                            self.stats.final_at = time.time()
                        self.stats.sections = ev.iteration  # type: ignore[union-attr]
                        if self.on_iteration is not None:
                            self.on_iteration(ev.iteration)  # type: ignore[union-attr]
                    elif t is DeviceTail:
                        self._flush_all()
                        self.tx.send(TAIL)
                    elif t is StreamEnd:
                        self._finish()
            if not parser.done:
                parser.close()  # raises: the stream was cut short
            self.stats.ended = True
        except (NepheleError, OSError) as exc:
            self.stats.error = self.remote_error or f"{exc}"
            with contextlib.suppress(OSError):
                self.tx.send(ABORT, str(exc).encode()[:4000])
            with contextlib.suppress(OSError):
                self.qemu.shutdown(socket.SHUT_RDWR)
        finally:
            self.done.set()
            with contextlib.suppress(OSError):
                self.wan.shutdown(socket.SHUT_WR)
            back.join(timeout=30)
            if self.remote_error and not self.stats.error:
                self.stats.error = self.remote_error
            self.stats.wan_out = self.tx.bytes
            if self._refset is not None:
                self._refset.close()
            if self._check is not None:
                self._check.close()
            if self.dump is not None:
                self.dump.close()
            for s in (self.qemu, self.wan):
                with contextlib.suppress(OSError):
                    s.close()
        return self.stats

    def _hash(self, b: bytes | memoryview) -> None:
        self._sha.update(b)
        self._emitted += len(b)

    def _opaque_in(self, data: bytes | memoryview) -> None:
        if self._run:
            self._flush_run()
        self._hash(data)
        self._opaque += data
        if len(self._opaque) >= 1 << 20:
            self._flush_opaque()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for b in held:
            self._opaque_in(b)

    def _switchover_check(self, section_id: int) -> None:
        """The ram END section is complete and the VM is stopped: before its EOS, send every page of the
        main RAM whose true content differs from what the destination holds (ramcheck.py). Inside the
        section, so the rebuilt stream stays one QEMU would write."""
        chk = self._check
        assert chk is not None
        held = b"".join(self._held)
        self._held = []
        cut = len(held) - 8 - (5 if held.endswith(_footer(section_id)) else 0)
        if cut < 0:
            raise HandoffError("memory stream: the ram END section does not end with EOS")
        if cut:
            self._opaque_in(held[:cut])
        self._flush_run()
        stale = chk.stale()
        self.stats.checked_at = time.time()
        self.stats.checked = True
        self.stats.corrected = len(stale)
        for start in range(0, len(stale), RUN_MAX):
            nums = stale[start : start + RUN_MAX]
            data = chk.read(nums)
            for i, n in enumerate(nums.tolist()):
                # the first record names its block: QEMU's last one may have been another block's
                ev = Page(chk.block, n * PAGE_SIZE, data[i].tobytes(), i > 0 or start > 0)
                self._hash(event_bytes(ev))
                if self._opaque:
                    self._flush_opaque()
                self._add_page(ev)
        self._opaque_in(held[cut:])

    def _finish(self) -> None:
        self._flush_all()
        if self._enc is None:
            raise HandoffError("memory stream ended without a MEM_SIZE record")
        self.stats.delta = self._enc.finish()
        self.stats.sha256 = self._sha.hexdigest()
        end = bytes.fromhex(self.stats.sha256) + _U64.pack(self._emitted)
        if self.stats.checked:
            self.tx.send(CHECK, struct.pack(">BI", 1, self.stats.corrected))
        self.tx.send(PAGES, _PAGES_HEAD.pack(0xFFFF, 0) + self._cap.take())  # the delta END frame
        self.tx.send(END, end)
        self.stats.ended_at = time.time()


# ------------------------------------------------------------------------------------------- destination


class MemoryDestination:
    """Destination end: rebuild the stream from the channel into the destination QEMU."""

    def __init__(
        self,
        wan: socket.socket,
        qemu_address: tuple[str, int],
        refs: Mapping[str, Path],
        scratch_dir: Path,
        *,
        on_progress: Callable[[MemoryStats], None] | None = None,
        observer: Callable[[str, np.ndarray, str], None] | None = None,
        resume: ResumeCache | None = None,
    ) -> None:
        self.wan = wan
        # what an earlier failed attempt kept (offered to the source), and where this one keeps its pages
        self.resume = resume
        self.qemu_address = qemu_address
        # heatmap hook: ("memory", page numbers across the RAM blocks in MEM_SIZE order, "data"|"zero")
        self.observer = observer
        self._first_page: list[int] = []
        self.refs = dict(refs)
        self.scratch_dir = scratch_dir
        self.stats = MemoryStats()
        self.on_progress = on_progress
        self.qemu: socket.socket | None = None
        self.tx = MsgSender(wan)
        self._dec: Decoder | None = None
        self._names: list[str] = []
        self._rows: list[tuple[np.ndarray, np.ndarray]] = []
        self._sha = hashlib.sha256()
        self._writer: MigrationStreamWriter | None = None
        self._holding = False
        self._held = bytearray()
        self.done = threading.Event()

    def _sink(self, data: bytes | memoryview) -> None:
        if self._holding:
            self._held += data
        else:
            assert self.qemu is not None
            self.qemu.sendall(data)
        self._sha.update(data)
        self.stats.stream_bytes += len(data)

    def _connect_qemu(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                self.qemu = socket.create_connection(self.qemu_address, timeout=5)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise HandoffError(
                        "the destination QEMU does not listen on "
                        f"{self.qemu_address[0]}:{self.qemu_address[1]}"
                        f" ({exc})"
                    ) from None
                time.sleep(0.1)
        self.qemu.settimeout(None)
        self.qemu.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._writer = MigrationStreamWriter(self._sink)

    def _return_path(self) -> None:
        assert self.qemu is not None
        try:
            while True:
                data = self.qemu.recv(65536)
                if not data:
                    break
                self.tx.send(RETURN, data)
        except OSError:
            pass

    def _on_blocks(self, blocks: np.ndarray, rows: np.ndarray) -> None:
        self._rows.append((blocks, rows))

    def _targets(self, payload: bytes) -> None:
        if self._dec is not None:
            raise HandoffError("memory channel: RAM blocks declared twice")
        head, _, delta = payload.partition(b"\n")
        info = json.loads(head)
        blocks = info["blocks"]
        self._names = [str(b["name"]) for b in blocks]
        self._first_page = np.concatenate(
            [[0], np.cumsum([-(-int(b["size"]) // PAGE_SIZE) for b in blocks])]
        ).tolist()
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        sinks = {
            f"ram{i}": Sink(on_blocks=self._on_blocks, scratch_dir=self.scratch_dir)
            for i in range(len(blocks))
        }
        self._dec = Decoder(self.refs, sinks)  # type: ignore[arg-type]
        if self.resume is not None:
            self.resume.begin([(str(b["name"]), int(b["size"])) for b in blocks])
        self._dec.feed(delta)

    def _pages(self, payload: bytes) -> None:
        if self._dec is None or self._writer is None:
            raise HandoffError("memory channel: pages before the RAM block list")
        tidx, n = _PAGES_HEAD.unpack_from(payload, 0)
        p = _PAGES_HEAD.size
        if tidx == 0xFFFF:  # the delta END frame: the decoder checks every block digest
            self._dec.feed(payload[p:])
            self.stats.delta = self._dec.close()
            return
        if tidx >= len(self._names):
            raise HandoffError(f"memory channel: pages for unknown RAM block #{tidx}")
        block = self._names[tidx]
        heads = np.frombuffer(payload, ">u8", n, p).astype(np.uint64)
        p += 8 * n
        is_page = (heads & RAM_PAGE) != 0
        nz = int(n - int(is_page.sum()))
        fills = payload[p : p + nz]
        p += nz
        (check,) = _U64.unpack_from(payload, p)
        p += 8
        self._rows.clear()
        self._dec.feed(payload[p:])
        if self._rows:
            got_blocks = np.concatenate([b for b, _ in self._rows])
            rows = np.concatenate([r for _, r in self._rows]) if len(self._rows) > 1 else self._rows[0][1]
        else:
            got_blocks = np.zeros(0, np.int64)
            rows = np.zeros((0, PAGE_SIZE), np.uint8)
        self._rows.clear()
        want = (heads[is_page] & ~np.uint64(0xFFF)) // np.uint64(PAGE_SIZE)
        if got_blocks.shape[0] != want.shape[0] or not np.array_equal(got_blocks, want.astype(np.int64)):
            raise HandoffError(
                f"memory channel: the delta frames for RAM block {block!r} do not match the page records"
            )
        if rows.shape[0] and xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows).data) != check:
            raise HandoffError(
                f"verification failed: {rows.shape[0]} rebuilt pages of RAM block {block!r} (from page "
                f"{int(want[0])}) differ from what the source sent"
            )
        if self.resume is not None and rows.shape[0]:  # verified: kept in case this attempt fails
            self.resume.write(tidx, want.astype(np.int64), rows)
            self.stats.resume_written += int(rows.shape[0])
        w = self._writer
        pi = zi = 0
        for h in heads.tolist():
            off = h & ~0xFFF
            cont = bool(h & RAM_CONTINUE)
            if h & RAM_PAGE:
                w.write(Page(block, off, rows[pi].data, cont))
                pi += 1
            else:
                w.write(ZeroPage(block, off, fills[zi], cont))
                zi += 1
        self.stats.pages += pi
        self.stats.zero_records += zi
        if self.observer is not None:  # heatmap hook (nephele.handoff.heatmap)
            pages = (heads >> np.uint64(12)).astype(np.int64) + self._first_page[tidx]
            self.observer("memory", pages[is_page], "data")
            if zi:
                self.observer("memory", pages[~is_page], "zero")

    def _end(self, payload: bytes) -> None:
        assert self._writer is not None
        self._writer.flush()
        want_sha, want_len = payload[:32].hex(), _U64.unpack_from(payload, 32)[0]
        self.stats.sha256 = self._sha.hexdigest()
        if self.stats.delta is None:
            raise HandoffError("memory channel: the stream ended before the delta END frame")
        if want_len != self.stats.stream_bytes or want_sha != self.stats.sha256:
            raise HandoffError(
                f"verification failed: the rebuilt migration stream ({self.stats.stream_bytes} bytes, sha256 "
                f"{self.stats.sha256[:16]}…) differs from the source's ({want_len} bytes, {want_sha[:16]}…)"
            )
        self.stats.verified = True
        self._holding = False
        assert self.qemu is not None
        if self._held:
            self.qemu.sendall(bytes(self._held))  # only now may the destination QEMU complete
            self._held.clear()
        self.stats.ended = True

    def run(self) -> MemoryStats:
        rx = MsgReader(self.wan)
        back: threading.Thread | None = None
        try:
            offer = self.resume.offer() if self.resume is not None else b""
            self.stats.resume_offer_bytes = len(offer)
            with contextlib.suppress(OSError):  # a source that only came to ABORT may be gone already
                self.tx.send(RESUME, offer)  # first: the source waits for it before it encodes
            self._connect_qemu()
            back = threading.Thread(target=self._return_path, name="handoff-return-path", daemon=True)
            back.start()
            last = last_ack = 0.0
            acked = 0
            while True:
                if not rx.pending():
                    if self._writer is not None:
                        self._writer.flush()  # never block on the channel with stream bytes held back
                    if rx.bytes > acked:  # caught up: say so before blocking, or a sender waiting on
                        acked = rx.bytes  # its flight window would wait for an ACK that never comes
                        with contextlib.suppress(OSError):
                            self.tx.send(ACK, _U64.pack(acked))
                msg = rx.read()
                if msg is None:
                    if rx.bytes > acked:  # the source closed right after its last message: the
                        with contextlib.suppress(OSError):  # pending() above saw the EOF, not a gap
                            self.tx.send(ACK, _U64.pack(rx.bytes))
                    break
                mtype, payload = msg
                self.stats.wan_in = rx.bytes
                if time.monotonic() - last_ack >= ACK_EVERY:
                    last_ack = time.monotonic()
                    acked = rx.bytes
                    with contextlib.suppress(OSError):
                        self.tx.send(ACK, _U64.pack(acked))
                if mtype == OPAQUE:
                    assert self._writer is not None
                    self._writer.raw(_unlz4(payload))
                elif mtype == PAGES:
                    self._pages(payload)
                elif mtype == TARGETS:
                    self._targets(payload)
                elif mtype == ITER:
                    (self.stats.iteration,) = struct.unpack(">I", payload)
                elif mtype == TAIL:
                    assert self._writer is not None
                    self._writer.flush()
                    self._holding = True
                elif mtype == STOPPED:
                    (self.stats.stopped_at,) = struct.unpack(">d", payload)
                elif mtype == CHECK and len(payload) == 5:
                    checked, self.stats.corrected = struct.unpack(">BI", payload)
                    self.stats.checked = bool(checked)
                elif mtype == END:
                    self._end(payload)
                elif mtype == ABORT:
                    raise HandoffError(f"the source aborted: {payload.decode(errors='replace')}")
                else:
                    raise HandoffError(f"memory channel: unknown message type {mtype}")
                now = time.monotonic()
                if self.on_progress is not None and now - last >= 1.0:
                    last = now
                    self.on_progress(self.stats)
            if not self.stats.ended:
                raise ChannelClosed(
                    "the memory channel closed before the end of the stream "
                    f"({self.stats.stream_bytes} bytes "
                    "rebuilt); the destination VM was not allowed to resume"
                )
            # Keep the channel open for the return path until the destination QEMU closes its side.
            if back is not None:
                back.join(timeout=120)
        except (NepheleError, OSError, ValueError, KeyError) as exc:
            self.stats.error = str(exc) or type(exc).__name__
            with contextlib.suppress(OSError):
                self.tx.send(ERROR, self.stats.error.encode()[:4000])
            if self.qemu is not None:  # the destination QEMU must fail its incoming migration now
                with contextlib.suppress(OSError):
                    self.qemu.shutdown(socket.SHUT_RDWR)
            if self._dec is not None:
                self._dec.abort()
        finally:
            self.stats.wan_in = rx.bytes
            self.stats.wan_out = self.tx.bytes
            with contextlib.suppress(OSError):
                self.wan.shutdown(socket.SHUT_RDWR)
            if self.qemu is not None:
                with contextlib.suppress(OSError):
                    self.qemu.close()
            self.wan.close()
            self.done.set()
        return self.stats


def describe(stats: MemoryStats) -> dict[str, Any]:
    d = {k: v for k, v in vars(stats).items() if k != "delta"}
    if stats.delta is not None:
        d["delta"] = stats.delta.to_dict()
    return d
