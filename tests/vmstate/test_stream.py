"""Pure tests of the migration stream parser and writer on hand-built streams."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nephele.errors import VmStateError
from nephele.vmstate import stream as s
from tests.vmstate import streams as b


def parse_all(data: bytes, chunks: list[int] | None = None, **kw: bool) -> list[s.Event]:
    p = s.MigrationStreamParser(**kw)
    out: list[s.Event] = []
    if chunks is None:
        out += p.feed(data)
    else:
        pos = 0
        for n in chunks:
            out += p.feed(data[pos : pos + n])
            pos += n
        out += p.feed(data[pos:])
    out += p.close()
    return out


def page_events(events: list[s.Event]) -> list[tuple[str, str, int, bytes | int, bool]]:
    res: list[tuple[str, str, int, bytes | int, bool]] = []
    for e in events:
        if isinstance(e, s.Page):
            res.append(("page", e.block, e.offset, bytes(e.data), e.cont))
        elif isinstance(e, s.ZeroPage):
            res.append(("zero", e.block, e.offset, e.fill, e.cont))
    return res


@pytest.mark.parametrize("caps", [(), ("x-ignore-shared",)])
def test_every_record_type_round_trips_and_decodes(caps: tuple[str, ...]) -> None:
    data = b.full_stream(caps=caps)
    events = parse_all(data)
    assert s.events_to_bytes(events) == data
    marks = [e for e in events if not isinstance(e, s.Opaque | s.Page | s.ZeroPage)]
    assert marks[0] == s.Config("pc-i440fx-7.2", caps)
    assert [m.name for m in marks if isinstance(m, s.Command)] == ["OPEN_RETURN_PATH", "PING"]
    ram = next(m for m in marks if isinstance(m, s.RamBlocks))
    assert ram.blocks == tuple(b.BLOCKS)
    assert ram.addrs == ((0, 0xFFFC0000, 0xF0000) if caps else None)
    kinds = [
        (type(m).__name__, getattr(m, "kind", None), getattr(m, "iteration", None))
        for m in marks
        if isinstance(m, s.SectionStart | s.SectionEnd)
    ]
    assert kinds == [
        ("SectionStart", s.SEC_START, 0),
        ("SectionEnd", s.SEC_START, 0),
        ("SectionStart", s.SEC_PART, 1),
        ("SectionEnd", s.SEC_PART, 1),
        ("SectionStart", s.SEC_PART, 2),
        ("SectionEnd", s.SEC_PART, 2),
        ("SectionStart", s.SEC_END, 3),
        ("SectionEnd", s.SEC_END, 3),
    ]
    assert marks[-2] == s.DeviceTail("timer")
    assert marks[-1] == s.StreamEnd(True, len(data))
    assert page_events(events) == [
        ("page", "pc.ram", 0, b.pattern(1), False),
        ("zero", "pc.ram", 0x1000, 0, True),
        ("page", "pc.ram", 0x2000, b.pattern(2), True),
        ("zero", "pc.bios", 0, 0, False),
        ("page", "pc.bios", 0x3000, b.pattern(3), True),
        ("page", "pc.bios", 0x1000, b.pattern(4), True),  # CONTINUE persisted across the section boundary
        ("page", "/rom@etc/acpi/rsdp", 0, b.pattern(5), False),
        ("zero", "pc.ram", 0xF000, 0, False),
        ("page", "pc.ram", 0x2000, b.pattern(6), True),
    ]


def test_byte_identical_at_every_split_point_and_in_tiny_chunks() -> None:
    data = b.full_stream()
    for cut in range(len(data) + 1):
        if 200 < cut < len(data) - 400 and cut % 97:  # all of the head and tail, a sample of the middle
            continue
        assert s.events_to_bytes(parse_all(data, [cut])) == data, cut
    assert s.events_to_bytes(parse_all(data, [1] * len(data))) == data
    assert s.events_to_bytes(parse_all(data, [3, 4101, 4104, 8, 9, 1])) == data


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=9000), max_size=12))
def test_byte_identical_for_random_chunkings(chunks: list[int]) -> None:
    data = b.full_stream(caps=("x-ignore-shared",))
    events = parse_all(data, chunks)
    assert s.events_to_bytes(events) == data
    assert page_events(events) == page_events(parse_all(data))


def test_stream_without_footers_vmdesc_or_commands() -> None:
    sid = 2
    data = (
        s.FILE_HEADER
        + b.config()
        + b.start(sid, b.BLOCKS)
        + b.section(s.SEC_PART, sid, [b.page("pc.ram", 0x4000, b.pattern(9))], with_footer=False)
        + b.section(s.SEC_END, sid, [], with_footer=False)
        + b.tail(vmdesc=False)
    )
    with pytest.raises(s.VmStreamError, match="device state"):
        parse_all(data)
    events = parse_all(data, require_vmdesc=False)
    assert s.events_to_bytes(events) == data
    assert events[-1] == s.StreamEnd(False, len(data))
    assert page_events(events) == [("page", "pc.ram", 0x4000, b.pattern(9), False)]


def test_every_truncation_is_a_clean_error_with_an_offset() -> None:
    data = b.full_stream()
    # every length except the inside of page payloads, where a few samples suffice
    inside: set[int] = set()
    pos = 0
    for e in parse_all(data):
        n = len(s.event_bytes(e))
        if isinstance(e, s.Page):
            inside.update(range(pos + n - s.PAGE_SIZE + 2, pos + n - 1))
        pos += n
    lengths = [n for n in range(len(data)) if n not in inside or n % 1000 == 0]
    assert len(lengths) > 500
    for n in lengths:
        p = s.MigrationStreamParser()
        p.feed(data[:n])
        with pytest.raises(s.VmStreamError) as exc:
            p.close()
        err = exc.value
        assert err.truncated, n
        assert err.offset is not None and 0 <= err.offset <= n, (n, err.offset)
        assert f"at stream byte {err.offset}" in str(err)
        assert isinstance(err, VmStateError)


def refuse(data: bytes, match: str, offset: int) -> None:
    with pytest.raises(s.VmStreamError, match=match) as exc:
        parse_all(data)
    assert exc.value.offset == offset, str(exc.value)
    assert not exc.value.truncated


HEAD = s.FILE_HEADER + b.config() + b.start(2, b.BLOCKS)


@pytest.mark.parametrize(
    ("flag", "what"),
    [
        (s.RAM_XBZRLE, "XBZRLE"),
        (s.RAM_HOOK, "RDMA"),
        (s.RAM_COMPRESS_PAGE, "compressed"),
        (s.RAM_MULTIFD_FLUSH, "multifd"),
        (0x400, "unknown RAM record flags 0x400"),
        (s.RAM_PAGE | s.RAM_ZERO, "unknown RAM record flags 0xa"),
    ],
)
def test_unsupported_ram_flags_are_refused_at_their_offset(flag: int, what: str) -> None:
    rec = b.be64(0x1000 | flag) + bytes(64)
    data = HEAD + bytes((s.SEC_PART,)) + b.be32(2) + b.page("pc.ram", 0, b.pattern(1)) + rec
    refuse(data, what, len(HEAD) + 5 + len(b.page("pc.ram", 0, b.pattern(1))))


def test_other_refusals() -> None:
    part = bytes((s.SEC_PART,)) + b.be32(2)
    refuse(b"QEVX" + bytes(8), "not a QEMU migration stream", 0)
    refuse(b.be32(s.QEVM_MAGIC) + b.be32(2), "version 2", 4)
    refuse(
        s.FILE_HEADER + b.config() + bytes((s.SEC_START,)) + b.be32(3) + b.s8("block") + bytes(8) + bytes(9),
        "iterable section 'block'",
        8 + len(b.config()),
    )
    refuse(s.FILE_HEADER + b.config() + b.command(3, bytes(16)), "POSTCOPY_ADVISE", 8 + len(b.config()))
    refuse(s.FILE_HEADER + b.config() + b.command(8, b.be32(100)), "PACKAGED", 8 + len(b.config()))
    refuse(s.FILE_HEADER + b.config() + b.command(s.CMD_PING, b"\0\0"), "length 2", 8 + len(b.config()))
    bad_sub = bytes((s.SEC_CONFIGURATION,)) + b.be32(3) + b"abc" + bytes((s.SEC_SUBSECTION,)) + b.s8("x/y")
    refuse(s.FILE_HEADER + bad_sub + bytes(8), "unknown configuration subsection 'x/y'", 8 + 8)
    refuse(HEAD + part + b.page(None, 0, b.pattern(1)), "CONTINUE page record with no current", len(HEAD) + 5)
    refuse(HEAD + part + b.zero("vga.vram", 0), "unknown RAM block 'vga.vram'", len(HEAD) + 5)
    refuse(HEAD + part + b.zero("pc.bios", 4 * 4096), "beyond RAM block 'pc.bios'", len(HEAD) + 5)
    refuse(HEAD + part + b.eos() + b.footer(7), "footer for id 7", len(HEAD) + 13)
    refuse(HEAD + bytes((s.SEC_PART,)) + b.be32(9), "unknown section id 9", len(HEAD))
    empty = len(b.section(s.SEC_PART, 2, []))
    refuse(HEAD + b.section(s.SEC_PART, 2, []) + b.tail(), "before the ram END", len(HEAD) + empty)
    refuse(HEAD + bytes((0x42,)), "unknown section type 0x42", len(HEAD))
    done = HEAD + b.section(s.SEC_END, 2, []) + b.tail()
    refuse(done + b"junk", "4 unexpected bytes after the end", len(done))
    refuse(
        HEAD + b.section(s.SEC_END, 2, []) + b.section(s.SEC_PART, 2, []),
        "after the ram END",
        len(HEAD) + empty,
    )


def test_writer_passes_events_through_and_guards_continue() -> None:
    data = b.full_stream()
    out = io.BytesIO()
    w = s.MigrationStreamWriter(out, bufsize=1000)
    w.write_all(parse_all(data))
    w.flush()
    assert out.getvalue() == data
    assert w.bytes_written == len(data)

    w = s.MigrationStreamWriter(io.BytesIO())
    w.write(s.Page("pc.ram", 0, b.pattern(1), False))
    with pytest.raises(VmStateError, match=r"CONTINUE record for block 'pc\.bios'"):
        w.write(s.ZeroPage("pc.bios", 0, 0, True))
    with pytest.raises(VmStateError, match="payload of 10 bytes"):
        w.write(s.Page("pc.ram", 0, bytes(10), True))


def test_writer_pages_from_another_source_rebuild_the_same_stream() -> None:
    """What the destination proxy does: opaque bytes as received, page payloads from elsewhere."""
    data = b.full_stream()
    events = parse_all(data)
    store = {(e.block, e.offset): bytes(e.data) for e in events if isinstance(e, s.Page)}
    chunks: list[bytes] = []
    w = s.MigrationStreamWriter(chunks.append)
    for e in events:
        if isinstance(e, s.Page):
            e = s.Page(
                e.block, e.offset, store[(e.block, e.offset)] if e.offset != 0x2000 else bytes(e.data), e.cont
            )
        w.write(e)
    w.flush()
    assert b"".join(chunks) == data


def test_canonical_page_helper_uses_zero_and_continue() -> None:
    chunks: list[bytes] = []
    w = s.MigrationStreamWriter(chunks.append)
    w.page("pc.ram", 0, bytes(4096))
    w.page("pc.ram", 4096, b.pattern(1))
    w.page("pc.bios", 0, b.pattern(2))
    w.zero_page("pc.bios", 4096)
    w.flush()
    assert b"".join(chunks) == (
        b.zero("pc.ram", 0)
        + b.page(None, 4096, b.pattern(1))
        + b.page("pc.bios", 0, b.pattern(2))
        + b.zero(None, 4096)
    )


def test_iter_events_reads_a_file_and_rejects_trailing_bytes() -> None:
    data = b.full_stream()
    assert s.events_to_bytes(s.iter_events(io.BytesIO(data), chunk_size=777)) == data
    with pytest.raises(s.VmStreamError, match="unexpected bytes after the end"):
        list(s.iter_events(io.BytesIO(data + b"x"), chunk_size=len(data)))


def test_random_garbage_never_escapes_as_another_exception() -> None:
    rng = random.Random(5)
    data = b.full_stream()
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        try:
            events = parse_all(bytes(mutated))
        except s.VmStreamError:
            continue
        assert s.events_to_bytes(events) == bytes(mutated)


def test_a_refused_stream_stays_refused() -> None:
    data = b.full_stream()
    p = s.MigrationStreamParser()
    p.feed(data[:100])
    with pytest.raises(s.VmStreamError) as first:
        p.close()
    with pytest.raises(s.VmStreamError) as again:
        p.close()
    assert again.value is first.value
    p = s.MigrationStreamParser()
    with pytest.raises(s.VmStreamError, match="unknown section type") as bad:
        p.feed(s.FILE_HEADER + b"\x42" + bytes(10))
    with pytest.raises(s.VmStreamError) as later:
        p.feed(b"\x00")
    assert later.value is bad.value


def test_pages_do_not_change_when_the_callers_buffer_is_reused() -> None:
    data = b.full_stream()
    buf = bytearray(data)
    p = s.MigrationStreamParser()
    events = p.feed(buf) + p.feed(memoryview(b""))
    buf[:] = bytes(len(buf))  # a recv_into buffer being reused
    events += p.close()
    assert s.events_to_bytes(events) == data
