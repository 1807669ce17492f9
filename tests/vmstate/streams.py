"""Hand-built QEMU 7.2 migration streams for the pure tests (layout: docs/vmstate.md)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Sequence

from nephele.vmstate import stream as s


def be16(v: int) -> bytes:
    return struct.pack(">H", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


def s8(name: str) -> bytes:
    raw = name.encode()
    return bytes((len(raw),)) + raw


def config(
    machine: str = "pc-i440fx-7.2", caps: Sequence[str] = (), *, uuid: bool = False, page_bits: bool = False
) -> bytes:
    out = bytes((s.SEC_CONFIGURATION,)) + be32(len(machine)) + machine.encode()
    if page_bits:
        out += bytes((s.SEC_SUBSECTION,)) + s8("configuration/target-page-bits") + be32(1) + be32(12)
    if caps:
        out += bytes((s.SEC_SUBSECTION,)) + s8("configuration/capabilities") + be32(1) + be32(len(caps))
        out += b"".join(s8(c) for c in caps)
    if uuid:
        out += bytes((s.SEC_SUBSECTION,)) + s8("configuration/uuid") + be32(1) + bytes(range(16))
    return out


def command(cmd: int, data: bytes = b"") -> bytes:
    return bytes((s.SEC_COMMAND,)) + be16(cmd) + be16(len(data)) + data


def footer(sid: int) -> bytes:
    return bytes((s.SEC_FOOTER,)) + be32(sid)


def eos() -> bytes:
    return be64(s.RAM_EOS)


def start(sid: int, blocks: Sequence[tuple[str, int]], addrs: Sequence[int] | None = None) -> bytes:
    out = bytes((s.SEC_START,)) + be32(sid) + s8("ram") + be32(0) + be32(4)
    out += be64(sum(n for _, n in blocks) | s.RAM_MEM_SIZE)
    for i, (name, used) in enumerate(blocks):
        out += s8(name) + be64(used)
        if addrs is not None:
            out += be64(addrs[i])
    return out + eos() + footer(sid)


def page(block: str | None, offset: int, data: bytes) -> bytes:
    assert len(data) == s.PAGE_SIZE
    if block is None:
        return be64(offset | s.RAM_PAGE | s.RAM_CONTINUE) + data
    return be64(offset | s.RAM_PAGE) + s8(block) + data


def zero(block: str | None, offset: int, fill: int = 0) -> bytes:
    if block is None:
        return be64(offset | s.RAM_ZERO | s.RAM_CONTINUE) + bytes((fill,))
    return be64(offset | s.RAM_ZERO) + s8(block) + bytes((fill,))


def section(kind: int, sid: int, records: Iterable[bytes], *, with_footer: bool = True) -> bytes:
    out = bytes((kind,)) + be32(sid) + b"".join(records) + eos()
    return out + (footer(sid) if with_footer else b"")


VMDESC = {
    "page_size": 4096,
    "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": []}],
}


def tail(
    sid: int = 3, device_bytes: bytes = b"\x00\x01\x02\x03timerstate\x7e\x00\x06", *, vmdesc: bool = True
) -> bytes:
    out = bytes((s.SEC_FULL,)) + be32(sid) + s8("timer") + be32(0) + be32(2) + device_bytes + footer(sid)
    out += bytes((s.SEC_EOF,))
    if vmdesc:
        desc = json.dumps(VMDESC).encode()
        out += bytes((s.SEC_VMDESCRIPTION,)) + be32(len(desc)) + desc
    return out


def pattern(seed: int) -> bytes:
    return bytes((seed * 7 + i) & 0xFF for i in range(s.PAGE_SIZE))


BLOCKS = [("pc.ram", 16 * s.PAGE_SIZE), ("pc.bios", 4 * s.PAGE_SIZE), ("/rom@etc/acpi/rsdp", s.PAGE_SIZE)]


def full_stream(*, caps: Sequence[str] = (), commands: bool = True, vmdesc: bool = True) -> bytes:
    """Every record type: header, config (+subsections), commands, START/MEM_SIZE, PART sections with
    pages, zero pages, CONTINUE (also one at the start of a section, continuing the previous section's
    block), an empty END, the device tail, EOF and VMDESCRIPTION."""
    sid = 2
    addrs = [0, 0xFFFC0000, 0xF0000] if "x-ignore-shared" in caps else None
    out = s.FILE_HEADER + config(caps=caps, uuid=True, page_bits=True)
    if commands:
        out += command(s.CMD_OPEN_RETURN_PATH) + command(s.CMD_PING, be32(1))
    out += start(sid, BLOCKS, addrs)
    out += section(
        s.SEC_PART,
        sid,
        [
            page("pc.ram", 0, pattern(1)),
            zero(None, 0x1000),
            page(None, 0x2000, pattern(2)),
            zero("pc.bios", 0),
            page(None, 0x3000, pattern(3)),
        ],
    )
    out += section(
        s.SEC_PART,
        sid,
        [
            page(None, 0x1000, pattern(4)),  # CONTINUE across sections: still pc.bios
            page("/rom@etc/acpi/rsdp", 0, pattern(5)),
            zero("pc.ram", 0xF000, 0),
            page(None, 0x2000, pattern(6)),  # re-sent page (dirtied again)
        ],
    )
    out += section(s.SEC_END, sid, [])
    return out + tail(vmdesc=vmdesc)


def complete_stream(*, commands: bool = False) -> tuple[bytes, dict[str, bytes]]:
    """A stream that carries every page of BLOCKS (iteration 1), then re-sends some (iteration 2: a data
    page becomes zero, a zero page gets data, a CONTINUE opens the section); returns the stream and the
    final content of each block."""
    sid = 2
    final = {name: bytearray(n) for name, n in BLOCKS}
    recs1: list[bytes] = []
    for name, n in BLOCKS:
        for i in range(n // s.PAGE_SIZE):
            off = i * s.PAGE_SIZE
            data = pattern(i + len(name)) if i % 3 != 1 else bytes(s.PAGE_SIZE)
            cont = None if i else name
            recs1.append(page(cont, off, data) if any(data) else zero(cont, off))
            final[name][off : off + s.PAGE_SIZE] = data
    # iteration 2 starts with CONTINUE: the current block is still the last one of iteration 1
    last = BLOCKS[-1][0]
    recs2 = [
        page(None, 0, pattern(77)),
        zero("pc.ram", 0),  # data page zeroed since
        page(None, 4 * s.PAGE_SIZE, pattern(78)),  # page 4 had data
        page(None, 1 * s.PAGE_SIZE, pattern(79)),  # page 1 was zero
    ]
    final[last][0 : s.PAGE_SIZE] = pattern(77)
    final["pc.ram"][0 : s.PAGE_SIZE] = bytes(s.PAGE_SIZE)
    final["pc.ram"][4 * s.PAGE_SIZE : 5 * s.PAGE_SIZE] = pattern(78)
    final["pc.ram"][1 * s.PAGE_SIZE : 2 * s.PAGE_SIZE] = pattern(79)
    out = s.FILE_HEADER + config()
    if commands:
        out += command(s.CMD_OPEN_RETURN_PATH) + command(s.CMD_PING, be32(1))
    out += start(sid, BLOCKS) + section(s.SEC_PART, sid, recs1) + section(s.SEC_PART, sid, recs2)
    out += section(s.SEC_END, sid, []) + tail()
    return out, {k: bytes(v) for k, v in final.items()}
