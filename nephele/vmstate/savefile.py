"""libvirt QEMU save images (virsh save / virDomainSave): header, XML, and the QEMU stream inside.

Layout (libvirt src/qemu/qemu_saveimage.h, QEMU_SAVE_VERSION 2; integers in the writer's byte order,
little-endian on x86; a reader that finds version > 2 byte-swaps, as libvirt does):

    0   char[16]  magic       "LibvirtQemudSave" ("LibvirtQemudPart" while the save is incomplete)
    16  u32       version     2
    20  u32       data_len    bytes of XML area that follow the header
    24  u32       was_running 1 if the domain ran when saved (restore resumes it)
    28  u32       compressed  0 raw; 1 gzip, 2 bzip2, 3 xz, 4 lzop (refused here)
    32  u32       cookieOffset  0, or where the cookie starts inside the data area (= strlen(xml) + 1)
    36  u32[14]   unused
    92  data_len bytes: XML, NUL, [cookie XML, NUL], NUL padding (libvirt pads 64 KiB so the XML can grow)
    92 + data_len: the QEMU migration stream (QEVM ...), to the end of the file.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from nephele.errors import VmStateError
from nephele.vmstate.image import (
    SplitResult,
    StreamParts,
    split_stream,
    verify_canonical,
    write_canonical_stream,
)
from nephele.vmstate.stream import FILE_HEADER

SAVE_MAGIC: Final = b"LibvirtQemudSave"
PARTIAL_MAGIC: Final = b"LibvirtQemudPart"
SAVE_VERSION: Final = 2
HEADER_SIZE: Final = 92
XML_PADDING: Final = 64 * 1024
COMPRESSION_NAMES: Final = {0: "raw", 1: "gzip", 2: "bzip2", 3: "xz", 4: "lzop", 5: "zstd"}
_FIELDS = "5I14I"


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: bool
    compressed: int
    cookie_offset: int
    xml: str
    cookie: str | None
    byteorder: str = "<"

    @property
    def stream_offset(self) -> int:
        return HEADER_SIZE + self.data_len


def _die(path: Path | str, message: str) -> VmStateError:
    return VmStateError(f"{path}: {message}")


def parse_save_header(head: bytes, path: Path | str = "save image") -> SaveHeader:
    """Parse the 92-byte header and the data area (``head`` holds at least HEADER_SIZE + data_len bytes,
    or fewer, which is reported as truncation)."""
    if len(head) < HEADER_SIZE:
        raise _die(path, f"not a libvirt save image (only {len(head)} bytes)")
    magic = head[:16]
    if magic == PARTIAL_MAGIC:
        raise _die(path, "incomplete save image (magic LibvirtQemudPart: the save did not finish)")
    if magic != SAVE_MAGIC:
        raise _die(path, f"not a libvirt save image (magic {magic!r})")
    order = "<"
    fields = struct.unpack_from(order + _FIELDS, head, 16)
    if fields[0] > SAVE_VERSION:  # written on a host of the other byte order?
        swapped = struct.unpack_from(">" + _FIELDS, head, 16)
        if not 0 < swapped[0] <= SAVE_VERSION:
            raise _die(path, f"save image version {fields[0]} is not supported (1..{SAVE_VERSION})")
        order, fields = ">", swapped
    version, data_len, was_running, compressed, cookie_offset = fields[:5]
    if version == 0:
        raise _die(path, "save image version 0 is not supported")
    if compressed:
        name = COMPRESSION_NAMES.get(compressed, f"format {compressed}")
        raise _die(path, f'compressed save image ({name}); save with save_image_format = "raw"')
    if data_len == 0:
        raise _die(path, "invalid header: data_len 0")
    if cookie_offset > data_len:
        raise _die(path, f"invalid header: cookieOffset {cookie_offset} beyond data_len {data_len}")
    end = HEADER_SIZE + data_len
    if len(head) < end:
        raise _die(path, f"truncated: the XML area ends at byte {end}, the file at {len(head)}")
    area = head[HEADER_SIZE:end]
    xml_len = cookie_offset or data_len
    try:
        xml = area[:xml_len].split(b"\0", 1)[0].decode()
        cookie = area[xml_len:].split(b"\0", 1)[0].decode() if cookie_offset else None
    except UnicodeDecodeError as e:
        raise _die(path, f"the domain XML or cookie is not UTF-8 ({e.reason})") from e
    return SaveHeader(version, data_len, bool(was_running), compressed, cookie_offset, xml, cookie, order)


def read_save_header(path: Path) -> SaveHeader:
    """Read and check a save image's header; also checks that a QEMU stream starts after the XML area."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
            if len(head) == HEADER_SIZE and head[:16] == SAVE_MAGIC:
                order = "<" if struct.unpack_from("<I", head, 16)[0] <= SAVE_VERSION else ">"
                version, data_len = struct.unpack_from(order + "II", head, 16)
                if version > SAVE_VERSION:
                    return parse_save_header(head, path)  # raises: unsupported version
                size = os.fstat(f.fileno()).st_size
                if HEADER_SIZE + data_len > size:
                    raise _die(
                        path,
                        f"truncated: the XML area ends at byte {HEADER_SIZE + data_len}, the file at {size}",
                    )
                head += f.read(data_len)
            hdr = parse_save_header(head, path)
            magic = f.read(len(FILE_HEADER))
    except OSError as e:
        raise _die(path, str(e)) from e
    if magic != FILE_HEADER:
        raise _die(path, f"no QEMU migration stream (QEVM v3) at byte {hdr.stream_offset}")
    return hdr


