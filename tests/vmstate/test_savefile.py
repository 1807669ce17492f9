"""libvirt save image: the header layout of ENVIRONMENT.md §3, split, canonical write, XML replacement."""

from __future__ import annotations

import contextlib
import resource
import signal
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephele.errors import VmStateError
from nephele.vmstate import savefile as sf
from tests.vmstate import streams as b

XML = "<domain type='qemu'><name>tiny</name><memory unit='KiB'>65536</memory></domain>"
COOKIE = "<cookie><cpu mode='custom'><model>qemu64</model></cpu></cookie>"


def image_bytes(
    stream: bytes,
    *,
    xml: str = XML,
    cookie: str | None = COOKIE,
    was_running: int = 1,
    compressed: int = 0,
    magic: bytes = b"LibvirtQemudSave",
    order: str = "<",
    version: int = 2,
    pad: int = 1000,
) -> bytes:
    """Written independently of the module: 16-byte magic, then version, data_len, was_running,
    compressed, cookieOffset and 14 unused u32 in native order, then XML NUL cookie NUL padding."""
    area = xml.encode() + b"\0" + (cookie.encode() + b"\0" if cookie else b"") + bytes(pad)
    cookie_off = len(xml) + 1 if cookie else 0
    fields = struct.pack(order + "19I", version, len(area), was_running, compressed, cookie_off, *([0] * 14))
    head = magic + fields
    assert len(head) == 92
    return head + area + stream


def test_header_layout(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    img = tmp_path / "x.save"
    img.write_bytes(image_bytes(data))
    h = sf.read_save_header(img)
    assert (h.version, h.was_running, h.compressed, h.xml, h.cookie) == (2, True, 0, XML, COOKIE)
    assert h.data_len == len(XML) + 1 + len(COOKIE) + 1 + 1000
    assert h.cookie_offset == len(XML) + 1
    assert h.stream_offset == 92 + h.data_len
    assert img.read_bytes()[h.stream_offset : h.stream_offset + 4] == b"QEVM"
    img.write_bytes(image_bytes(data, cookie=None, was_running=0, order=">"))
    h = sf.read_save_header(img)
    assert (h.byteorder, h.cookie, h.was_running, h.cookie_offset) == (">", None, False, 0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"magic": b"LibvirtQemudPart"}, "incomplete save image"),
        ({"magic": b"NotLibvirtAtAll!"}, "not a libvirt save image"),
        ({"compressed": 1}, r"compressed save image \(gzip\)"),
        ({"compressed": 3}, r"compressed save image \(xz\)"),
        ({"version": 3}, "version 3 is not supported"),
    ],
)
def test_header_refusals(tmp_path: Path, kw: dict[str, object], message: str) -> None:
    img = tmp_path / "x.save"
    img.write_bytes(image_bytes(b.complete_stream()[0], **kw))  # type: ignore[arg-type]
    with pytest.raises(VmStateError, match=message):
        sf.read_save_header(img)


def test_truncated_or_streamless_images(tmp_path: Path) -> None:
    img = tmp_path / "x.save"
    full = image_bytes(b.complete_stream()[0])
    img.write_bytes(full[:50])
    with pytest.raises(VmStateError, match="only 50 bytes"):
        sf.read_save_header(img)
    img.write_bytes(full[:300])
    with pytest.raises(VmStateError, match="truncated: the XML area ends at byte"):
        sf.read_save_header(img)
    img.write_bytes(image_bytes(b"QEMU" + bytes(20)))
    with pytest.raises(VmStateError, match="no QEMU migration stream"):
        sf.read_save_header(img)
    data = b.complete_stream()[0]
    img.write_bytes(image_bytes(data[:-100]))
    with pytest.raises(VmStateError, match="device state") as exc:
        sf.split_save_image(img, tmp_path / "parts")
    assert str(img) in str(exc.value) and "the stream starts at file byte" in str(exc.value)


def test_split_and_canonical_write_round_trip(tmp_path: Path) -> None:
    data, final = b.complete_stream()
    img = tmp_path / "in.save"
    img.write_bytes(image_bytes(data))
    parts = sf.split_save_image(img, tmp_path / "ram")
    assert sf.extract_ram(img, tmp_path / "ram2").keys() == final.keys()
    for name, content in final.items():
        assert parts.ram[name].read_bytes() == content
    out = sf.write_save_image(
        tmp_path / "out.save",
        parts.header.xml,
        parts.parts.prefix,
        parts.ram,
        parts.parts.tail,
        was_running=False,
        cookie=parts.header.cookie,
    )
    h = sf.read_save_header(out)
    assert (h.xml, h.cookie, h.was_running) == (XML, COOKIE, False)
    assert h.data_len == len(XML) + 1 + len(COOKIE) + 1 + 64 * 1024  # libvirt's padding rule
    again = sf.split_save_image(out, tmp_path / "ram3")
    assert again.parts.prefix == parts.parts.prefix and again.parts.tail == parts.parts.tail
    for name, content in final.items():
        assert again.ram[name].read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.save", "out.save", "ram", "ram2", "ram3"]


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    img = tmp_path / "in.save"
    img.write_bytes(image_bytes(data))
    parts = sf.split_save_image(img, tmp_path / "ram")
    with open(parts.ram["pc.ram"], "r+b") as f:
        f.truncate(4096)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(VmStateError, match="is 4096 bytes"):
        sf.write_save_image(
            out_dir / "x.save", XML, parts.parts.prefix, parts.ram, parts.parts.tail, was_running=True
        )
    assert list(out_dir.iterdir()) == []
    with pytest.raises(VmStateError, match="does not end after a complete ram START"):
        sf.write_save_image(out_dir / "x.save", XML, b"QEVM", parts.ram, parts.parts.tail, was_running=True)
    assert list(out_dir.iterdir()) == []


