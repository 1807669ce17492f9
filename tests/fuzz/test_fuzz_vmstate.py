"""Fuzz the QEMU migration stream parser and the libvirt save image reader (nephele.vmstate) with
mutated valid streams and images: bit flips, truncations, splices, inserted bytes, and length/offset
fields set to edge values.

What must hold: the parser either accepts the bytes or raises VmStateError with a message and a stream
offset inside the input; every event it produced before stopping serialises back to exactly the bytes
it consumed (it never invents or drops a byte); splitting a stream or a save image into files leaves
nothing in the output directory when it is refused; no other exception, no hang. Inputs stay under
256 KiB, and every declared size is backed by the input or refused.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

from hypothesis import event, given
from hypothesis import strategies as st

from nephele.errors import VmStateError
from nephele.vmstate import savefile as sf
from nephele.vmstate.image import StreamParts, split_stream
from nephele.vmstate.stream import MigrationStreamParser, StreamEnd, VmStreamError, event_bytes
from tests.fuzz.budget import fuzz, no_hang
from tests.vmstate import streams as b

SEEDS = [
    b.full_stream(),
    b.full_stream(caps=["x-ignore-shared"]),
    b.complete_stream(commands=True)[0],
    b.full_stream(commands=False, vmdesc=False),
]
XML = "<domain type='qemu'><name>tiny</name><memory unit='KiB'>65536</memory></domain>"
EDGE = [0, 1, 0xFF, 0x1000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 40, (1 << 63) | 0x8, 0xFFFFFFFFFFFFFFFF]


def mutate(draw: st.DrawFn, seed: bytes, *, max_edits: int = 4) -> bytes:
    buf = bytearray(seed)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(
            st.sampled_from(["flip", "flip", "field", "field", "truncate", "splice", "insert", "delete"])
        )
        i = draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "field" and buf:
            # QEMU's integers are big-endian; hit a length, an id or a record header
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(EDGE)) & ((1 << (8 * width)) - 1)
            buf[i : i + width] = value.to_bytes(width, "big")
        elif op == "truncate":
            del buf[i:]
        elif op == "splice":
            j = draw(st.integers(0, len(seed)))
            buf[i:i] = seed[j : j + draw(st.integers(1, 5000))]
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        else:
            del buf[i : i + draw(st.integers(1, 5000))]
    return bytes(buf[: 256 << 10])


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    return mutate(draw, draw(st.sampled_from(SEEDS)))


@fuzz(300)
@given(stream=streams(), chunks=st.lists(st.integers(1, 9000), max_size=5))
def test_parser(stream: bytes, chunks: list[int]) -> None:
    parser = MigrationStreamParser()
    out = bytearray()
    pos = 0
    try:
        with no_hang():
            for n in [*chunks, len(stream)]:
                for ev in parser.feed(stream[pos : pos + n]):
                    out += event_bytes(ev)
                pos = min(len(stream), pos + n)
            end = parser.close()
    except VmStreamError as exc:
        event("refused")
        assert str(exc).startswith("migration stream: ") and len(str(exc)) > 20
        assert exc.offset is not None and 0 <= exc.offset <= len(stream), (exc.offset, len(stream))
        assert bytes(out) == stream[: len(out)], "events do not serialise to the bytes consumed"
        return
    event("accepted")
    assert [type(e) for e in end] in ([], [StreamEnd])
    assert bytes(out) == stream, "an accepted stream does not serialise back byte for byte"


@fuzz(150)
@given(streams())
def test_split_stream(stream: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-vm-") as d:
        out = Path(d) / "ram"
        try:
            with no_hang():
                res = split_stream(io.BytesIO(stream), out, allow_missing=True)
        except VmStateError as exc:
            event("refused")
            assert str(exc)
            assert not out.exists() or list(out.iterdir()) == [], "a refused split left files behind"
            return
        event("split")
        # what it wrote is what the stream declared: one file per block, at the block's length
        assert {p.name for p in out.iterdir()} == {p.name for p in res.ram.values()}
        for name, path in res.ram.items():
            assert path.stat().st_size == res.parts.blocks[name]


def _prefix(stream: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return split_stream(io.BytesIO(stream), Path(d), allow_missing=True).parts.prefix


PREFIXES = [_prefix(s) for s in SEEDS[:3]]


@st.composite
def prefixes(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(PREFIXES))
    if draw(st.booleans()):
        return seed[: draw(st.integers(0, len(seed)))]
    return mutate(draw, seed, max_edits=2)


@fuzz(100)
@given(prefixes())
def test_stream_parts_from_prefix(prefix: bytes) -> None:
    """A stored stream prefix (read back from a node's disk) is either whole or refused."""
    try:
        with no_hang():
            parts = StreamParts.from_prefix(prefix, b"")
    except VmStateError as exc:
        assert str(exc)
        return
    assert parts.blocks and parts.prefix == prefix


@st.composite
def save_images(draw: st.DrawFn) -> bytes:
    seed = draw(st.sampled_from(SEEDS[:3]))
    image = sf.build_header(XML, draw(st.sampled_from([None, "<cookie/>"])), was_running=True)
    image = image[: sf.HEADER_SIZE + 512]  # keep the XML area small: the fuzz budget goes to the parsing
    head = bytearray(image[: sf.HEADER_SIZE])
    head[20:24] = (512).to_bytes(4, "little")
    return mutate(draw, bytes(head) + image[sf.HEADER_SIZE :] + seed)


@fuzz(150)
@given(save_images())
def test_save_image(image: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-save-") as d:
        path = Path(d) / "memory.save"
        path.write_bytes(image)
        out = Path(d) / "parts"
        out.mkdir()
        try:
            with no_hang():
                hdr = sf.read_save_header(path)
                assert hdr.stream_offset <= len(image)
                parts = sf.split_save_image(path, out)
                sf.store_parts(parts, out)
                again = sf.load_parts(out)
        except VmStateError as exc:
            event("refused")
            assert str(exc)
            assert list(out.iterdir()) == [], "a refused save image left files behind"
            return
        event("split")
        assert again.parts.prefix == parts.parts.prefix and again.parts.tail == parts.parts.tail
        assert again.header.xml == hdr.xml


def test_prefix_without_configuration_is_refused() -> None:
    """Found while writing these fuzzers: a stored prefix lacking the configuration section tripped an
    `assert` in StreamParts.from_prefix (an AssertionError, or nothing at all under python -O)."""
    from nephele.vmstate import stream as s

    prefix = s.FILE_HEADER + b.start(2, b.BLOCKS)
    try:
        StreamParts.from_prefix(prefix, b"")
    except VmStateError as exc:
        assert "no configuration section" in str(exc)
    else:
        raise AssertionError("a prefix without configuration was accepted")


def _stored_parts(directory: Path) -> None:
    """A split save image as a node stores it (the image's RAM cache, a snapshot's state/)."""
    save = directory / "memory.save"
    save.write_bytes(sf.build_header(XML, "<cookie/>", was_running=True) + SEEDS[2])
    sf.store_parts(sf.split_save_image(save, directory), directory)
    save.unlink()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _edit(draw: st.DrawFn, value: object, depth: int = 0) -> object:
    if isinstance(value, dict) and value and depth < 3:
        key = draw(st.sampled_from(sorted(value)))
        out = dict(value)
        op = draw(st.sampled_from(["drop", "replace", "descend", "descend"]))
        if op == "drop":
            del out[key]
        elif op == "replace":
            out[key] = draw(json_values | st.sampled_from(["../x", "", "pc.ram", "nephele.vmstate/1"]))
        else:
            out[key] = _edit(draw, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and depth < 3:
        out_list = list(value)
        i = draw(st.integers(0, len(out_list) - 1))
        out_list[i] = _edit(draw, out_list[i], depth + 1)
        return out_list
    return draw(json_values)


@fuzz(100)
@given(data=st.data())
def test_load_and_rebuild_stored_parts(data: st.DataObject) -> None:
    """What a node reads back from its own disk (or an imported snapshot's state/): vmstate.json edited
    field by field, or the stored prefix/tail bytes damaged."""
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-parts-") as d:
        parts_dir = Path(d) / "parts"
        parts_dir.mkdir()
        _stored_parts(parts_dir)
        state = parts_dir / sf.STATE_FILE
        victim = data.draw(
            st.sampled_from([sf.STATE_FILE, sf.STATE_FILE, "stream-prefix.bin", "device-tail.bin"])
        )
        if victim == sf.STATE_FILE and data.draw(st.booleans()):
            value = json.loads(state.read_text())
            for _ in range(data.draw(st.integers(1, 3))):
                value = _edit(data.draw, value)
            state.write_text(json.dumps(value))
        else:
            path = parts_dir / victim
            path.write_bytes(
                data.draw(st.composite(lambda draw: mutate(draw, path.read_bytes(), max_edits=2))())
            )
        out = Path(d) / "out.save"
        try:
            with no_hang():
                sf.load_parts(parts_dir)
                sf.rebuild_save_image(parts_dir, out)
        except VmStateError as exc:
            event("refused")
            assert str(exc)
            assert not out.exists() and [p.name for p in Path(d).iterdir()] == ["parts"]
            return
        event("rebuilt")
        sf.read_save_header(out)


def test_stored_state_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    """Found while writing the test above: vmstate.json that is a list, or a block length of Infinity,
    escaped load_parts as AttributeError / OverflowError."""
    _stored_parts(tmp_path)
    state = tmp_path / sf.STATE_FILE
    good = json.loads(state.read_text())
    bad_length = {**good, "blocks": [{**good["blocks"][0], "length": float("inf")}, *good["blocks"][1:]]}
    for value in ([good], bad_length):
        state.write_text(json.dumps(value))
        try:
            sf.load_parts(tmp_path)
        except VmStateError as exc:
            assert "vmstate.json" in str(exc) or "not a complete split save image" in str(exc)
        else:
            raise AssertionError(f"{value!r} was accepted")
