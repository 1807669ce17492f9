"""A workload whose true block classes are known: the stats must count exactly those, and the forced
hash collision must be caught by the byte-for-byte check."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

from nephele.delta import BlockIndex, Decoder, Encoder, RefSet, Target, decode_files, encode_files
from nephele.delta import _kernels as K
from nephele.delta.index import image_digest
from nephele.errors import DeltaError
from tests.delta.conftest import frames, rand_blocks, write

BLOCK = 4096


def test_known_classes(tmp_path: Path, rng: np.random.Generator) -> None:
    n = 600
    d0 = rand_blocks(rng, n)
    m0 = rand_blocks(rng, 300)
    m0[::5] = 0
    d1 = d0.copy()
    truth = np.full(n, -1)
    pos = rng.permutation(n)
    zero, ref_m, ref_d, new_raw, edit, dup = np.split(pos[:300], [50, 100, 140, 200, 260])
    d1[zero] = 0
    d1[ref_m] = rand_blocks(rng, ref_m.size)  # found only in the other reference image
    m0[1 : 1 + ref_m.size] = d1[ref_m]
    d1[ref_d] = d0[(ref_d + 7) % n]  # the base at another offset (never equal to the same offset)
    d1[new_raw] = rand_blocks(rng, new_raw.size)
    d1[edit, 100:140] ^= 0xFF  # 5 of 512 words differ: XOR
    d1[dup] = d1[new_raw[: dup.size]]  # copies of new blocks: by reference within the stream
    later = dup > new_raw[: dup.size]
    truth[zero] = K.ZERO
    truth[ref_m] = K.REF
    truth[ref_d] = K.REF
    truth[new_raw] = K.RAW
    truth[edit] = K.XOR
    truth[dup] = np.where(later, K.STREAM, K.RAW)  # whichever comes first is sent by value
    truth[new_raw[: dup.size][later == 0]] = K.STREAM

    refs = {"d0": write(tmp_path / "d0", d0), "m0": write(tmp_path / "m0", m0)}
    t = Target("disk", "disk", write(tmp_path / "d1", d1), "d0")
    buf = io.BytesIO()
    st = encode_files(refs, [t], buf)
    k = st.kinds["disk"]
    assert k.zeros == 50
    assert k.xor == 60
    assert k.by_value == int(((truth == K.RAW) | (truth == K.XOR)).sum())
    assert k.by_ref == 50 + 40 + int((truth == K.STREAM).sum())
    assert k.dirtied == 300 and k.kept == 0
    assert st.kinds["memory"].dirtied == 0

    # the ops in the frames name exactly the true class of every dirtied block
    seen = np.full(n, -1)
    for f in frames(buf.getvalue()):
        if f["type"] == 3:
            raw = bytes(f["raw"])  # type: ignore[arg-type]
            cnt = int.from_bytes(raw[:4], "little")
            blocks = np.cumsum(np.frombuffer(raw, "<i8", cnt, 16))
            seen[blocks] = np.frombuffer(raw, np.uint8, cnt, 16 + 8 * cnt)
    assert (seen == truth).all()

    out = tmp_path / "out"
    st2 = decode_files(io.BytesIO(buf.getvalue()), refs, {"disk": out})
    assert out.read_bytes() == t.path.read_bytes()
    assert st2.kinds["disk"].dirtied == 300
    assert "DIRTIED" in st2.table() and "1.17 MiB" in st2.table()  # 300 blocks


def test_forced_hash_collision_is_sent_by_value(tmp_path: Path, rng: np.random.Generator) -> None:
    ref = rand_blocks(rng, 16)
    new = rand_blocks(rng, 4)
    refs = {"r": write(tmp_path / "r", ref)}
    rs = RefSet.open(refs)
    h = np.empty((4, 2), np.uint64)
    K.hash_blocks(new.view(np.uint64).reshape(4, 512), h)
    # Pretend reference block 9 has the same 128-bit hash as new block 2 (its bytes differ).
    rs.indexes[0].hashes = rs.indexes[0].hashes.copy()
    rs.indexes[0].hashes[9] = h[2]
    rs.build_table()
    buf = io.BytesIO()
    enc = Encoder(rs, buf, emit_keep=False)
    enc.begin_target("memory", "memory", new.nbytes, None)
    enc.put_blocks("memory", np.arange(4), new)
    st = enc.finish()
    assert enc.collisions == 1
    assert st.kinds["memory"].by_value == 4 and st.kinds["memory"].by_ref == 0
    out = tmp_path / "out"
    dec = Decoder(refs, {"memory": out})
    dec.feed(buf.getvalue())
    dec.close()
    assert out.read_bytes() == new.tobytes()

    # Without the byte check the same candidate would have been a reference:
    rs2 = RefSet.open(refs)
    rs2.indexes[0].hashes = rs.indexes[0].hashes
    rs2.build_table()
    cls = np.empty(4, np.uint8)
    arg = np.empty(4, np.int64)
    K.classify(
        new.view(np.uint64).reshape(4, 512), np.zeros((4, 512), np.uint64), np.zeros(4, np.bool_),
        np.zeros((4, 2), np.uint64), np.arange(4, dtype=np.int64), np.zeros((4, 2), np.uint64),
        np.zeros(4, np.int64), 1, rs2.keys, rs2.vals, rs2.h2s,
        np.zeros(16, np.uint64), np.zeros(16, np.int64), np.array([0, 4], np.int64), cls, arg,
    )  # fmt: skip
    assert cls[2] == K.REF and arg[2] == 9


def test_index_is_cached_and_detects_staleness(tmp_path: Path, rng: np.random.Generator) -> None:
    img = write(tmp_path / "img", rand_blocks(rng, 10), size=10 * BLOCK - 5)
    ix = BlockIndex.load_or_build(img)
    nxi = BlockIndex.index_path(img)
    assert nxi.exists() and ix.nblocks == 10
    assert ix.digest == image_digest(ix.size, ix.hashes)
    again = BlockIndex.load_or_build(img)
    assert again.digest == ix.digest and np.array_equal(again.hashes, ix.hashes)
    # rewrite one byte: a new mtime makes the index stale
    data = bytearray(img.read_bytes())
    data[4096 * 3] ^= 1
    img.write_bytes(bytes(data))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    fresh = BlockIndex.load_or_build(img)
    assert fresh.digest != ix.digest
    assert (fresh.hashes != ix.hashes).any(axis=1).tolist() == [i == 3 for i in range(10)]
    # a damaged index file is recomputed, not trusted
    raw = bytearray(nxi.read_bytes())
    raw[-1] ^= 0xFF
    nxi.write_bytes(bytes(raw))
    assert BlockIndex.load_or_build(img).digest == fresh.digest


def test_encoder_refuses_misuse(tmp_path: Path, rng: np.random.Generator) -> None:
    refs = {"r": write(tmp_path / "r", rand_blocks(rng, 2))}
    enc = Encoder(refs, io.BytesIO())
    enc.begin_target("m", "memory", 3 * BLOCK, "r")
    with pytest.raises(DeltaError, match="declared twice"):
        enc.begin_target("m", "memory", BLOCK)
    with pytest.raises(DeltaError, match="unknown reference"):
        enc.begin_target("x", "memory", BLOCK, "nope")
    with pytest.raises(DeltaError, match="kind"):
        enc.begin_target("y", "tape", BLOCK)  # type: ignore[arg-type]
    with pytest.raises(DeltaError, match="outside"):
        enc.put_blocks("m", np.array([3]), np.zeros((1, BLOCK), np.uint8))
    with pytest.raises(DeltaError, match="unknown target"):
        enc.put_blocks("zz", np.array([0]), np.zeros((1, BLOCK), np.uint8))
    with pytest.raises(DeltaError, match="block numbers"):
        enc.put_blocks("m", np.array([0, 1]), np.zeros((1, BLOCK), np.uint8))
    with pytest.raises(DeltaError, match="codec"):
        Encoder(refs, io.BytesIO(), "gzip")
    enc.finish()
    with pytest.raises(DeltaError, match="finished"):
        enc.put_blocks("m", np.array([0]), np.zeros((1, BLOCK), np.uint8))
    with pytest.raises(DeltaError, match="base 'q'"):
        encode_files(refs, [Target("d", "disk", refs["r"], "q")], io.BytesIO())


def test_final_hashes_from_the_caller_are_checked(tmp_path: Path, rng: np.random.Generator) -> None:
    """A sender that knows the true image passes its digest; if the blocks it put do not add up to that
    image (a page never sent), the receiver refuses."""
    m0 = rand_blocks(rng, 8)
    m1 = m0.copy()
    m1[2] = 7
    m1[5] = 9
    refs = {"m0": write(tmp_path / "m0", m0)}
    true_digest = BlockIndex.load_or_build(write(tmp_path / "m1", m1)).digest
    for sent, ok in (([2, 5], True), ([2], False)):
        buf = io.BytesIO()
        enc = Encoder(refs, buf)
        enc.begin_target("memory", "memory", m1.nbytes, "m0")
        enc.put_blocks("memory", np.array(sent), m1[sent])
        assert (enc.digest("memory") == true_digest) == ok
        enc.finish({"memory": true_digest})
        out = tmp_path / f"out{len(sent)}"
        dec = Decoder(refs, {"memory": out})
        if ok:
            dec.feed(buf.getvalue())
            dec.close()
            assert out.read_bytes() == m1.tobytes()
        else:
            with pytest.raises(DeltaError, match="digest"):
                dec.feed(buf.getvalue())
            assert not out.exists()


def test_frames_decode_as_they_arrive(tmp_path: Path, rng: np.random.Generator) -> None:
    """A callback sees a batch as soon as its frame is complete, long before the END frame."""
    m0 = rand_blocks(rng, 64)
    refs = {"m0": write(tmp_path / "m0", m0)}
    buf = io.BytesIO()
    enc = Encoder(refs, buf, batch_blocks=4)
    enc.begin_target("memory", "memory", m0.nbytes, "m0")
    first = rand_blocks(rng, 8)
    enc.put_blocks("memory", np.arange(8, 16), first.tobytes())  # bytes work as well as arrays
    enc.put_blocks("memory", np.arange(30, 40), rand_blocks(rng, 10))
    enc.finish()
    stream = buf.getvalue()
    fl = frames(stream)
    first_blocks_end = next(int(f["end"]) for f in fl if f["type"] == 3)  # type: ignore[call-overload]
    got: list[np.ndarray] = []
    dec = Decoder(refs, {"memory": lambda b, d: got.append(d[np.argsort(b)].copy())})
    dec.feed(stream[: first_blocks_end - 1])
    assert got == []
    dec.feed(stream[first_blocks_end - 1 : first_blocks_end])
    assert len(got) == 1 and np.array_equal(got[0], first[:4])
    dec.feed(stream[first_blocks_end:])
    dec.close()
    enc2 = Encoder(refs, io.BytesIO())
    enc2.begin_target("m", "memory", 4096)
    with pytest.raises(DeltaError, match="whole number"):
        enc2.put_blocks(0, np.arange(1), b"x")


def test_stream_reference_to_a_block_rewritten_later_in_the_same_call(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    """Block 5 repeats what block 1 holds, but the same call then rewrites block 1: the receiver applies a
    frame's copies after its values, so the encoder must not emit that copy (it sends block 5 by value)."""
    m0 = rand_blocks(rng, 8)
    x, y = rand_blocks(rng, 2)
    refs = {"m0": write(tmp_path / "m0", m0)}
    buf = io.BytesIO()
    enc = Encoder(refs, buf)
    enc.begin_target("memory", "memory", m0.nbytes, "m0")
    enc.put_blocks("memory", np.array([1]), x[None])
    enc.put_blocks("memory", np.array([5, 1, 6]), np.stack([x, y, y]))
    st = enc.finish()
    assert st.kinds["memory"].by_value == 3  # x, then x again and y; the second y is a copy of block 1
    assert st.kinds["memory"].by_ref == 1
    out = tmp_path / "out"
    dec = Decoder(refs, {"memory": out})
    dec.feed(buf.getvalue())
    dec.close()
    expect = m0.copy()
    expect[[1, 5, 6]] = [y, x, y]
    assert out.read_bytes() == expect.tobytes()