def test_replace_xml_in_place_and_growing(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    img = tmp_path / "x.save"
    img.write_bytes(image_bytes(data, pad=200))
    size = img.stat().st_size
    old = sf.read_save_header(img)
    new_xml = XML.replace("tiny", "tiny-2")
    assert sf.replace_xml(img, new_xml) == img
    h = sf.read_save_header(img)
    assert (h.xml, h.cookie, h.data_len, h.was_running) == (new_xml, COOKIE, old.data_len, True)
    assert img.stat().st_size == size
    assert img.read_bytes()[h.stream_offset :] == data
    # too big for the area: rewritten with fresh padding, stream carried over
    big = XML.replace("tiny", "t" * 500)
    sf.replace_xml(img, big)
    h = sf.read_save_header(img)
    assert h.xml == big and h.cookie == COOKIE
    assert h.data_len == len(big) + 1 + len(COOKIE) + 1 + 64 * 1024
    assert img.read_bytes()[h.stream_offset :] == data
    # to another file: the source stays as it is
    other = sf.replace_xml(img, XML, out=tmp_path / "y.save")
    assert sf.read_save_header(other).xml == XML and sf.read_save_header(img).xml == big
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.save", "y.save"]
    with pytest.raises(VmStateError, match="NUL"):
        sf.replace_xml(img, "a\0b")


def test_replace_xml_keeps_big_endian_order(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    img = tmp_path / "x.save"
    img.write_bytes(image_bytes(data, order=">", cookie=None))
    sf.replace_xml(img, "<domain/>")
    h = sf.read_save_header(img)
    assert (h.byteorder, h.xml, h.cookie) == (">", "<domain/>", None)
    assert struct.unpack_from(">I", img.read_bytes(), 16)[0] == 2


def test_implausible_data_len_is_reported_not_read(tmp_path: Path) -> None:
    img = tmp_path / "x.save"
    raw = bytearray(image_bytes(b.complete_stream()[0]))
    struct.pack_into("<I", raw, 20, 0x7FFF_FFFF)
    img.write_bytes(bytes(raw))
    with pytest.raises(VmStateError, match="truncated: the XML area ends at byte 2147483739"):
        sf.read_save_header(img)


def test_store_load_rebuild_a_split_image(tmp_path: Path) -> None:
    data, final = b.complete_stream()
    img = tmp_path / "in.save"
    img.write_bytes(image_bytes(data))
    store = tmp_path / "store"
    parts = sf.split_save_image(img, store)
    sf.store_parts(parts, store)
    loaded = sf.load_parts(store)
    assert (loaded.header.xml, loaded.header.cookie, loaded.header.was_running) == (XML, COOKIE, True)
    assert loaded.parts.prefix == parts.parts.prefix and loaded.parts.tail == parts.parts.tail
    assert loaded.ram == parts.ram
    new_xml = XML.replace("tiny", "tiny-copy")
    out = sf.rebuild_save_image(store, tmp_path / "copy.save", xml=new_xml, was_running=False)
    h = sf.read_save_header(out)
    assert (h.xml, h.cookie, h.was_running) == (new_xml, COOKIE, False)
    again = sf.split_save_image(out, tmp_path / "again")
    for name, content in final.items():
        assert again.ram[name].read_bytes() == content
    # what a broken store looks like
    parts.ram["pc.bios"].write_bytes(b"short")
    with pytest.raises(
        VmStateError, match=r"RAM image 'pc\.bios' for block 'pc\.bios' is missing or not 16384"
    ):
        sf.load_parts(store)
    (store / sf.STATE_FILE).unlink()
    with pytest.raises(VmStateError, match="not a complete split save image"):
        sf.load_parts(store)
    with pytest.raises(VmStateError, match="is not in"):
        sf.store_parts(parts, tmp_path)


def test_random_headers_only_raise_vmstate_errors(tmp_path: Path) -> None:
    import random

    rng = random.Random(3)
    base = image_bytes(b.complete_stream()[0], pad=16)
    img = tmp_path / "x.save"
    for _ in range(300):
        raw = bytearray(base)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(16, 140)] = rng.randrange(256)
        img.write_bytes(bytes(raw))
        try:
            h = sf.read_save_header(img)
        except VmStateError:
            continue
        assert h.stream_offset == 92 + h.data_len


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG, as they would on a full disk with ENOSPC."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


def test_write_failures_are_clear_errors_and_leave_nothing(tmp_path: Path) -> None:
    data, _ = b.complete_stream()
    img = tmp_path / "in.save"
    img.write_bytes(image_bytes(data))
    parts = sf.split_save_image(img, tmp_path / "ram")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with file_size_limit(20_000), pytest.raises(VmStateError, match="cannot write the save image"):
        sf.write_save_image(
            out_dir / "x.save", XML, parts.parts.prefix, parts.ram, parts.parts.tail, was_running=True
        )
    assert list(out_dir.iterdir()) == []
    with (
        file_size_limit(20_000),
        pytest.raises(VmStateError, match=r"cannot create RAM image files.*too large"),
    ):
        sf.split_save_image(img, out_dir / "ram")
    assert list((out_dir / "ram").iterdir()) == []
    with pytest.raises(VmStateError, match="cannot create a file beside it"):
        sf.write_save_image(
            tmp_path / "missing" / "x.save",
            XML,
            parts.parts.prefix,
            parts.ram,
            parts.parts.tail,
            was_running=True,
        )