def build_header(xml: str, cookie: str | None, *, was_running: bool, data_len: int | None = None) -> bytes:
    """Header + XML area as libvirt writes it: data_len = XML + cookie (+ NULs) + 64 KiB of padding
    unless a fixed ``data_len`` (an existing image's) is given, which the new XML must fit."""
    xml_raw = xml.encode() + b"\0"
    if b"\0" in xml_raw[:-1] or (cookie is not None and "\0" in cookie):
        raise VmStateError("domain XML or cookie contains a NUL byte")
    cookie_raw = cookie.encode() + b"\0" if cookie is not None else b""
    used = len(xml_raw) + len(cookie_raw)
    if data_len is None:
        data_len = used + XML_PADDING
    elif used > data_len:
        raise VmStateError(f"new XML ({used} bytes with cookie) does not fit data_len {data_len}")
    cookie_offset = len(xml_raw) if cookie is not None else 0
    header = SAVE_MAGIC + struct.pack(
        "<" + _FIELDS, SAVE_VERSION, data_len, int(was_running), 0, cookie_offset, *([0] * 14)
    )
    return header + xml_raw + cookie_raw + bytes(data_len - used)


@dataclass
class SaveImageParts:
    header: SaveHeader
    parts: StreamParts
    ram: dict[str, Path]


def split_save_image(path: Path, out_dir: Path) -> SaveImageParts:
    """Header + XML, stream prefix, flat RAM per block (files in ``out_dir``), device tail."""
    hdr = read_save_header(path)
    with open(path, "rb") as f:
        f.seek(hdr.stream_offset)
        try:
            res: SplitResult = split_stream(f, out_dir)
        except VmStateError as e:
            raise _die(path, f"{e} (the stream starts at file byte {hdr.stream_offset})") from e
    return SaveImageParts(hdr, res.parts, res.ram)


def extract_ram(save_path: Path, out_dir: Path) -> dict[str, Path]:
    """Flat RAM image per RAM block (``pc.ram`` etc.), sparse where zero."""
    return split_save_image(save_path, out_dir).ram


def _tmp_beside(out: Path) -> tuple[BinaryIO, Path]:
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise _die(out, f"cannot create a file beside it: {e}") from e
    return os.fdopen(fd, "w+b"), Path(name)


