"""Fuzz the delta wire decoder with mutated valid streams: bit flips, truncations, splices (frames
dropped, repeated, swapped, bytes moved), frames with a valid checksum but edited or random content,
and random chunking of the input.

What must hold: a stream either decodes to exactly the images it was made from (the END digests make any
other success impossible) or is refused with a DeltaError (StreamCorrupt / StreamTruncated /
VerificationFailed) that has a message; after a refusal nothing is left at the outputs or beside them;
no other exception, no hang. Inputs stay under 1 MiB.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from nephele.delta import Decoder, Target, decode_files, encode_files
from nephele.delta import wire as W
from nephele.errors import DeltaError
from tests.delta.conftest import frame, frames, rand_blocks, write
from tests.fuzz.budget import fuzz, no_hang


@dataclass(frozen=True)
class Case:
    refs: dict[str, Path]
    stream: bytes
    frames: list[dict[str, object]]
    expect: dict[str, bytes]


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A small two-target stream with every entry kind (zero, raw, xor, ref, stream copy, keep)."""
    rng = np.random.default_rng(7)
    src = tmp_path_factory.mktemp("delta-src")
    base = rand_blocks(rng, 24)
    mem = rand_blocks(rng, 12)
    new = base.copy()
    new[0:3] = 0
    new[4:6] = mem[0:2]
    new[8:12] = rand_blocks(rng, 4)
    new[12:14] = new[8:10]
    new[15, :64] ^= 0x5A
    newm = mem.copy()
    newm[2:5] = rand_blocks(rng, 3)
    newm[6:8] = new[8:10]
    refs = {"bd": write(src / "bd", base), "bm": write(src / "bm", mem)}
    targets = [
        Target("disk", "disk", write(src / "nd", new, size=new.nbytes - 100), "bd"),
        Target("memory", "memory", write(src / "nm", newm), "bm"),
    ]
    buf = io.BytesIO()
    encode_files(refs, targets, buf, batch_blocks=4)
    stream = buf.getvalue()
    expect = {"disk": targets[0].path.read_bytes(), "memory": targets[1].path.read_bytes()}
    return Case(refs, stream, frames(stream), expect)


def _reframe(parts: list[tuple[int, int, int, bytes]]) -> bytes:
    return W.MAGIC + b"".join(frame(t, tg, seq, raw) for t, tg, seq, raw in parts)


def _random_payload(draw: st.DrawFn, ftype: int) -> bytes:
    if ftype in (W.HEADER, W.TARGET, W.END) and draw(st.booleans()):
        value = draw(
            st.recursive(
                st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text(max_size=8),
                lambda inner: (
                    st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
                ),
                max_leaves=10,
            )
        )
        if isinstance(value, dict) and draw(st.booleans()):
            # the keys a real frame has, with odd values
            value.update(
                draw(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            k: st.integers(-5, 2**63) | st.text(max_size=6) | st.none()
                            for k in ("format", "block", "refs", "name", "kind", "size", "base", "targets")
                        },
                    )
                )
            )
        return json.dumps(value).encode()
    if ftype == W.BLOCKS and draw(st.booleans()):
        n = draw(st.integers(0, 6))
        nval = draw(st.integers(0, 3))
        nargs = draw(st.integers(0, 4))
        head = W.BLOCKS_HEAD.pack(
            draw(st.sampled_from([n, n + 1, 2**31])), nval, nargs, draw(st.sampled_from([0, 0, 1]))
        )
        deltas = struct.pack(f"<{n}q", *draw(st.lists(st.integers(-(2**40), 2**40), min_size=n, max_size=n)))
        ops = bytes(draw(st.lists(st.integers(0, 8), min_size=n, max_size=n)))
        args = struct.pack(
            f"<{nargs}q", *draw(st.lists(st.integers(-(2**62), 2**62), min_size=nargs, max_size=nargs))
        )
        values = draw(st.binary(min_size=0, max_size=16)) * (W.BLOCK * nval // 16 + 1)
        body = head + deltas + ops + args + values[: W.BLOCK * nval]
        return body[: draw(st.integers(0, len(body)))] if draw(st.integers(0, 5)) == 5 else body
    return draw(st.binary(max_size=64))


@st.composite
def mutated(draw: st.DrawFn, case: Case) -> bytes:
    parts = [(int(f["type"]), int(f["target"]), int(f["seq"]), bytes(f["raw"])) for f in case.frames]  # type: ignore[call-overload]
    raw_stream = case.stream
    # checksummed edits reach the parser behind the frame check: they get the larger share
    kind = draw(st.sampled_from(["bytes", "frames", "payload", "payload", "random-frame", "random-frame"]))
    event(kind)
    if kind == "bytes":  # bit flips, truncation, moved bytes: mostly stopped by the frame checksum
        buf = bytearray(raw_stream)
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["flip", "truncate", "splice", "delete"]))
            i = draw(st.integers(0, max(0, len(buf) - 1)))
            if op == "flip" and buf:
                buf[i] ^= 1 << draw(st.integers(0, 7))
            elif op == "truncate":
                del buf[i:]
            elif op == "splice":
                j = draw(st.integers(0, len(raw_stream)))
                buf[i:i] = raw_stream[j : j + draw(st.integers(1, 64))]
            else:
                del buf[i : i + draw(st.integers(1, 64))]
        return bytes(buf)
    if kind == "frames":  # whole frames dropped, repeated, swapped; numbered anew or kept
        for _ in range(draw(st.integers(1, 2))):
            i = draw(st.integers(0, len(parts) - 1))
            op = draw(st.sampled_from(["drop", "repeat", "swap", "move"]))
            if op == "drop" and len(parts) > 1:
                del parts[i]
            elif op == "repeat":
                parts.insert(i, parts[i])
            elif op == "swap":
                j = draw(st.integers(0, len(parts) - 1))
                parts[i], parts[j] = parts[j], parts[i]
            else:
                parts.insert(draw(st.integers(0, len(parts) - 1)), parts.pop(i))
        if draw(st.booleans()):
            parts = [(t, tg, n, raw) for n, (t, tg, _, raw) in enumerate(parts)]
        return _reframe(parts)
    if kind == "payload":  # the content of one frame edited, behind a valid checksum
        i = draw(st.integers(0, len(parts) - 1))
        t, tg, seq, raw = parts[i]
        buf = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(["flip", "truncate", "extend", "set"]))
            j = draw(st.integers(0, max(0, len(buf) - 1)))
            if op == "flip" and buf:
                buf[j] ^= 1 << draw(st.integers(0, 7))
            elif op == "truncate":
                del buf[j:]
            elif op == "extend":
                buf += draw(st.binary(min_size=1, max_size=32))
            elif buf:
                # a header field (counts, block deltas, ops) set to an edge value
                k = min(j, len(buf) - 1) & ~3
                value = draw(st.sampled_from([0, 1, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF]))
                buf[k : k + 4] = value.to_bytes(4, "little")
        t = draw(st.sampled_from([t, t, t, W.HEADER, W.TARGET, W.BLOCKS, W.END, 0, 9]))
        tg = draw(st.sampled_from([tg, tg, 0, 1, 2, W.NO_TARGET]))
        parts[i] = (t, tg, seq, bytes(buf))
        return _reframe(parts)
    # random frames (valid checksum, random type, target and content) inserted or replacing one
    for _ in range(draw(st.integers(1, 2))):
        t = draw(st.sampled_from([W.HEADER, W.TARGET, W.BLOCKS, W.END, 0, 5, 255]))
        tg = draw(st.sampled_from([0, 1, 2, W.NO_TARGET, 0xFFFE]))
        raw = _random_payload(draw, t)
        i = draw(st.integers(0, len(parts)))
        if draw(st.booleans()) and i < len(parts):
            parts[i] = (t, tg, parts[i][2], raw)
        else:
            parts.insert(i, (t, tg, i, raw))
    if draw(st.booleans()):
        parts = [(t, tg, n, raw) for n, (t, tg, _, raw) in enumerate(parts)]
    return _reframe(parts)


