"""A migration stream as parts: prefix, flat RAM per block, device tail; and the canonical rebuild.

A complete precopy stream is split into
  * the **prefix**: QEVM header, configuration, commands, the ram START section (MEM_SIZE) with footer;
  * **RAM**: the final content of every page, written into one flat file per RAM block (sparse where the
    page is zero or was never sent);
  * the **tail**: the device state from the first FULL device section, EOF, VMDESCRIPTION.
The section headers, EOS records and footers of the PART/END sections are not kept: the canonical rebuild
regenerates them as one PART section holding every page exactly once (CONTINUE within a block, ZERO
records for zero pages) and an empty END section.

The rebuilt stream is always re-parsed and compared with its sources before it is handed out: a rebuild
that drops a byte of the device tail still loads "successfully" into QEMU and brings the guest back with
fresh device state (LIVE-HANDOFF (C)).
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

if TYPE_CHECKING:  # numpy is imported where pages are handled: an agent op that only lists state
    import numpy as np  # (observe, ps) imports this package but not numpy (~0.15 s of CPU per call)
    import numpy.typing as npt

from nephele.errors import VmStateError
from nephele.vmstate.stream import (
    FILE_HEADER,
    PAGE_SIZE,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_MEM_SIZE,
    RAM_PAGE,
    RAM_ZERO,
    SEC_COMMAND,
    SEC_CONFIGURATION,
    SEC_END,
    SEC_FOOTER,
    SEC_PART,
    SEC_START,
    SEC_SUBSECTION,
    ZERO_PAGE,
    Command,
    Config,
    DeviceTail,
    Event,
    MigrationStreamParser,
    MigrationStreamWriter,
    Opaque,
    Page,
    RamBlocks,
    SectionStart,
    StreamEnd,
    ZeroPage,
    iter_events,
)

_CHUNK_PAGES = 1024  # pages read per step when building from flat files (4 MiB)


@dataclass
class StreamParts:
    """The non-RAM parts of a precopy stream."""

    prefix: bytes
    tail: bytes
    section_id: int
    blocks: dict[str, int]
    config: Config
    commands: tuple[Command, ...] = ()
    iterations: int = 0
    pages: int = 0
    zero_pages: int = 0

    @classmethod
    def from_prefix(cls, prefix: bytes, tail: bytes) -> StreamParts:
        """Recover the structure (section id, blocks, config) from a stored prefix."""
        parser = MigrationStreamParser()
        events = parser.feed(prefix)
        if parser.offset != len(prefix) or parser.ram_section_id is None or not parser.blocks:
            raise VmStateError(
                f"stream prefix ({len(prefix)} bytes) does not end after a complete ram START section"
            )
        if any(isinstance(e, SectionStart) and e.kind != SEC_START for e in events):
            raise VmStateError("stream prefix holds ram iterations; it must end after the START section")
        if parser.config is None:  # QEMU always sends one; a stored prefix without it was not made here
            raise VmStateError("stream prefix has no configuration section before the ram START section")
        cmds = tuple(e for e in events if isinstance(e, Command))
        return cls(prefix, tail, parser.ram_section_id, dict(parser.blocks), parser.config, cmds)


def block_filename(idstr: str) -> str:
    """A file name for a RAM block idstr ("pc.ram", "/rom@etc/acpi/tables"): reversible, no slashes."""
    return quote(idstr, safe=".-_+")


class FlatRam:
    """One flat file per RAM block, filled from page events. Files are created at the block's used
    length and stay sparse where pages are zero; ``seen`` says which pages the stream carried."""

    def __init__(self, out_dir: Path, blocks: Mapping[str, int]) -> None:
        import numpy as np

        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths: dict[str, Path] = {}
        self._fds: dict[str, int] = {}
        self.seen: dict[str, npt.NDArray[np.bool_]] = {}
        self._data: dict[str, npt.NDArray[np.bool_]] = {}
        try:
            for name, length in blocks.items():
                path = out_dir / block_filename(name)
                # replace rather than truncate: truncating a large file full of dirty page cache
                # stalls on writeback (seconds under load), an unlinked inode is freed in the background
                path.unlink(missing_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                self._fds[name] = fd
                self.paths[name] = path
                os.ftruncate(fd, length)
                self.seen[name] = np.zeros(length // PAGE_SIZE, dtype=np.bool_)
                self._data[name] = np.zeros(length // PAGE_SIZE, dtype=np.bool_)
        except (OSError, MemoryError) as e:  # EFBIG, ENOSPC; a page bitmap too large for this host
            self.remove()
            why = str(e) or f"{type(e).__name__} (RAM blocks of {sum(blocks.values())} bytes)"
            raise VmStateError(f"cannot create RAM image files in {out_dir}: {why}") from e

    def apply(self, ev: Page | ZeroPage) -> None:
        fd = self._fds[ev.block]
        i = ev.offset // PAGE_SIZE
        if isinstance(ev, Page):
            os.pwrite(fd, ev.data, ev.offset)
            self._data[ev.block][i] = True
        elif ev.fill:
            os.pwrite(fd, bytes((ev.fill,)) * PAGE_SIZE, ev.offset)
            self._data[ev.block][i] = True
        elif self._data[ev.block][i]:  # data sent earlier, zeroed since
            os.pwrite(fd, ZERO_PAGE, ev.offset)
            self._data[ev.block][i] = False
        self.seen[ev.block][i] = True

    def missing(self) -> dict[str, int]:
        """Blocks with pages the stream never carried, and how many."""
        return {n: int((~s).sum()) for n, s in self.seen.items() if not s.all()}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def remove(self) -> None:
        """Close and delete the files (a failed split leaves nothing half-written)."""
        self.close()
        for path in self.paths.values():
            path.unlink(missing_ok=True)


def split_events(
    events: Iterable[Event],
    on_page: Callable[[Page | ZeroPage], None],
    *,
    on_blocks: Callable[[RamBlocks], None],
) -> StreamParts:
    """Consume a complete stream's events: collect prefix and tail, hand every page to ``on_page``
    (in stream order, so later copies of a page override earlier ones)."""
    prefix = bytearray()
    tail = bytearray()
    phase = 0  # 0 prefix, 1 ram iterations, 2 tail
    config: Config | None = None
    blocks: RamBlocks | None = None
    section_id: int | None = None
    commands: list[Command] = []
    iterations = pages = zeros = 0
    ended = False
    for ev in events:
        if isinstance(ev, Page | ZeroPage):
            on_page(ev)
            if isinstance(ev, Page):
                pages += 1
            else:
                zeros += 1
        elif isinstance(ev, Opaque):
            if phase == 0:
                prefix += ev.data
            elif phase == 2:
                tail += ev.data
        elif isinstance(ev, SectionStart):
            if ev.kind in (SEC_PART, SEC_END):
                phase = 1
                iterations = ev.iteration
            else:
                section_id = ev.section_id
        elif isinstance(ev, DeviceTail):
            phase = 2
        elif isinstance(ev, Command):
            if phase != 0:
                raise VmStateError(f"COMMAND {ev.name} between ram iterations: cannot rebuild this stream")
            commands.append(ev)
        elif isinstance(ev, Config):
            config = ev
        elif isinstance(ev, RamBlocks):
            blocks = ev
            on_blocks(ev)
        elif isinstance(ev, StreamEnd):
            ended = True
    if not ended or config is None or blocks is None or section_id is None:
        raise VmStateError("migration stream: incomplete (no configuration, ram section or end)")
    return StreamParts(
        bytes(prefix),
        bytes(tail),
        section_id,
        dict(blocks.blocks),
        config,
        tuple(commands),
        iterations,
        pages,
        zeros,
    )


@dataclass
class SplitResult:
    parts: StreamParts
    ram: dict[str, Path]
    missing: dict[str, int] = field(default_factory=dict)


def split_stream(source: BinaryIO, out_dir: Path, *, allow_missing: bool = False) -> SplitResult:
    """Split a complete stream read from ``source`` into parts and flat RAM files under ``out_dir``.
    Unless ``allow_missing`` (x-ignore-shared streams), every page of every block must have been sent."""
    holder: list[FlatRam] = []

    def on_blocks(rb: RamBlocks) -> None:
        holder.append(FlatRam(out_dir, dict(rb.blocks)))

    def on_page(ev: Page | ZeroPage) -> None:
        holder[0].apply(ev)

    try:
        parts = split_events(iter_events(source), on_page, on_blocks=on_blocks)
        missing = holder[0].missing()
        if missing and not allow_missing:
            lost = ", ".join(f"{n}: {c} pages" for n, c in missing.items())
            raise VmStateError(f"migration stream does not carry every RAM page ({lost})")
    except OSError as e:  # disk full, unreadable source: a clear error and no files left
        for ram in holder:
            ram.remove()
        raise VmStateError(f"splitting the stream into {out_dir}: {e}") from e
    except BaseException:
        for ram in holder:
            ram.remove()
        raise
    holder[0].close()
    return SplitResult(parts, dict(holder[0].paths), missing)


# ---------------------------------------------------------------------------------------------------------
# Canonical rebuild


def _check_sources(parts: StreamParts, ram: Mapping[str, Path]) -> None:
    if set(ram) != set(parts.blocks):
        raise VmStateError(
            f"RAM images {sorted(ram)} do not match the stream's RAM blocks {sorted(parts.blocks)}"
        )
    for name, length in parts.blocks.items():
        try:
            size = os.stat(ram[name]).st_size
        except OSError as e:
            raise VmStateError(f"RAM image for block {name!r}: {e}") from e
        if size != length:
            raise VmStateError(f"RAM image {ram[name]} is {size} bytes; block {name!r} is {length}")


def _read_chunk(fd: int, offset: int, n: int, path: Path) -> bytes:
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise VmStateError(f"RAM image {path} ended at byte {offset + len(data)} (expected {offset + n})")
    return data


def _write_block(w: MigrationStreamWriter, name: str, path: Path, length: int) -> None:
    """Every page of one block: the first record names the block, the rest are CONTINUE records built
    per 4 MiB chunk with numpy (headers and zero records vectorised, data pages copied per run)."""
    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    try:
        for base in range(0, length, _CHUNK_PAGES * PAGE_SIZE):
            n = min(_CHUNK_PAGES * PAGE_SIZE, length - base)
            data = _read_chunk(fd, base, n, path)
            pages = np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            first = 0
            if base == 0:
                w.page(name, 0, data[:PAGE_SIZE])  # not CONTINUE: a new block starts
                first = 1
                if pages.shape[0] == 1:
                    continue
            nz = np.asarray(pages[first:].view(np.uint64).any(axis=1), dtype=np.bool_)
            sizes = np.where(nz, 8 + PAGE_SIZE, 9)
            ends = np.cumsum(sizes)
            starts = ends - sizes
            out = np.zeros(int(ends[-1]), dtype=np.uint8)  # a ZERO record's fill byte stays 0
            index = np.arange(first, pages.shape[0], dtype=np.uint64)
            flags = np.where(nz, RAM_PAGE | RAM_CONTINUE, RAM_ZERO | RAM_CONTINUE).astype(np.uint64)
            heads = (np.uint64(base) + index * np.uint64(PAGE_SIZE)) | flags
            out[starts[:, None] + np.arange(8)] = heads.astype(">u8").view(np.uint8).reshape(-1, 8)
            # runs of data pages lie at a fixed stride of 8 + 4096 bytes: one strided copy per run
            edges = np.flatnonzero(np.diff(nz.view(np.int8))) + 1
            bounds = [0, *edges.tolist(), int(nz.shape[0])]
            for a, b in itertools.pairwise(bounds):
                if nz[a]:
                    at = int(starts[a])
                    span = out[at : at + (b - a) * (8 + PAGE_SIZE)].reshape(b - a, 8 + PAGE_SIZE)
                    span[:, 8:] = pages[first + a : first + b]
            w.raw(out.data)
    finally:
        os.close(fd)


def write_canonical_stream(sink: BinaryIO, parts: StreamParts, ram: Mapping[str, Path]) -> int:
    """Write prefix + one ram PART with every page once + empty END + tail to ``sink``; returns the
    number of bytes written. Blocks go in MEM_SIZE order. Not verified: see ``verify_canonical``."""
    _check_sources(parts, ram)
    w = MigrationStreamWriter(sink, bufsize=1 << 20)
    w.raw(parts.prefix)
    w.begin_section(SEC_PART, parts.section_id)
    for name, length in parts.blocks.items():
        _write_block(w, name, ram[name], length)
    w.end_section(parts.section_id)
    w.begin_section(SEC_END, parts.section_id)
    w.end_section(parts.section_id)
    w.raw(parts.tail)
    w.flush()
    return w.bytes_written


def verify_canonical(source: BinaryIO, parts: StreamParts, ram: Mapping[str, Path]) -> None:
    """Re-parse a rebuilt stream and compare it with what it was built from: prefix and tail byte for
    byte, every page of every block exactly once with the content of its flat file. Raises on the first
    difference."""
    _check_sources(parts, ram)
    fds: dict[str, int] = {}
    try:
        for name, path in ram.items():
            fds[name] = os.open(path, os.O_RDONLY)
    except OSError as e:
        for fd in fds.values():
            os.close(fd)
        raise VmStateError(f"cannot read RAM image: {e}") from e
    import numpy as np

    seen = {name: np.zeros(n // PAGE_SIZE, dtype=np.bool_) for name, n in parts.blocks.items()}

    def on_page(ev: Page | ZeroPage) -> None:
        got = seen.get(ev.block)
        if got is None:
            raise VmStateError(f"rebuilt stream: page of unexpected block {ev.block!r}")
        i = ev.offset // PAGE_SIZE
        if got[i]:
            raise VmStateError(f"rebuilt stream: page {ev.block}@{ev.offset:#x} appears twice")
        got[i] = True
        want = os.pread(fds[ev.block], PAGE_SIZE, ev.offset)
        have = bytes(ev.data) if isinstance(ev, Page) else bytes((ev.fill,)) * PAGE_SIZE
        if want != have:
            raise VmStateError(f"rebuilt stream: page {ev.block}@{ev.offset:#x} differs from {ram[ev.block]}")

    try:
        got_parts = split_events(iter_events(source), on_page, on_blocks=lambda rb: None)
    finally:
        for fd in fds.values():
            os.close(fd)
    if got_parts.prefix != parts.prefix:
        raise VmStateError("rebuilt stream: prefix differs from the original")
    if got_parts.tail != parts.tail:
        raise VmStateError(
            f"rebuilt stream: device tail differs ({len(got_parts.tail)} vs {len(parts.tail)} bytes)"
        )
    for name, s in seen.items():
        if not s.all():
            raise VmStateError(f"rebuilt stream: block {name!r} lacks {int((~s).sum())} pages")


def strip_ignore_shared(parts: StreamParts) -> StreamParts:
    """Turn the parts of a stream saved with x-ignore-shared into parts that a destination without the
    capability accepts: the ``configuration/capabilities`` subsection and the per-block be64 region
    address in MEM_SIZE go. Combined with the shared RAM file's content (``write_canonical_stream``)
    the result is an ordinary full stream (LIVE-HANDOFF (A-a2))."""
    caps = parts.config.capabilities
    if "x-ignore-shared" not in caps:
        return parts
    if caps != ("x-ignore-shared",):
        raise VmStateError(f"cannot strip x-ignore-shared from a stream with capabilities {caps}")
    sid = parts.section_id
    machine = parts.config.machine.encode("latin-1")
    config = bytes((SEC_CONFIGURATION,)) + struct.pack(">I", len(machine)) + machine
    cap_sub = (
        bytes((SEC_SUBSECTION, len(_CAPS_SUB)))
        + _CAPS_SUB
        + struct.pack(">II", 1, 1)
        + bytes((len(b"x-ignore-shared"),))
        + b"x-ignore-shared"
    )
    commands = b"".join(
        bytes((SEC_COMMAND,)) + struct.pack(">HH", c.cmd, len(c.data)) + c.data for c in parts.commands
    )
    if parts.prefix != FILE_HEADER + config + cap_sub + commands + parts.prefix[-_start_len(parts) :]:
        raise VmStateError("stream prefix has configuration subsections other than capabilities")
    start = bytes((SEC_START,)) + struct.pack(">I", sid) + bytes((3,)) + b"ram" + struct.pack(">II", 0, 4)
    mem = struct.pack(">Q", sum(parts.blocks.values()) | RAM_MEM_SIZE)
    for name, used in parts.blocks.items():
        raw = name.encode("latin-1")
        mem += bytes((len(raw),)) + raw + struct.pack(">Q", used)
    end = struct.pack(">Q", RAM_EOS)
    if parts.prefix.endswith(end + bytes((SEC_FOOTER,)) + struct.pack(">I", sid)):
        end += bytes((SEC_FOOTER,)) + struct.pack(">I", sid)
    prefix = FILE_HEADER + config + commands + start + mem + end
    return StreamParts.from_prefix(prefix, parts.tail)


_CAPS_SUB = b"configuration/capabilities"


def _start_len(parts: StreamParts) -> int:
    """Length of the ram START section (header, MEM_SIZE with addresses, EOS, optional footer)."""
    n = 1 + 4 + 1 + 3 + 8 + 8 + sum(1 + len(name.encode("latin-1")) + 16 for name in parts.blocks) + 8
    footer = bytes((SEC_FOOTER,)) + struct.pack(">I", parts.section_id)
    return n + (5 if parts.prefix.endswith(footer) else 0)
