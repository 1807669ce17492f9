"""Split a stream into prefix / flat RAM / tail, rebuild it canonically, verify the rebuild."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nephele.errors import VmStateError
from nephele.vmstate import image
from nephele.vmstate import stream as s
from tests.vmstate import streams as b


def split(data: bytes, out: Path, **kw: bool) -> image.SplitResult:
    return image.split_stream(io.BytesIO(data), out, **kw)


def test_split_writes_final_page_contents_to_sparse_flat_files(tmp_path: Path) -> None:
    data, final = b.complete_stream(commands=True)
    res = split(data, tmp_path / "ram")
    assert set(res.ram) == set(final)
    for name, content in final.items():
        assert res.ram[name].read_bytes() == content, name
        assert res.ram[name].name == image.block_filename(name)
        assert "/" not in res.ram[name].name
    p = res.parts
    assert p.blocks == dict(b.BLOCKS)
    assert p.section_id == 2
    assert p.iterations == 3
    assert [c.name for c in p.commands] == ["OPEN_RETURN_PATH", "PING"]
    assert p.prefix == data[: len(p.prefix)]
    assert p.prefix.endswith(b.start(2, b.BLOCKS))
    assert p.tail == b.tail()
    assert data.endswith(p.tail)


def test_split_refuses_a_stream_that_does_not_carry_every_page(tmp_path: Path) -> None:
    data = b.full_stream()
    with pytest.raises(VmStateError, match=r"does not carry every RAM page \(pc\.ram: 12 pages"):
        split(data, tmp_path / "a")
    res = split(data, tmp_path / "b", allow_missing=True)
    assert res.missing == {"pc.ram": 12, "pc.bios": 1}
    assert res.ram["pc.ram"].read_bytes()[0x2000:0x3000] == b.pattern(6)


def test_canonical_rebuild_has_every_page_once_and_verifies(tmp_path: Path) -> None:
    data, final = b.complete_stream(commands=True)
    res = split(data, tmp_path / "ram")
    out = io.BytesIO()
    n = image.write_canonical_stream(out, res.parts, res.ram)
    rebuilt = out.getvalue()
    assert n == len(rebuilt)
    image.verify_canonical(io.BytesIO(rebuilt), res.parts, res.ram)
    events = list(s.iter_events(io.BytesIO(rebuilt)))
    starts = [e for e in events if isinstance(e, s.SectionStart)]
    assert [e.kind for e in starts] == [s.SEC_START, s.SEC_PART, s.SEC_END]
    pages = [e for e in events if isinstance(e, s.Page | s.ZeroPage)]
    assert len(pages) == sum(n for _, n in b.BLOCKS) // s.PAGE_SIZE
    firsts = {}
    for e in pages:
        firsts.setdefault(e.block, e)
        content = final[e.block][e.offset : e.offset + s.PAGE_SIZE]
        if isinstance(e, s.Page):
            assert bytes(e.data) == content and any(content)
        else:
            assert not any(content)
        assert e.cont == (firsts[e.block] is not e)
    assert [e.block for e in firsts.values()] == [n for n, _ in b.BLOCKS]  # MEM_SIZE order
    assert rebuilt.startswith(res.parts.prefix) and rebuilt.endswith(res.parts.tail)
    # split of the rebuild gives the same RAM
    again = split(rebuilt, tmp_path / "again")
    for name in final:
        assert again.ram[name].read_bytes() == final[name]


def test_verify_catches_the_dropped_device_header_and_changed_pages(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    res = split(data, tmp_path / "ram")
    out = io.BytesIO()
    image.write_canonical_stream(out, res.parts, res.ram)
    good = out.getvalue()
    # the LIVE-HANDOFF (C) gotcha: the first device section's header lost. Parses, but must not verify.
    tail_at = len(good) - len(res.parts.tail)
    hdr_len = 1 + 4 + 1 + len("timer") + 8
    with pytest.raises(VmStateError):
        image.verify_canonical(io.BytesIO(good[:tail_at] + good[tail_at + hdr_len :]), res.parts, res.ram)
    # a page byte changed in the stream
    bad = bytearray(good)
    bad[len(res.parts.prefix) + 5 + 8 + 1 + len("pc.ram") + 100] ^= 1
    with pytest.raises(VmStateError, match=r"page pc\.ram@0x1000 differs"):
        image.verify_canonical(io.BytesIO(bytes(bad)), res.parts, res.ram)
    # the source file changed after the build
    with open(res.ram["pc.bios"], "r+b") as f:
        f.seek(4096 * 3 + 7)
        f.write(b"\xff")
    with pytest.raises(VmStateError, match=r"pc\.bios@0x3000 differs"):
        image.verify_canonical(io.BytesIO(good), res.parts, res.ram)


def test_verify_catches_duplicate_and_missing_pages(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    res = split(data, tmp_path / "ram")
    # every page once, then one page again with the same content
    chunks: list[bytes] = []
    w = s.MigrationStreamWriter(chunks.append)
    w.raw(res.parts.prefix)
    w.begin_section(s.SEC_PART, 2)
    for name, n in b.BLOCKS:
        content = res.ram[name].read_bytes()
        for off in range(0, n, s.PAGE_SIZE):
            w.page(name, off, content[off : off + s.PAGE_SIZE])
    w.page("pc.ram", 0x2000, res.ram["pc.ram"].read_bytes()[0x2000:0x3000])
    w.end_section(2)
    w.begin_section(s.SEC_END, 2)
    w.end_section(2)
    w.raw(res.parts.tail)
    w.flush()
    with pytest.raises(VmStateError, match=r"pc\.ram@0x2000 appears twice"):
        image.verify_canonical(io.BytesIO(b"".join(chunks)), res.parts, res.ram)
    partial = s.FILE_HEADER + b.config() + b.start(2, b.BLOCKS) + b.section(s.SEC_END, 2, []) + b.tail()
    with pytest.raises(VmStateError, match="lacks 16 pages"):
        image.verify_canonical(io.BytesIO(partial), res.parts, res.ram)


def test_rebuild_refuses_sources_that_do_not_match_the_blocks(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    res = split(data, tmp_path / "ram")
    with pytest.raises(VmStateError, match="do not match the stream's RAM blocks"):
        image.write_canonical_stream(io.BytesIO(), res.parts, {"pc.ram": res.ram["pc.ram"]})
    with open(res.ram["pc.bios"], "ab") as f:
        f.write(b"x")
    with pytest.raises(VmStateError, match=r"is 16385 bytes; block 'pc\.bios' is 16384"):
        image.write_canonical_stream(io.BytesIO(), res.parts, res.ram)


def test_parts_from_prefix(tmp_path: Path) -> None:
    data, _ = b.complete_stream(commands=True)
    res = split(data, tmp_path / "ram")
    parts = image.StreamParts.from_prefix(res.parts.prefix, res.parts.tail)
    assert (parts.section_id, parts.blocks, parts.config, parts.commands) == (
        res.parts.section_id,
        res.parts.blocks,
        res.parts.config,
        res.parts.commands,
    )
    with pytest.raises(VmStateError, match="does not end after a complete ram START"):
        image.StreamParts.from_prefix(res.parts.prefix[:-3], b"")
    with pytest.raises(VmStateError):
        image.StreamParts.from_prefix(data[: len(res.parts.prefix) + 40], b"")


def test_large_block_rebuild_uses_zero_runs(tmp_path: Path) -> None:
    """Blocks bigger than one read chunk, with long zero runs and data at chunk edges."""
    n_pages = 2 * 1024 + 5
    ram = bytearray(n_pages * s.PAGE_SIZE)
    for i in (0, 1, 1023, 1024, 1500, n_pages - 1):
        ram[i * s.PAGE_SIZE + 9] = i % 251 + 1
    blocks = [("pc.ram", len(ram))]
    recs = [
        b.page(
            "pc.ram" if i == 0 else None, i * s.PAGE_SIZE, bytes(ram[i * s.PAGE_SIZE : (i + 1) * s.PAGE_SIZE])
        )
        if any(ram[i * s.PAGE_SIZE : (i + 1) * s.PAGE_SIZE])
        else b.zero("pc.ram" if i == 0 else None, i * s.PAGE_SIZE)
        for i in range(n_pages)
    ]
    data = (
        s.FILE_HEADER
        + b.config()
        + b.start(2, blocks)
        + b.section(s.SEC_PART, 2, recs)
        + b.section(s.SEC_END, 2, [])
        + b.tail()
    )
    res = split(data, tmp_path / "ram")
    assert res.ram["pc.ram"].read_bytes() == bytes(ram)
    assert res.ram["pc.ram"].stat().st_blocks * 512 < len(ram) // 4  # sparse
    out = io.BytesIO()
    image.write_canonical_stream(out, res.parts, res.ram)
    assert out.getvalue() == data  # QEMU's own order and records: the canonical form of a one-pass stream


def test_strip_ignore_shared(tmp_path: Path) -> None:
    addrs = [0, 0xFFFC0000, 0xF0000]
    cmds = b.command(s.CMD_OPEN_RETURN_PATH) + b.command(s.CMD_PING, b.be32(1))
    body = (
        b.section(s.SEC_PART, 2, [b.page("pc.bios", 0, b.pattern(1))])
        + b.section(s.SEC_END, 2, [])
        + b.tail()
    )
    data = s.FILE_HEADER + b.config(caps=["x-ignore-shared"]) + cmds + b.start(2, b.BLOCKS, addrs) + body
    res = split(data, tmp_path / "ram", allow_missing=True)
    assert res.parts.config.capabilities == ("x-ignore-shared",)
    stripped = image.strip_ignore_shared(res.parts)
    assert stripped.prefix == s.FILE_HEADER + b.config() + cmds + b.start(2, b.BLOCKS)
    assert stripped.config.capabilities == ()
    assert (stripped.blocks, stripped.tail, stripped.commands) == (
        res.parts.blocks,
        res.parts.tail,
        res.parts.commands,
    )
    assert image.strip_ignore_shared(stripped) is stripped
    odd = s.FILE_HEADER + b.config(caps=["x-ignore-shared"], uuid=True) + b.start(2, b.BLOCKS, addrs) + body
    res = split(odd, tmp_path / "odd", allow_missing=True)
    with pytest.raises(VmStateError, match="subsections other than capabilities"):
        image.strip_ignore_shared(res.parts)


def test_failed_split_leaves_no_files(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    out = tmp_path / "ram"
    with pytest.raises(s.VmStreamError, match="device state"):
        split(data[:-10], out)
    assert list(out.iterdir()) == []
    with pytest.raises(VmStateError, match="does not carry every RAM page"):
        split(b.full_stream(), out)
    assert list(out.iterdir()) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_streams_split_and_rebuild_to_the_model(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    """Random iterations of random page records (data, zero, re-sent, CONTINUE wherever QEMU could use
    it): the split RAM equals a model of the last write to each page, and the canonical rebuild of it
    verifies, re-splits to the same RAM and round-trips through the parser."""
    tmp = tmp_path_factory.mktemp("prop")
    blocks = [("pc.ram", 8 * s.PAGE_SIZE), ("pc.bios", 2 * s.PAGE_SIZE), ("x", s.PAGE_SIZE)]
    model = {name: bytearray(n) for name, n in blocks}
    current: str | None = None
    sections = []
    # the first iteration sends every page once, as QEMU's bulk stage does
    first = [(name, i) for name, n in blocks for i in range(n // s.PAGE_SIZE)]
    later = [
        data.draw(st.lists(st.sampled_from(first), max_size=12)) for _ in range(data.draw(st.integers(0, 3)))
    ]
    for it in [first, *later]:
        recs = []
        for name, i in it:
            kind = data.draw(st.sampled_from(["zero", "data", "fill"]))
            content = {
                "zero": bytes(s.PAGE_SIZE),
                "fill": bytes([7]) * s.PAGE_SIZE,
                "data": b.pattern(data.draw(st.integers(0, 255))),
            }[kind]
            cont = name == current and data.draw(st.booleans())
            ref = None if cont else name
            recs.append(
                b.zero(ref, i * s.PAGE_SIZE, 7 if kind == "fill" else 0)
                if kind != "data"
                else b.page(ref, i * s.PAGE_SIZE, content)
            )
            model[name][i * s.PAGE_SIZE : (i + 1) * s.PAGE_SIZE] = content
            current = name
        sections.append(b.section(s.SEC_PART, 2, recs))
    stream = (
        s.FILE_HEADER
        + b.config()
        + b.start(2, blocks)
        + b"".join(sections)
        + b.section(s.SEC_END, 2, [])
        + b.tail()
    )
    res = split(stream, tmp / "ram")
    for name, content in model.items():
        assert res.ram[name].read_bytes() == bytes(content)
    out = io.BytesIO()
    image.write_canonical_stream(out, res.parts, res.ram)
    rebuilt = out.getvalue()
    image.verify_canonical(io.BytesIO(rebuilt), res.parts, res.ram)
    assert s.events_to_bytes(s.iter_events(io.BytesIO(rebuilt), chunk_size=333)) == rebuilt
    again = split(rebuilt, tmp / "again")
    for name, content in model.items():
        assert again.ram[name].read_bytes() == bytes(content)


def test_read_error_mid_stream_is_clear_and_leaves_no_files(tmp_path: Path) -> None:
    data, _ = b.complete_stream()

    class Failing(io.BytesIO):
        def read(self, n: int | None = -1) -> bytes:
            if self.tell() > 20_000:
                raise OSError(5, "Input/output error")
            return super().read(min(n or 4096, 4096))

    out = tmp_path / "ram"
    with pytest.raises(VmStateError, match=r"splitting the stream into .*Input/output error"):
        image.split_stream(Failing(data), out)
    assert list(out.iterdir()) == []