def write_save_image(
    out: Path,
    xml: str,
    prefix: bytes,
    ram: Mapping[str, Path],
    tail: bytes,
    *,
    was_running: bool,
    cookie: str | None = None,
) -> Path:
    """A canonical save image: header + XML area + prefix + one ram PART with every page once + empty END
    + tail. It is re-parsed and compared with its sources before it appears at ``out`` (written beside it
    and renamed, so a failure leaves nothing behind)."""
    parts = StreamParts.from_prefix(prefix, tail)
    head = build_header(xml, cookie, was_running=was_running)
    f, tmp = _tmp_beside(out)
    try:
        with f:
            f.write(head)
            write_canonical_stream(f, parts, ram)
            f.flush()
            f.seek(0)
            got = parse_save_header(f.read(len(head)), tmp)
            if (got.xml, got.cookie, got.was_running) != (xml, cookie, was_running):
                raise VmStateError(f"{out}: header did not read back as written")
            verify_canonical(f, parts, ram)
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _die(out, f"cannot write the save image: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def replace_xml(path: Path, xml: str, *, out: Path | None = None) -> Path:
    """Replace the domain XML of a save image, keeping cookie, was_running and the stream.

    In place (``out`` None or ``path``) when the new XML fits the existing data_len, as libvirt's
    ``virsh save-image-define`` does: the magic is set to LibvirtQemudPart while the area is rewritten,
    so a crash leaves an image libvirt refuses rather than a mix. Otherwise (or with another ``out``)
    a new image with fresh 64 KiB padding is written beside the target and renamed over it."""
    hdr = read_save_header(path)
    target = out or path
    xml_used = len(xml.encode()) + 1 + (len(hdr.cookie.encode()) + 1 if hdr.cookie is not None else 0)
    if target == path and xml_used <= hdr.data_len:
        area = build_header(xml, hdr.cookie, was_running=hdr.was_running, data_len=hdr.data_len)
        if hdr.byteorder != "<":  # keep the file's byte order
            area = _swap_header(area) + area[HEADER_SIZE:]
        try:
            with open(path, "r+b") as f:
                f.write(PARTIAL_MAGIC)
                f.flush()
                os.fsync(f.fileno())
                f.seek(16)
                f.write(area[16:])
                f.flush()
                os.fsync(f.fileno())
                f.seek(0)
                f.write(SAVE_MAGIC)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise _die(path, f"cannot rewrite the XML: {e}") from e
        return path
    head = build_header(xml, hdr.cookie, was_running=hdr.was_running)
    dst, tmp = _tmp_beside(target)
    try:
        with dst, open(path, "rb") as src:
            dst.write(head)
            src.seek(hdr.stream_offset)
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _die(target, f"cannot write the save image: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _swap_header(area: bytes) -> bytes:
    fields = struct.unpack_from("<" + _FIELDS, area, 16)
    return area[:16] + struct.pack(">" + _FIELDS, *fields)


# ---------------------------------------------------------------------------------------------------------
# A split save image on disk: flat RAM files + the small parts, e.g. for a node's image store.

STATE_FILE: Final = "vmstate.json"
_PREFIX_FILE: Final = "stream-prefix.bin"
_TAIL_FILE: Final = "device-tail.bin"
_XML_FILE: Final = "domain.xml"
_COOKIE_FILE: Final = "cookie.xml"
_STATE_FORMAT: Final = "nephele.vmstate/1"


def _write_atomic(path: Path, data: bytes) -> None:
    f, tmp = _tmp_beside(path)
    try:
        with f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _die(path, f"cannot write: {e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def store_parts(parts: SaveImageParts, directory: Path) -> Path:
    """Write the non-RAM parts of a split image into ``directory``, where its RAM files already are
    (``split_save_image(path, directory)``): domain XML, cookie, stream prefix, device tail, and
    ``vmstate.json`` (written last: its presence means the set is complete)."""
    files: dict[str, str] = {}
    for name, path in parts.ram.items():
        if path.parent.resolve() != directory.resolve():
            raise VmStateError(f"RAM image {path} is not in {directory}")
        files[name] = path.name
    _write_atomic(directory / _XML_FILE, parts.header.xml.encode())
    if parts.header.cookie is not None:
        _write_atomic(directory / _COOKIE_FILE, parts.header.cookie.encode())
    _write_atomic(directory / _PREFIX_FILE, parts.parts.prefix)
    _write_atomic(directory / _TAIL_FILE, parts.parts.tail)
    state = {
        "format": _STATE_FORMAT,
        "was_running": parts.header.was_running,
        "cookie": parts.header.cookie is not None,
        "blocks": [{"name": n, "length": ln, "file": files[n]} for n, ln in parts.parts.blocks.items()],
    }
    _write_atomic(directory / STATE_FILE, json.dumps(state, indent=1).encode())
    return directory / STATE_FILE


def load_parts(directory: Path) -> SaveImageParts:
    """Read what ``store_parts`` wrote; checks that every RAM file is there at its block's length."""
    state_path = directory / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            what = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise VmStateError(f"{state_path}: unknown format {what!r}")
        xml = (directory / _XML_FILE).read_text()
        cookie = (directory / _COOKIE_FILE).read_text() if state["cookie"] else None
        prefix = (directory / _PREFIX_FILE).read_bytes()
        tail = (directory / _TAIL_FILE).read_bytes()
        blocks = [(str(b["name"]), int(b["length"]), str(b["file"])) for b in state["blocks"]]
        was_running = bool(state["was_running"])
    except (OSError, ValueError, KeyError, TypeError, OverflowError) as e:  # OverflowError: int(Infinity)
        raise VmStateError(f"{directory}: not a complete split save image ({e})") from e
    parts = StreamParts.from_prefix(prefix, tail)
    if list(parts.blocks.items()) != [(n, ln) for n, ln, _ in blocks]:
        raise VmStateError(f"{state_path}: RAM blocks do not match the stream prefix")
    ram: dict[str, Path] = {}
    for name, length, file in blocks:
        path = directory / file
        if "/" in file or not path.is_file() or path.stat().st_size != length:
            raise VmStateError(
                f"{directory}: RAM image {file!r} for block {name!r} is missing or not {length} bytes"
            )
        ram[name] = path
    cookie_off = len(xml.encode()) + 1 if cookie is not None else 0
    header = SaveHeader(SAVE_VERSION, 0, was_running, 0, cookie_off, xml, cookie)
    return SaveImageParts(header, parts, ram)


def rebuild_save_image(
    directory: Path, out: Path, *, xml: str | None = None, was_running: bool | None = None
) -> Path:
    """A canonical, verified save image from a stored split image (optionally with a new XML, e.g. a new
    UUID and name for a new instance, or a different was_running)."""
    p = load_parts(directory)
    return write_save_image(
        out,
        p.header.xml if xml is None else xml,
        p.parts.prefix,
        p.ram,
        p.parts.tail,
        was_running=p.header.was_running if was_running is None else was_running,
        cookie=p.header.cookie,
    )
