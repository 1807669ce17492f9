"""Corrupt, truncated, reordered and hostile streams are refused with a clear error naming the frame and
the stream offset, and nothing is left at the outputs (nor any temporary file beside them)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from nephele.delta import Decoder, Target, decode_files, encode_files
from nephele.delta import _kernels as K
from nephele.delta import wire as W
from nephele.errors import DeltaError, StreamCorrupt, StreamTruncated, VerificationFailed
from tests.delta.conftest import frame, frames, rand_blocks, rebuild, write


@pytest.fixture
def case(tmp_path: Path, rng: np.random.Generator) -> dict[str, object]:
    base = rand_blocks(rng, 64)
    mem = rand_blocks(rng, 32)
    new = base.copy()
    new[0:4] = 0
    new[5:8] = mem[0:3]
    new[10:20] = rand_blocks(rng, 10)
    new[20:24] = new[10:14]
    new[30, :100] = 1
    newm = mem.copy()
    newm[3:9] = rand_blocks(rng, 6)
    newm[9:11] = new[10:12]
    src = tmp_path / "src"
    src.mkdir()
    refs = {"bd": write(src / "bd", base), "bm": write(src / "bm", mem)}
    targets = [
        Target("disk", "disk", write(src / "nd", new, size=new.nbytes + 100), "bd"),
        Target("memory", "memory", write(src / "nm", newm), "bm"),
    ]
    buf = io.BytesIO()
    encode_files(refs, targets, buf, batch_blocks=3)
    out = tmp_path / "out"
    out.mkdir()
    return {
        "refs": refs,
        "stream": buf.getvalue(),
        "outdir": out,
        "outputs": {"disk": out / "disk.img", "memory": out / "mem.img"},
        "expect": {"disk": targets[0].path.read_bytes(), "memory": targets[1].path.read_bytes()},
    }


def decode(case: dict[str, object], stream: bytes) -> None:
    decode_files(io.BytesIO(stream), case["refs"], case["outputs"])  # type: ignore[arg-type]


def assert_nothing_left(case: dict[str, object]) -> None:
    assert list(Path(case["outdir"]).iterdir()) == []  # type: ignore[arg-type]


def test_case_decodes(case: dict[str, object]) -> None:
    decode(case, case["stream"])  # type: ignore[arg-type]
    for name, p in case["outputs"].items():  # type: ignore[attr-defined]
        assert p.read_bytes() == case["expect"][name]  # type: ignore[index]
    assert len(frames(case["stream"])) > 8  # type: ignore[arg-type]


def test_flip_a_byte_in_every_frame(case: dict[str, object]) -> None:
    stream: bytes = case["stream"]  # type: ignore[assignment]
    fl = frames(stream)
    for f in fl:
        start, end = int(f["offset"]), int(f["end"])  # type: ignore[call-overload]
        for pos in sorted(
            {
                start,
                start + 1,
                start + 2,
                start + 5,
                start + 9,
                start + 13,
                start + 17,
                (start + end) // 2,
                end - 1,
            }
        ):
            bad = bytearray(stream)
            bad[pos] ^= 0x40
            with pytest.raises(StreamCorrupt) as ei:
                decode(case, bytes(bad))
            err = ei.value
            # A length that grows makes the decoder wait for bytes that never come: truncation.
            assert isinstance(err, StreamTruncated) or (err.offset is not None and err.offset <= pos), (
                pos,
                err,
            )
            assert_nothing_left(case)


def test_bad_magic(case: dict[str, object]) -> None:
    with pytest.raises(StreamCorrupt, match="magic"):
        decode(case, b"GARBAGE!" + case["stream"][8:])  # type: ignore[index]
    assert_nothing_left(case)


def test_truncated_at_every_boundary_and_inside(case: dict[str, object]) -> None:
    stream: bytes = case["stream"]  # type: ignore[assignment]
    cuts = {0, 3, len(W.MAGIC)}
    for f in frames(stream)[:-1]:
        cuts |= {int(f["end"]), int(f["offset"]) + 7, int(f["end"]) - 3}  # type: ignore[call-overload]
    last = frames(stream)[-1]
    cuts |= {int(last["offset"]), int(last["end"]) - 1}  # type: ignore[call-overload]
    for cut in sorted(cuts):
        with pytest.raises(StreamTruncated) as ei:
            decode(case, stream[:cut])
        assert "END" in str(ei.value)
        assert_nothing_left(case)


def test_data_after_trailer(case: dict[str, object]) -> None:
    with pytest.raises(StreamCorrupt, match="after the END"):
        decode(case, case["stream"] + b"\0")  # type: ignore[operator]
    assert_nothing_left(case)
    # also when it arrives in a later feed, after the END frame was already verified
    dec = Decoder(case["refs"], case["outputs"])  # type: ignore[arg-type]
    dec.feed(case["stream"])  # type: ignore[arg-type]
    with pytest.raises(StreamCorrupt, match="after the END"):
        dec.feed(b"x")
    with pytest.raises(DeltaError):
        dec.close()
    assert_nothing_left(case)


def test_reordered_and_repeated_frames(case: dict[str, object]) -> None:
    stream: bytes = case["stream"]  # type: ignore[assignment]
    fl = frames(stream)
    parts = [stream[: len(W.MAGIC)]] + [stream[int(f["offset"]) : int(f["end"])] for f in fl]  # type: ignore[call-overload]
    swapped = [*parts[:5], parts[6], parts[5], *parts[7:]]
    with pytest.raises(StreamCorrupt, match="out of sequence"):
        decode(case, b"".join(swapped))
    assert_nothing_left(case)
    repeated = [*parts[:6], parts[5], *parts[6:]]
    with pytest.raises(StreamCorrupt, match="out of sequence"):
        decode(case, b"".join(repeated))
    assert_nothing_left(case)


def edited(case: dict[str, object], index: int, raw: bytes, **fields: int) -> bytes:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    fl[index] = {**fl[index], "raw": raw, **fields}
    return rebuild(fl)


def first_blocks(case: dict[str, object]) -> tuple[int, dict[str, object]]:
    for i, f in enumerate(frames(case["stream"])):  # type: ignore[arg-type]
        if f["type"] == W.BLOCKS:
            return i, f
    raise AssertionError


def blocks_payload(blocks: list[int], ops: list[int], args: list[int], values: int = 0) -> bytes:
    deltas = np.diff(np.array(blocks, np.int64), prepend=0)
    return (
        W.BLOCKS_HEAD.pack(len(blocks), values, len(args), 0)
        + deltas.astype("<i8").tobytes()
        + bytes(ops)
        + np.array(args, "<i8").tobytes()
        + bytes(W.BLOCK * values)
    )


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (blocks_payload([64 + 1], [K.ZERO], []), "block number outside"),
        (blocks_payload([-1], [K.ZERO], []), "block number outside"),
        (blocks_payload([1], [K.REF], [(7 << 40) | 1]), "unknown reference image"),
        (blocks_payload([1], [K.REF], [(1 << 40) | 32]), "beyond the end of a reference"),
        (blocks_payload([1], [K.STREAM], [(9 << 40) | 1]), "unknown target"),
        (blocks_payload([1], [K.STREAM], [(1 << 40) | 999]), "beyond the end of a target"),
        (blocks_payload([1], [K.REF], [-5]), "negative"),
        (blocks_payload([1, 1], [K.ZERO, K.ZERO], []), "twice"),
        (blocks_payload([1], [9], []), "unknown block op"),
        (blocks_payload([1], [K.RAW], []), "counts"),
        (blocks_payload([1], [K.ZERO], [], values=1), "counts"),
        (blocks_payload([1], [K.ZERO], [])[:-1], "does not match its counts"),
        (blocks_payload([1], [K.ZERO], []) + b"\0", "does not match its counts"),
        (W.BLOCKS_HEAD.pack(0, 0, 0, 0), "empty"),
        (blocks_payload(list(range(W.MAX_ENTRIES + 1)), [K.ZERO] * (W.MAX_ENTRIES + 1), []), "at most"),
        (b"\1\0", "too short"),
    ],
)
def test_hostile_blocks_frames(case: dict[str, object], payload: bytes, message: str) -> None:
    i, _ = first_blocks(case)
    with pytest.raises(StreamCorrupt, match=message) as ei:
        decode(case, edited(case, i, payload))
    assert f"frame {i}" in str(ei.value) and "stream byte" in str(ei.value)
    assert_nothing_left(case)


def test_frame_for_unknown_target(case: dict[str, object]) -> None:
    i, _ = first_blocks(case)
    with pytest.raises(StreamCorrupt, match="unknown target"):
        decode(case, edited(case, i, blocks_payload([1], [K.ZERO], []), target=5))
    assert_nothing_left(case)


def test_base_op_without_base(case: dict[str, object], tmp_path: Path) -> None:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    tgt = json.loads(bytes(fl[1]["raw"]))  # type: ignore[arg-type]
    tgt["base"] = None
    fl[1] = {**fl[1], "raw": W.json_payload(tgt)}
    with pytest.raises(StreamCorrupt, match="no base"):
        decode(case, rebuild(fl))
    assert_nothing_left(case)


def test_duplicate_header_and_missing_header(case: dict[str, object]) -> None:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    with pytest.raises(StreamCorrupt, match="duplicate HEADER"):
        decode(case, rebuild([fl[0], *fl]))
    with pytest.raises(StreamCorrupt, match="before the HEADER"):
        decode(case, rebuild(fl[1:]))
    assert_nothing_left(case)


def test_bad_lengths_in_frame_header(case: dict[str, object]) -> None:
    stream: bytes = case["stream"]  # type: ignore[assignment]
    off = len(W.MAGIC)
    ftype, codec, target, seq, slen, rlen = W.FRAME_HEAD.unpack_from(stream, off)
    bad = (
        stream[:off]
        + W.FRAME_HEAD.pack(ftype, codec, target, seq, W.MAX_STORED + 1, rlen)
        + stream[off + 16 :]
    )
    with pytest.raises(StreamCorrupt, match="bad frame lengths"):
        decode(case, bad)
    bad = stream[:off] + W.FRAME_HEAD.pack(ftype, 7, target, seq, slen, rlen) + stream[off + 16 :]
    with pytest.raises(StreamCorrupt, match="unknown codec"):
        decode(case, bad)
    assert_nothing_left(case)


def test_lz4_payload_that_lies_about_its_size(case: dict[str, object]) -> None:
    import lz4.block
    import xxhash

    raw = blocks_payload([1], [K.ZERO], [])
    body = lz4.block.compress(raw, store_size=False)
    head = W.FRAME_HEAD.pack(W.BLOCKS, W.LZ4, 0, 0, len(body), len(raw) + 50)
    i, _ = first_blocks(case)
    fl = frames(case["stream"])  # type: ignore[arg-type]
    pre = rebuild(fl[:i])
    head = W.FRAME_HEAD.pack(W.BLOCKS, W.LZ4, 0, i, len(body), len(raw) + 50)
    fr = head + body + W.CHECK.pack(xxhash.xxh3_64_intdigest(head + body))
    with pytest.raises(StreamCorrupt, match="decompress"):
        decode(case, pre + fr)
    assert_nothing_left(case)


def test_bad_json_and_bad_target_declarations(case: dict[str, object]) -> None:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    for raw, msg in [
        (b"{not json", "bad JSON"),
        (b"[1]", "not an object"),
        (W.json_payload({"index": 0, "name": "disk", "kind": "tape", "size": 1, "base": None}), "bad kind"),
        (W.json_payload({"index": 0, "name": "disk", "kind": "disk", "size": -1, "base": None}), "bad size"),
        (W.json_payload({"index": 3, "name": "disk", "kind": "disk", "size": 1, "base": None}), "index"),
        (W.json_payload({"index": 0, "name": "disk", "kind": "disk", "size": 1, "base": "zz"}), "base"),
    ]:
        parts = [fl[0], {**fl[1], "raw": raw}, *fl[2:]]
        with pytest.raises(StreamCorrupt, match=msg):
            decode(case, rebuild(parts))
        assert_nothing_left(case)


def test_unsupported_format_version(case: dict[str, object]) -> None:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    h = json.loads(bytes(fl[0]["raw"]))  # type: ignore[arg-type]
    h["format"] = 99
    with pytest.raises(StreamCorrupt, match="format version 99"):
        decode(case, rebuild([{**fl[0], "raw": W.json_payload(h)}, *fl[1:]]))


def test_wrong_digest_in_trailer(case: dict[str, object]) -> None:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    end = json.loads(bytes(fl[-1]["raw"]))  # type: ignore[arg-type]
    end["targets"][1]["digest"] = "00" * 32
    with pytest.raises(VerificationFailed, match="memory"):
        decode(case, rebuild([*fl[:-1], {**fl[-1], "raw": W.json_payload(end)}]))
    assert_nothing_left(case)


def test_dropped_blocks_frame_fails_verification(case: dict[str, object]) -> None:
    fl = frames(case["stream"])  # type: ignore[arg-type]
    i, _ = first_blocks(case)
    with pytest.raises(VerificationFailed):
        decode(case, rebuild(fl[:i] + fl[i + 1 :]))  # renumbered, so only the digest can tell
    assert_nothing_left(case)


def test_reference_content_mismatch_is_refused(case: dict[str, object], tmp_path: Path) -> None:
    refs = dict(case["refs"])  # type: ignore[call-overload]
    other = tmp_path / "other-bm"
    data = bytearray(Path(refs["bm"]).read_bytes())
    data[5000] ^= 1
    other.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="'bm'"):
        decode_files(io.BytesIO(case["stream"]), {**refs, "bm": other}, case["outputs"])  # type: ignore[arg-type]
    assert_nothing_left(case)


def test_missing_reference_is_refused(case: dict[str, object]) -> None:
    refs = dict(case["refs"])  # type: ignore[call-overload]
    del refs["bm"]
    with pytest.raises(StreamCorrupt, match="does not hold"):
        decode_files(io.BytesIO(case["stream"]), refs, case["outputs"])  # type: ignore[arg-type]
    assert_nothing_left(case)


def test_outputs_must_match_targets(case: dict[str, object]) -> None:
    outs = dict(case["outputs"])  # type: ignore[call-overload]
    del outs["memory"]
    with pytest.raises(DeltaError, match="no output"):
        decode_files(io.BytesIO(case["stream"]), case["refs"], outs)  # type: ignore[arg-type]
    assert_nothing_left(case)
    outs = {**case["outputs"], "extra": Path(case["outdir"]) / "x"}  # type: ignore[dict-item, arg-type]
    with pytest.raises(DeltaError, match="no target named 'extra'"):
        decode_files(io.BytesIO(case["stream"]), case["refs"], outs)  # type: ignore[arg-type]
    assert_nothing_left(case)


def test_fed_byte_by_byte_in_odd_chunks(case: dict[str, object]) -> None:
    stream: bytes = case["stream"]  # type: ignore[assignment]
    dec = Decoder(case["refs"], case["outputs"])  # type: ignore[arg-type]
    pos, step = 0, 1
    while pos < len(stream):
        dec.feed(stream[pos : pos + step])
        pos += step
        step = step * 3 % 1999 + 1
    dec.close()
    for name, p in case["outputs"].items():  # type: ignore[attr-defined]
        assert p.read_bytes() == case["expect"][name]  # type: ignore[index]


def test_unused_frame_head_struct_is_16_bytes() -> None:
    assert W.FRAME_HEAD.size == 16 and struct.calcsize("<Q") == W.CHECK.size
    assert frame(W.END, W.NO_TARGET, 0, b"{}")[:1] == bytes([W.END])


def test_target_size_limit_and_shared_outputs(case: dict[str, object]) -> None:
    with pytest.raises(StreamCorrupt, match="exceeds this receiver's limit"):
        dec = Decoder(case["refs"], case["outputs"], max_target_bytes=1000)  # type: ignore[arg-type]
        dec.feed(case["stream"])  # type: ignore[arg-type]
    assert_nothing_left(case)
    same = Path(case["outdir"]) / "same"  # type: ignore[arg-type]
    with pytest.raises(DeltaError, match="same output"):
        Decoder(case["refs"], {"disk": same, "memory": same})  # type: ignore[arg-type]