def _note(what: str) -> None:
    with contextlib.suppress(InvalidArgument):  # outside a hypothesis test
        event(what)


def _check(case: Case, stream: bytes, chunks: list[int] | None) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-delta-") as d:
        out = Path(d)
        outputs = {"disk": out / "disk.img", "memory": out / "mem.img"}
        try:
            with no_hang():
                if chunks is None:
                    decode_files(io.BytesIO(stream), case.refs, outputs, durable=False)
                else:
                    dec = Decoder(case.refs, dict(outputs), durable=False)
                    try:
                        pos = 0
                        for n in chunks:
                            dec.feed(stream[pos : pos + n])
                            pos += n
                        dec.feed(stream[pos:])
                        dec.close()
                    except BaseException:
                        dec.abort()
                        raise
        except DeltaError as exc:
            _note(type(exc).__name__)
            assert str(exc)
            assert list(out.iterdir()) == [], "a refused stream left files behind"
            return
        _note("decoded")
        for name, path in outputs.items():
            assert path.read_bytes() == case.expect[name], f"{name}: a stream decoded to other bytes"


def test_the_unmutated_stream_decodes(case: Case) -> None:
    _check(case, case.stream, None)
    assert len(case.frames) > 6


@fuzz(400)
@given(data=st.data())
def test_mutated_streams(case: Case, data: st.DataObject) -> None:
    stream = data.draw(mutated(case))
    assert len(stream) < 1 << 20
    chunks = data.draw(st.none() | st.lists(st.integers(1, 5000), max_size=6))
    _check(case, stream, chunks)


def test_end_frame_whose_targets_is_not_a_list(case: Case) -> None:
    """Found by `make fuzz`: an END frame (valid checksum) whose "targets" is a number made the decoder
    raise TypeError while formatting its own StreamCorrupt message (nephele/delta/decoder.py, _on_end:
    `len(entries or [])`). Minimal input: a valid HEADER, then END {"targets": 1}."""
    header = json.dumps({"block_size": W.BLOCK, "format": W.FORMAT, "refs": []}).encode()
    stream = (
        W.MAGIC + frame(W.HEADER, W.NO_TARGET, 0, header) + frame(W.END, W.NO_TARGET, 1, b'{"targets": 1}')
    )
    with pytest.raises(DeltaError, match="END frame"):
        decode_files(io.BytesIO(stream), {}, {}, durable=False)
