"""The header of a libvirt QEMU save image, just enough to give a captured memory state a new identity.

libvirt refuses to restore a save image under another UUID (its ABI check compares them), and every
instance needs its own UUID; the original tool rewrote the XML in the header for the same reason. The
layout (libvirt qemu_saveimage.h, version 2, native endian):

    magic "LibvirtQemudSave" | u32 version, data_len, was_running, compressed, cookieOffset | u32 unused[14]
    data_len bytes: domain XML, NUL, <cookie> XML, NUL, NUL padding
    the QEMU migration stream

Parsing the stream itself (pages, device state) is nephele.vmstate's job; this only touches the header.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from nephele.errors import InvalidInput

MAGIC = b"LibvirtQemudSave"
HEADER = struct.Struct("=16s5I56s")
SUPPORTED_VERSIONS = (2,)


@dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    cookie_offset: int
    xml: str
    cookie: bytes  # NUL-terminated cookie XML, kept byte for byte

    @property
    def stream_offset(self) -> int:
        return HEADER.size + self.data_len


def read_header(path: Path) -> SaveHeader:
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
        if len(raw) < HEADER.size:
            raise InvalidInput(f"{path}: too short for a libvirt save image")
        magic, version, data_len, was_running, compressed, cookie_off, _ = HEADER.unpack(raw)
        if magic != MAGIC:
            raise InvalidInput(f"{path}: not a libvirt save image (magic {magic[:16]!r})")
        if version not in SUPPORTED_VERSIONS:
            raise InvalidInput(f"{path}: libvirt save image version {version} is not supported")
        data = f.read(data_len)
    if len(data) < data_len or not 0 < cookie_off <= data_len:
        raise InvalidInput(f"{path}: truncated or inconsistent libvirt save header")
    xml = data[: cookie_off - 1].split(b"\0", 1)[0].decode()
    end = data.find(b"\0", cookie_off)
    cookie = data[cookie_off : (end if end >= 0 else data_len)] + b"\0"
    return SaveHeader(version, data_len, was_running, compressed, cookie_off, xml, cookie)


def copy_with_xml(src: Path, dst: Path, xml: str) -> None:
    """Copy a save image to `dst` with its domain XML replaced. The data area keeps its size when the
    new XML fits (it is padded generously), so the stream is copied unchanged at the same offset."""
    hdr = read_header(src)
    body = xml.encode() + b"\0"
    data = body + hdr.cookie
    data_len = max(hdr.data_len, len(data))
    header = HEADER.pack(MAGIC, hdr.version, data_len, hdr.was_running, hdr.compressed, len(body), bytes(56))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(header)
        fout.write(data.ljust(data_len, b"\0"))
        fin.seek(hdr.stream_offset)
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
