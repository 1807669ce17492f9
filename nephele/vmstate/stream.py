"""QEMU 7.2 precopy migration stream: an incremental parser and a writer.

The parser is fed bytes as they arrive (from a socket, a file, a save image) and returns events:

* ``Opaque``: bytes that are forwarded as they are (file header, configuration, commands, section
  headers and footers, the MEM_SIZE record, EOS records, the whole device-state tail);
* ``Page`` / ``ZeroPage``: one RAM page record (block idstr, offset, 4096-byte payload or fill byte);
* marks (carry no bytes): ``Config``, ``Command``, ``RamBlocks``, ``SectionStart``/``SectionEnd`` for
  each ram section (every PART/END is an iteration boundary), ``DeviceTail``, ``StreamEnd``.

Serialising the events in order (``event_bytes``) yields exactly the bytes fed. The byte layout and the
traps are described in docs/vmstate.md. Everything the parser cannot delimit (XBZRLE, RDMA hooks,
compressed pages, multifd, postcopy commands, iterable sections other than ``ram``) is refused with a
``VmStreamError`` naming the stream byte offset, rather than passed through half-understood.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, Final, NamedTuple

from nephele.errors import VmStateError

PAGE_SIZE: Final = 4096
PAGE_MASK: Final = ~(PAGE_SIZE - 1) & 0xFFFF_FFFF_FFFF_FFFF
FLAG_MASK: Final = PAGE_SIZE - 1

QEVM_MAGIC: Final = 0x5145564D
QEVM_VERSION: Final = 3
FILE_HEADER: Final = struct.pack(">II", QEVM_MAGIC, QEVM_VERSION)

# Top-level section types (migration/savevm.c).
SEC_EOF: Final = 0x00
SEC_START: Final = 0x01
SEC_PART: Final = 0x02
SEC_END: Final = 0x03
SEC_FULL: Final = 0x04
SEC_SUBSECTION: Final = 0x05
SEC_VMDESCRIPTION: Final = 0x06
SEC_CONFIGURATION: Final = 0x07
SEC_COMMAND: Final = 0x08
SEC_FOOTER: Final = 0x7E
SECTION_NAMES: Final = {SEC_START: "START", SEC_PART: "PART", SEC_END: "END", SEC_FULL: "FULL"}

# RAM record flags, the low 12 bits of each be64 record header (migration/ram.c).
RAM_ZERO: Final = 0x002
RAM_MEM_SIZE: Final = 0x004
RAM_PAGE: Final = 0x008
RAM_EOS: Final = 0x010
RAM_CONTINUE: Final = 0x020
RAM_XBZRLE: Final = 0x040
RAM_HOOK: Final = 0x080
RAM_COMPRESS_PAGE: Final = 0x100
RAM_MULTIFD_FLUSH: Final = 0x200  # QEMU >= 8.0

# COMMAND record types (migration/savevm.c enum qemu_vm_cmd).
CMD_OPEN_RETURN_PATH: Final = 1
CMD_PING: Final = 2
COMMAND_NAMES: Final = {
    0: "INVALID",
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "POSTCOPY_RESUME",
    8: "PACKAGED",
    9: "RECV_BITMAP",
    10: "ENABLE_COLO",
}
_COMMAND_LEN: Final = {CMD_OPEN_RETURN_PATH: 0, CMD_PING: 4}

RAM_IDSTR: Final = "ram"
ZERO_PAGE: Final = bytes(PAGE_SIZE)

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_FOOTER = struct.Struct(">BI")
_VMDESC_MAX = 64 << 20  # a VMDESCRIPTION is JSON about the devices: tens to hundreds of KiB
_VMDESC_RE = re.compile(rb'\x00\x06(....)\{"page_size"', re.DOTALL)


class VmStreamError(VmStateError):
    """A migration stream that cannot be parsed; ``offset`` is the stream byte where it went wrong."""

    def __init__(self, message: str, *, offset: int | None = None, truncated: bool = False) -> None:
        self.offset = offset
        self.truncated = truncated
        where = f" at stream byte {offset}" if offset is not None else ""
        super().__init__(f"migration stream: {message}{where}")


# ---------------------------------------------------------------------------------------------------------
# Events. NamedTuples: the parser makes one per RAM page, and tuple construction is the cheapest object.


class Opaque(NamedTuple):
    """Bytes forwarded as they are."""

    data: bytes


class Page(NamedTuple):
    """A RAM_SAVE_FLAG_PAGE record. ``cont``: the record had CONTINUE (no idstr; same block as before)."""

    block: str
    offset: int
    data: memoryview | bytes
    cont: bool


class ZeroPage(NamedTuple):
    """A RAM_SAVE_FLAG_ZERO record: the page is filled with ``fill`` (always 0 from QEMU 7.2)."""

    block: str
    offset: int
    fill: int
    cont: bool


class Config(NamedTuple):
    """The configuration section: machine type and the validated capabilities (x-ignore-shared)."""

    machine: str
    capabilities: tuple[str, ...]


class Command(NamedTuple):
    """A top-level COMMAND record (return path open, ping)."""

    cmd: int
    data: bytes

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.cmd, f"CMD_{self.cmd}")


class RamBlocks(NamedTuple):
    """The MEM_SIZE record: RAM blocks and their used lengths, in stream order; ``addrs`` only with
    x-ignore-shared (the guest-physical address of each block's memory region)."""

    blocks: tuple[tuple[str, int], ...]
    addrs: tuple[int, ...] | None


class SectionStart(NamedTuple):
    """A ram section begins (its header bytes follow). ``iteration`` counts PART/END sections from 1; 0
    for START (which only carries MEM_SIZE)."""

    kind: int
    section_id: int
    iteration: int


class SectionEnd(NamedTuple):
    """A ram section ended (EOS and footer included before this mark)."""

    kind: int
    section_id: int
    iteration: int


class DeviceTail(NamedTuple):
    """Start of the device-state tail (first non-ram FULL section, or EOF); its bytes follow as Opaque."""

    first_device: str | None


class StreamEnd(NamedTuple):
    """The stream is complete: QEMU_VM_EOF + VMDESCRIPTION were seen (``vmdesc``), or close() was called
    with ``require_vmdesc=False`` on a tail without one."""

    vmdesc: bool
    total_bytes: int


Mark = Config | Command | RamBlocks | SectionStart | SectionEnd | DeviceTail | StreamEnd
Event = Opaque | Page | ZeroPage | Mark


def page_header(block: str, offset: int, flags: int, cont: bool) -> bytes:
    """The record header of a PAGE or ZERO record: be64 offset|flags, then u8 len + idstr unless CONTINUE."""
    if cont:
        return _BE64.pack(offset | flags | RAM_CONTINUE)
    name = block.encode("latin-1")
    return _BE64.pack(offset | flags) + bytes((len(name),)) + name


def event_bytes(ev: Event) -> bytes | memoryview:
    """The stream bytes an event stands for (b"" for marks)."""
    if type(ev) is Page:
        return page_header(ev.block, ev.offset, RAM_PAGE, ev.cont) + ev.data
    if type(ev) is ZeroPage:
        return page_header(ev.block, ev.offset, RAM_ZERO, ev.cont) + bytes((ev.fill,))
    if type(ev) is Opaque:
        return ev.data
    return b""


# ---------------------------------------------------------------------------------------------------------
# Parser

_S_HEADER = 0  # expecting QEVM magic + version
_S_TOP = 1  # expecting a top-level section type byte
_S_RAM = 2  # inside a ram section body: expecting a be64 record header
_S_FOOTER = 3  # after EOS: an optional footer (0x7e + be32 section id)
_S_TAIL = 4  # device state: opaque until the end
_S_DONE = 5  # VMDESCRIPTION complete


class _NeedMore(Exception):
    """Internal: the buffer ends inside the record at hand."""


class MigrationStreamParser:
    """Incremental parser: ``feed(data)`` returns the events for every complete record in ``data`` (a
    record split across feeds is held back until it is complete, at most one page); ``close()`` checks
    that the stream ended where it may end.

    Page payloads are zero-copy memoryviews into the bytes given to ``feed`` (bytearray/memoryview input
    is copied first, so later reuse of the caller's buffer cannot change them)."""

    def __init__(self, *, require_vmdesc: bool = True) -> None:
        self._state = _S_HEADER
        self._base = 0  # stream offset of self._buf[0]
        self._buf: bytes = b""
        self._require_vmdesc = require_vmdesc
        self.config: Config | None = None
        self.capabilities: frozenset[str] = frozenset()
        self.blocks: dict[str, int] = {}
        self.block_addrs: dict[str, int] = {}
        self.ram_section_id: int | None = None
        self.iteration = 0
        self.ram_ended = False
        self.tail_offset: int | None = None  # stream offset where the device tail begins
        self.end_offset: int | None = None  # stream offset after VMDESCRIPTION, once known
        self._block: str | None = None  # current block for CONTINUE: persists ACROSS sections
        self._block_len = 0
        self._names: dict[bytes, str] = {}
        self._section_kind = 0
        self._section_id = 0
        self._tail = bytearray()
        self._vmdesc_at: int | None = None  # offset in self._tail of a candidate VMDESCRIPTION
        self._vmdesc_scan = 0
        self._closed = False
        self._error: VmStreamError | None = None
        # counters
        self.pages = 0
        self.zero_pages = 0
        self.bytes_fed = 0

    # -- public -----------------------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Stream offset up to which events have been produced."""
        return self._base

    @property
    def done(self) -> bool:
        return self._state == _S_DONE

    @property
    def tail(self) -> bytes:
        """The device-state tail seen so far (from the first FULL device section to the end)."""
        return bytes(self._tail)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._error is not None:
            raise self._error  # a refused stream stays refused
        if self._closed:
            raise VmStreamError("feed() after close()", offset=self._base)
        if not data:
            return []
        chunk = data if type(data) is bytes else bytes(data)
        self.bytes_fed += len(chunk)
        buf = self._buf + chunk if self._buf else chunk
        out: list[Event] = []
        try:
            pos = self._run(buf, out)
        except VmStreamError as e:
            self._error = e
            raise
        self._buf = buf[pos:]
        self._base += pos
        return out

    def close(self) -> list[Event]:
        """Declare the end of input. Returns the final events (StreamEnd) or raises if the stream is
        truncated (VmStreamError with truncated=True and the offset where input ended)."""
        if self._error is not None:
            raise self._error
        if self._closed:
            return []
        self._closed = True
        end = self._base + len(self._buf)
        if self._state == _S_DONE:
            return []
        if self._state == _S_TAIL and not self._require_vmdesc:
            self._state = _S_DONE
            self.end_offset = end
            return [StreamEnd(False, end)]
        if self._state == _S_TAIL:
            err = VmStreamError(
                "input ended inside the device state (no complete QEMU_VM_EOF + VMDESCRIPTION)",
                offset=end,
                truncated=True,
            )
        else:
            what = {
                _S_HEADER: "the file header",
                _S_TOP: "a section header",
                _S_RAM: "a RAM record",
                _S_FOOTER: "a section footer",
            }[self._state]
            if self._buf:
                err = VmStreamError(
                    f"input ended inside {what} ({len(self._buf)} bytes of it present)",
                    offset=self._base,
                    truncated=True,
                )
            else:
                err = VmStreamError(f"input ended where {what} was expected", offset=end, truncated=True)
        self._error = err
        raise err

    # -- machinery --------------------------------------------------------------------------------------

    def _err(self, message: str, pos: int) -> VmStreamError:
        return VmStreamError(message, offset=self._base + pos)

    def _run(self, buf: bytes, out: list[Event]) -> int:
        """Parse as far as buf allows; return the position of the first unconsumed byte. Every byte
        before it has been emitted (as Opaque or inside a page event)."""
        pos = 0  # start of the record at hand
        op = 0  # start of bytes not yet emitted as Opaque
        end = len(buf)
        mv = memoryview(buf)
        try:
            while pos < end:
                st = self._state
                if st == _S_RAM:
                    pos, op = self._ram(buf, mv, pos, op, end, out)
                    if self._state == _S_RAM:
                        raise _NeedMore
                elif st == _S_TOP:
                    pos, op = self._top(buf, pos, op, end, out)
                elif st == _S_FOOTER:
                    if buf[pos] == SEC_FOOTER:
                        if pos + 5 > end:
                            raise _NeedMore
                        (sid,) = _BE32.unpack_from(buf, pos + 1)
                        if sid != self._section_id:
                            raise self._err(f"section footer for id {sid}, expected {self._section_id}", pos)
                        pos += 5
                    if op < pos:
                        out.append(Opaque(buf[op:pos]))
                        op = pos
                    out.append(SectionEnd(self._section_kind, self._section_id, self.iteration))
                    if self._section_kind == SEC_END:
                        self.ram_ended = True
                    self._state = _S_TOP
                elif st == _S_TAIL:
                    pos = self._tail_bytes(buf, pos, op, end, out)
                    op = pos
                elif st == _S_HEADER:
                    if pos + 8 > end:
                        raise _NeedMore
                    magic, version = struct.unpack_from(">II", buf, pos)
                    if magic != QEVM_MAGIC:
                        raise self._err(f"not a QEMU migration stream (magic {magic:#010x})", pos)
                    if version != QEVM_VERSION:
                        raise self._err(f"unsupported stream version {version} (expected 3)", pos + 4)
                    pos += 8
                    self._state = _S_TOP
                else:  # _S_DONE
                    raise self._err(f"{end - pos} unexpected bytes after the end of the stream", pos)
        except _NeedMore:
            pass
        if op < pos:
            out.append(Opaque(buf[op:pos]))
        return pos

    def _name(self, raw: bytes) -> str:
        name = self._names.get(raw)
        if name is None:
            name = self._names[raw] = raw.decode("latin-1")
        return name

    def _top(self, buf: bytes, pos: int, op: int, end: int, out: list[Event]) -> tuple[int, int]:
        t = buf[pos]
        if t in (SEC_START, SEC_FULL):
            if pos + 6 > end:
                raise _NeedMore
            (sid,) = _BE32.unpack_from(buf, pos + 1)
            n = buf[pos + 5]
            if pos + 14 + n > end:
                raise _NeedMore
            idstr = self._name(buf[pos + 6 : pos + 6 + n])
            _instance, version = struct.unpack_from(">II", buf, pos + 6 + n)
            if idstr != RAM_IDSTR:
                if t == SEC_START:
                    raise self._err(
                        f"unsupported iterable section {idstr!r} (block migration, dirty bitmaps, vfio?)", pos
                    )
                if self.ram_section_id is not None and not self.ram_ended:
                    raise self._err(f"device section {idstr!r} before the ram END section", pos)
                return self._enter_tail(buf, pos, op, out, idstr)
            if t == SEC_FULL:
                raise self._err("ram as a FULL section is not a precopy stream", pos)
            if self.ram_section_id is not None:
                raise self._err("a second ram START section", pos)
            if version != 4:
                raise self._err(f"ram section version {version}, expected 4", pos)
            self.ram_section_id = sid
            return self._enter_section(buf, pos, op, out, SEC_START, sid, pos + 14 + n)
        if t in (SEC_PART, SEC_END):
            if pos + 5 > end:
                raise _NeedMore
            (sid,) = _BE32.unpack_from(buf, pos + 1)
            if sid != self.ram_section_id:
                raise self._err(f"{SECTION_NAMES[t]} section for unknown section id {sid}", pos)
            if self.ram_ended:
                raise self._err(f"{SECTION_NAMES[t]} section after the ram END section", pos)
            self.iteration += 1
            return self._enter_section(buf, pos, op, out, t, sid, pos + 5)
        if t == SEC_COMMAND:
            if pos + 5 > end:
                raise _NeedMore
            cmd, length = struct.unpack_from(">HH", buf, pos + 1)
            want = _COMMAND_LEN.get(cmd)
            if want is None:
                name = COMMAND_NAMES.get(cmd, f"unknown command {cmd}")
                raise self._err(f"unsupported COMMAND {name} (postcopy/colo streams are not handled)", pos)
            if length != want:
                raise self._err(f"COMMAND {COMMAND_NAMES[cmd]} with length {length}, expected {want}", pos)
            if pos + 5 + length > end:
                raise _NeedMore
            if op < pos:
                out.append(Opaque(buf[op:pos]))
            out.append(Command(cmd, buf[pos + 5 : pos + 5 + length]))
            return pos + 5 + length, pos
        if t == SEC_CONFIGURATION:
            if self.config is not None or self.ram_section_id is not None:
                raise self._err("unexpected configuration section", pos)
            return self._config(buf, pos, op, end, out)
        if t == SEC_EOF:
            return self._enter_tail(buf, pos, op, out, None)
        raise self._err(f"unknown section type {t:#04x}", pos)

    def _enter_section(
        self, buf: bytes, pos: int, op: int, out: list[Event], kind: int, sid: int, body: int
    ) -> tuple[int, int]:
        if op < pos:
            out.append(Opaque(buf[op:pos]))
        out.append(SectionStart(kind, sid, self.iteration))
        self._section_kind = kind
        self._section_id = sid
        self._state = _S_RAM
        return body, pos

    def _enter_tail(
        self, buf: bytes, pos: int, op: int, out: list[Event], first: str | None
    ) -> tuple[int, int]:
        if op < pos:
            out.append(Opaque(buf[op:pos]))
        out.append(DeviceTail(first))
        self.tail_offset = self._base + pos
        self._state = _S_TAIL
        return pos, pos

    def _config(self, buf: bytes, pos: int, op: int, end: int, out: list[Event]) -> tuple[int, int]:
        p = pos + 1
        if p + 4 > end:
            raise _NeedMore
        (n,) = _BE32.unpack_from(buf, p)
        if n > 255:
            raise self._err(f"configuration machine name of {n} bytes", p)
        p += 4 + n
        if p > end:
            raise _NeedMore
        machine = buf[pos + 5 : p].decode("latin-1")
        caps: list[str] = []
        # Subsections have no terminator: they last while the next byte is 0x05, so one byte after them
        # must be present before the section can be decided (QEMU always sends more).
        while True:
            if p >= end:
                raise _NeedMore
            if buf[p] != SEC_SUBSECTION:
                break
            if p + 2 > end:
                raise _NeedMore
            ln = buf[p + 1]
            q = p + 2 + ln + 4
            if q > end:
                raise _NeedMore
            sub = buf[p + 2 : p + 2 + ln].decode("latin-1")
            if sub == "configuration/capabilities":
                if q + 4 > end:
                    raise _NeedMore
                (count,) = _BE32.unpack_from(buf, q)
                q += 4
                for _ in range(count):
                    if q >= end:
                        raise _NeedMore
                    cl = buf[q]
                    if q + 1 + cl > end:
                        raise _NeedMore
                    caps.append(buf[q + 1 : q + 1 + cl].decode("latin-1"))
                    q += 1 + cl
            elif sub == "configuration/target-page-bits":
                if q + 4 > end:
                    raise _NeedMore
                (bits,) = _BE32.unpack_from(buf, q)
                if bits != 12:
                    raise self._err(f"target page bits {bits}: only 4 KiB pages are handled", q)
                q += 4
            elif sub == "configuration/uuid":
                q += 16
                if q > end:
                    raise _NeedMore
            else:
                raise self._err(f"unknown configuration subsection {sub!r}", p)
            p = q
        if op < pos:
            out.append(Opaque(buf[op:pos]))
        self.config = Config(machine, tuple(caps))
        self.capabilities = frozenset(caps)
        out.append(self.config)
        return p, pos

    def _ram(
        self, buf: bytes, mv: memoryview, pos: int, op: int, end: int, out: list[Event]
    ) -> tuple[int, int]:
        """The hot loop: RAM records until EOS or the end of the buffer."""
        unpack = _BE64.unpack_from
        append = out.append
        block = self._block
        blen = self._block_len
        pages = zeros = 0
        try:
            while pos + 8 <= end:
                (v,) = unpack(buf, pos)
                flags = v & FLAG_MASK
                offset = v & PAGE_MASK
                if flags == RAM_PAGE | RAM_CONTINUE:
                    if pos + 4104 > end:
                        break
                    if block is None:
                        raise self._err("CONTINUE page record with no current RAM block", pos)
                    if offset >= blen:
                        raise self._err(f"page offset {offset:#x} beyond RAM block {block!r}", pos)
                    if op < pos:
                        append(Opaque(buf[op:pos]))
                    pos += 4104
                    op = pos
                    append(Page(block, offset, mv[pos - 4096 : pos], True))
                    pages += 1
                elif flags == RAM_ZERO | RAM_CONTINUE:
                    if pos + 9 > end:
                        break
                    if block is None:
                        raise self._err("CONTINUE zero record with no current RAM block", pos)
                    if offset >= blen:
                        raise self._err(f"page offset {offset:#x} beyond RAM block {block!r}", pos)
                    if op < pos:
                        append(Opaque(buf[op:pos]))
                    append(ZeroPage(block, offset, buf[pos + 8], True))
                    pos += 9
                    op = pos
                    zeros += 1
                elif flags in (RAM_PAGE, RAM_ZERO):
                    if pos + 9 > end:
                        break
                    n = buf[pos + 8]
                    size = 9 + n + (PAGE_SIZE if flags == RAM_PAGE else 1)
                    if pos + size > end:
                        break
                    name = self._name(buf[pos + 9 : pos + 9 + n])
                    length = self.blocks.get(name)
                    if length is None:
                        raise self._err(f"page record for unknown RAM block {name!r}", pos)
                    block, blen = name, length
                    if offset >= blen:
                        raise self._err(f"page offset {offset:#x} beyond RAM block {block!r}", pos)
                    if op < pos:
                        append(Opaque(buf[op:pos]))
                    pos += size
                    op = pos
                    if flags == RAM_PAGE:
                        append(Page(block, offset, mv[pos - 4096 : pos], False))
                        pages += 1
                    else:
                        append(ZeroPage(block, offset, buf[pos - 1], False))
                        zeros += 1
                elif flags & ~RAM_CONTINUE == RAM_EOS:
                    pos += 8
                    self._state = _S_FOOTER
                    break
                elif flags == RAM_MEM_SIZE:
                    pos, op = self._mem_size(buf, pos, op, end, out, offset)
                else:
                    raise self._err(self._bad_flags(flags), pos)
        finally:
            self._block, self._block_len = block, blen
            self.pages += pages
            self.zero_pages += zeros
        return pos, op

    def _bad_flags(self, flags: int) -> str:
        for bit, what in (
            (RAM_XBZRLE, "XBZRLE pages (xbzrle capability)"),
            (RAM_HOOK, "RDMA hook records"),
            (RAM_COMPRESS_PAGE, "compressed pages (compress capability)"),
            (RAM_MULTIFD_FLUSH, "multifd flush records (multifd, QEMU >= 8)"),
        ):
            if flags & bit:
                return f"unsupported RAM record flags {flags:#x}: {what}"
        return f"unknown RAM record flags {flags:#x}"

    def _mem_size(
        self, buf: bytes, pos: int, op: int, end: int, out: list[Event], total: int
    ) -> tuple[int, int]:
        if self._section_kind != SEC_START or self.blocks:
            raise self._err("MEM_SIZE record outside the ram START section", pos)
        with_addr = "x-ignore-shared" in self.capabilities
        p = pos + 8
        remaining = total
        blocks: list[tuple[str, int]] = []
        addrs: list[int] = []
        while remaining > 0:
            if p >= end:
                raise _NeedMore
            n = buf[p]
            q = p + 1 + n + (16 if with_addr else 8)
            if q > end:
                raise _NeedMore
            name = self._name(buf[p + 1 : p + 1 + n])
            (used,) = _BE64.unpack_from(buf, p + 1 + n)
            if with_addr:
                addrs.append(_BE64.unpack_from(buf, p + 9 + n)[0])
            if used > remaining or used % PAGE_SIZE:
                raise self._err(f"RAM block {name!r} length {used:#x} does not fit MEM_SIZE {total:#x}", p)
            blocks.append((name, used))
            remaining -= used
            p = q
        if op < pos:
            out.append(Opaque(buf[op:pos]))
        self.blocks = dict(blocks)
        if with_addr:
            self.block_addrs = dict(zip(self.blocks, addrs, strict=True))
        out.append(RamBlocks(tuple(blocks), tuple(addrs) if with_addr else None))
        return p, pos

    def _tail_bytes(self, buf: bytes, pos: int, op: int, end: int, out: list[Event]) -> int:
        """Device state: forward at once, and watch for QEMU_VM_EOF + VMDESCRIPTION to know the end."""
        self._tail += buf[pos:end]
        stop = end
        while True:
            if self._vmdesc_at is None:
                m = _VMDESC_RE.search(self._tail, self._vmdesc_scan)
                if m is None:
                    self._vmdesc_scan = max(0, len(self._tail) - 32)
                    break
                self._vmdesc_at = m.start()
            at = self._vmdesc_at
            (length,) = _BE32.unpack_from(self._tail, at + 2)
            if length > _VMDESC_MAX:  # device bytes that merely look like one; keep looking
                self._vmdesc_at = None
                self._vmdesc_scan = at + 1
                continue
            vm_end = at + 6 + length
            if vm_end > len(self._tail):
                break  # wait for the rest of the description
            try:
                json.loads(self._tail[at + 6 : vm_end])
            except ValueError:
                self._vmdesc_at = None  # device bytes that merely looked like the start of one
                self._vmdesc_scan = at + 1
                continue
            extra = len(self._tail) - vm_end
            stop = end - extra
            del self._tail[vm_end:]
            self._state = _S_DONE
            self.end_offset = self._base + stop
            break
        if pos < stop:
            out.append(Opaque(buf[pos:stop]))
        if self._state == _S_DONE:
            out.append(StreamEnd(True, self._base + stop))
        return stop


# ---------------------------------------------------------------------------------------------------------
# Writer


Sink = Callable[[bytes | memoryview], object]


class MigrationStreamWriter:
    """Re-emits a stream from events (pass-through, or pages from another source such as a delta decoder).

    It keeps QEMU's notion of the "current block" across sections, so a CONTINUE record that would make the
    destination put a page into the wrong block is refused instead of written. Marks are ignored: their
    bytes travel in the Opaque events. Small writes are coalesced; ``flush()`` pushes them out (call it
    whenever the source has nothing more to read, or the destination may wait forever: return path)."""

    def __init__(self, sink: BinaryIO | Sink, *, bufsize: int = 1 << 16) -> None:
        write = getattr(sink, "write", None)
        self._write: Sink = write if write is not None else sink  # type: ignore[assignment]
        self._buf = bytearray()
        self._bufsize = bufsize
        self._block: str | None = None
        self.bytes_written = 0

    def write(self, ev: Event) -> None:
        if isinstance(ev, Page | ZeroPage):
            self._record(ev)
        elif isinstance(ev, Opaque):
            self._emit(ev.data)

    def write_all(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.write(ev)

    def _record(self, ev: Page | ZeroPage) -> None:
        if ev.cont:
            if ev.block != self._block:
                raise VmStateError(
                    f"migration stream writer: CONTINUE record for block {ev.block!r} while the current "
                    f"block is {self._block!r} (at output byte {self.bytes_written + len(self._buf)})"
                )
        else:
            self._block = ev.block
        if isinstance(ev, Page):
            if len(ev.data) != PAGE_SIZE:
                raise VmStateError(f"migration stream writer: page payload of {len(ev.data)} bytes")
            self._emit(page_header(ev.block, ev.offset, RAM_PAGE, ev.cont))
            self._emit(ev.data)
        else:
            self._emit(page_header(ev.block, ev.offset, RAM_ZERO, ev.cont) + bytes((ev.fill,)))

    def page(self, block: str, offset: int, data: bytes | memoryview) -> None:
        """Canonical page record: ZERO for an all-zero page, CONTINUE when the block is the current one."""
        cont = block == self._block
        if data == ZERO_PAGE:
            self._record(ZeroPage(block, offset, 0, cont))
        else:
            self._record(Page(block, offset, data, cont))

    def zero_page(self, block: str, offset: int) -> None:
        self._record(ZeroPage(block, offset, 0, block == self._block))

    def raw(self, data: bytes | memoryview) -> None:
        self._emit(data)

    def begin_section(self, kind: int, section_id: int) -> None:
        """Header of a ram PART/END section."""
        if kind not in (SEC_PART, SEC_END):
            raise VmStateError(f"migration stream writer: cannot open a section of type {kind}")
        self._emit(bytes((kind,)) + _BE32.pack(section_id))

    def end_section(self, section_id: int) -> None:
        """EOS record and footer."""
        self._emit(_BE64.pack(RAM_EOS) + _FOOTER.pack(SEC_FOOTER, section_id))

    def _emit(self, data: bytes | memoryview) -> None:
        if len(data) >= self._bufsize:
            self.flush()
            self._write(data)
            self.bytes_written += len(data)
            return
        self._buf += data
        if len(self._buf) >= self._bufsize:
            self.flush()

    def flush(self) -> None:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._write(data)
            self.bytes_written += len(data)


def iter_events(
    source: BinaryIO, *, chunk_size: int = 1 << 20, require_vmdesc: bool = True
) -> Iterator[Event]:
    """Parse a whole stream from a file object (a save image's stream part, a captured migration)."""
    parser = MigrationStreamParser(require_vmdesc=require_vmdesc)
    while True:
        data = source.read(chunk_size)
        if not data:
            break
        yield from parser.feed(data)
        if parser.done:
            rest = source.read(1)
            if rest:
                yield from parser.feed(rest)  # raises: bytes after the end
    yield from parser.close()


def events_to_bytes(events: Iterable[Event]) -> bytes:
    out = bytearray()
    for ev in events:
        out += event_bytes(ev)
    return bytes(out)