def test_whole_image_sha256_option(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sha256=True: the trailer also carries the SHA-256 of every image, checked on the rebuilt file,
    also when later rounds rewrote blocks behind the decoder's window (then the file is read back)."""
    import hashlib
    import json

    from nephele.delta import decoder
    from nephele.delta import wire as W
    from nephele.errors import VerificationFailed
    from tests.delta.conftest import rebuild

    monkeypatch.setattr(decoder, "WINDOW_BLOCKS", 4)
    d0 = rand_blocks(rng, 20)
    d1 = d0.copy()
    d1[3] = 0
    d1[9:11] = rand_blocks(rng, 2)
    refs = {"d0": write(tmp_path / "d0", d0)}
    nd = write(tmp_path / "d1", np.concatenate([d1, np.zeros((12, BLOCK), np.uint8)]), size=32 * BLOCK - 9)
    buf = io.BytesIO()
    encode_files(refs, [Target("disk", "disk", nd, "d0")], buf, sha256=True)
    out = tmp_path / "out"
    decode_files(io.BytesIO(buf.getvalue()), refs, {"disk": out})
    assert out.read_bytes() == nd.read_bytes()
    fl = frames(buf.getvalue())
    end = json.loads(bytes(fl[-1]["raw"]))  # type: ignore[arg-type]
    assert end["targets"][0]["sha256"] == hashlib.sha256(nd.read_bytes()).hexdigest()
    end["targets"][0]["sha256"] = "ab" * 32
    out.unlink()
    with pytest.raises(VerificationFailed, match="SHA-256"):
        decode_files(
            io.BytesIO(rebuild([*fl[:-1], {**fl[-1], "raw": W.json_payload(end)}])), refs, {"disk": out}
        )
    assert not out.exists()

    # incremental, blocks rewritten behind the window, caller-supplied SHA-256
    final = d0.copy()
    buf = io.BytesIO()
    enc = Encoder(refs, buf, sha256=True)
    enc.begin_target("disk", "disk", d0.nbytes, "d0")
    for blocks in ([0, 1, 2, 15, 16], [1, 2, 17], [0, 19]):
        data = rand_blocks(rng, len(blocks))
        enc.put_blocks("disk", np.array(blocks), data)
        final[blocks] = data
    with pytest.raises(DeltaError, match="promises a SHA-256"):
        enc.finish()
    enc.finish(sha256s={"disk": hashlib.sha256(final.tobytes()).digest()})
    dec = Decoder(refs, {"disk": out})
    dec.feed(buf.getvalue())
    dec.close()
    assert out.read_bytes() == final.tobytes()
