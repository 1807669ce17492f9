"""Property-based round trips: random reference images, random edits, random target sizes."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nephele.delta import Decoder, Encoder, RefSet, Target, decode_files, decoder, encode_files, encoder
from tests.delta.conftest import write

BLOCK = 4096
EDITS = ["zero", "ref", "self_ref", "stream_dup", "random", "small_edit", "text"]


def apply_edits(
    rng: np.random.Generator, img: np.ndarray, refs: list[np.ndarray], edits: list[tuple[str, int, int]]
) -> np.ndarray:
    new = img.copy()
    n = new.shape[0]
    for kind, at, length in edits:
        if n == 0:
            break
        a = at % n
        b = min(n, a + 1 + length % 8)
        k = b - a
        if kind == "zero":
            new[a:b] = 0
        elif kind == "ref":
            src = refs[at % len(refs)]
            if src.shape[0]:
                new[a:b] = src[rng.integers(0, src.shape[0], k)]
        elif kind == "self_ref":
            new[a:b] = new[rng.integers(0, n, k)]
        elif kind == "stream_dup":
            src = rng.integers(0, n, 1)[0]
            new[a:b] = new[src]
        elif kind == "random":
            new[a:b] = rng.integers(0, 256, size=(k, BLOCK), dtype=np.uint8)
        elif kind == "small_edit":
            new[a:b, rng.integers(0, BLOCK, 5)] ^= 0x11
        else:
            new[a:b] = rng.integers(97, 100, size=(k, BLOCK), dtype=np.uint8)
    return new


def image(rng: np.random.Generator, nblocks: int) -> np.ndarray:
    img = rng.integers(0, 256, size=(nblocks, BLOCK), dtype=np.uint8)
    img[rng.random(nblocks) < 0.3] = 0
    if nblocks > 4:
        img[1] = img[3]  # duplicates inside a reference
    return img


edit_st = st.lists(
    st.tuples(st.sampled_from(EDITS), st.integers(0, 10_000), st.integers(0, 100)), max_size=12
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    nbase=st.integers(0, 40),
    nmem=st.integers(1, 24),
    disk_size_delta=st.integers(-5 * BLOCK - 77, 5 * BLOCK + 77),
    edits_d=edit_st,
    edits_m=edit_st,
    codec=st.sampled_from(["lz4", "zstd", "none"]),
    batch=st.integers(1, 20),
    with_base=st.booleans(),
    sha=st.booleans(),
    window=st.sampled_from([1, 3, 8192]),
    chunk=st.sampled_from([1, 2, 7, 1024]),
)
def test_files_round_trip(
    seed: int, nbase: int, nmem: int, disk_size_delta: int, edits_d: list[tuple[str, int, int]],
    edits_m: list[tuple[str, int, int]], codec: str, batch: int, with_base: bool, sha: bool, window: int,
    chunk: int,
) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    base = image(rng, nbase)
    mem = image(rng, nmem)
    extra = max(0, -(-disk_size_delta // BLOCK))
    grown = np.concatenate([base, image(rng, extra)]) if extra else base
    new = apply_edits(rng, grown, [base, mem], edits_d)
    newm = apply_edits(rng, mem, [base, mem, new], edits_m)
    size = max(0, base.nbytes + disk_size_delta)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        base_size = max(0, base.nbytes - (seed % 3) * 1000)  # references need not be whole blocks either
        refs = {"bd": write(d / "bd", base, size=base_size), "bm": write(d / "bm", mem)}
        nd = write(d / "nd", new, size=size)
        nm = write(d / "nm", newm)
        targets = [
            Target("disk", "disk", nd, "bd" if with_base else None),
            Target("memory", "memory", nm, "bm"),
        ]
        buf = io.BytesIO()
        old_chunk, encoder.CHUNK_BLOCKS = encoder.CHUNK_BLOCKS, chunk  # frames spanning read chunks
        try:
            st_enc = encode_files(refs, targets, buf, codec=codec, batch_blocks=batch, sha256=sha)
        finally:
            encoder.CHUNK_BLOCKS = old_chunk
        outs = {"disk": d / "od", "memory": d / "om"}
        old, decoder.WINDOW_BLOCKS = decoder.WINDOW_BLOCKS, window  # small windows: many flushes
        try:
            st_dec = decode_files(io.BytesIO(buf.getvalue()), refs, outs)
        finally:
            decoder.WINDOW_BLOCKS = old
        assert outs["disk"].read_bytes() == nd.read_bytes()
        assert outs["memory"].read_bytes() == nm.read_bytes()
        for k in ("disk", "memory"):
            a, b = st_enc.kinds[k], st_dec.kinds[k]
            assert (a.by_value, a.by_ref, a.zeros, a.xor) == (b.by_value, b.by_ref, b.zeros, b.xor)
            assert a.payload_bytes == b.payload_bytes
        assert st_enc.wire_bytes == st_dec.wire_bytes == len(buf.getvalue())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    nblocks=st.integers(1, 48),
    rounds=st.lists(
        st.lists(st.tuples(st.integers(0, 47), st.sampled_from(EDITS)), min_size=1, max_size=30),
        min_size=1,
        max_size=5,
    ),
    chunk=st.integers(1, 5000),
    window=st.sampled_from([1, 4, 4096]),
)
def test_incremental_later_versions_win(
    seed: int, nblocks: int, rounds: list[list[tuple[int, str]]], chunk: int, window: int
) -> None:
    """Pre-copy style: blocks arrive in rounds, in any order, some many times; the receiver ends with the
    last version of each, its callback sees every put block, and the digest matches."""
    rng = np.random.default_rng(seed)
    base = image(rng, nblocks)
    disk = image(rng, 8)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        refs = {"m0": write(d / "m0", base), "d0": write(d / "d0", disk)}
        truth = base.copy()
        out = io.BytesIO()
        enc = Encoder(RefSet.open(refs), out, "lz4", batch_blocks=1 + seed % 7)
        enc.begin_target("memory", "memory", base.nbytes, "m0")
        seen: list[int] = []
        for rnd in rounds:
            blocks = np.array([b % nblocks for b, _ in rnd], np.int64)
            data = np.empty((blocks.size, BLOCK), np.uint8)
            for i, (b, kind) in enumerate(rnd):
                data[i] = apply_edits(
                    rng, truth[b % nblocks : b % nblocks + 1], [base, disk, truth], [(kind, 0, 0)]
                )[0]
                if kind == "stream_dup" and i:
                    data[i] = data[rng.integers(0, i)]
            enc.put_blocks("memory", blocks, data)
            for b, row in zip(blocks, data, strict=True):
                truth[b] = row  # later wins, also within one call
            seen.extend(np.unique(blocks).tolist())
        enc.finish()
        got: list[int] = []
        final = d / "m1"
        old, decoder.WINDOW_BLOCKS = decoder.WINDOW_BLOCKS, window  # small: rounds rewrite behind it
        try:
            dec = Decoder(refs, {"memory": final})
            stream = out.getvalue()
            for i in range(0, len(stream), chunk):
                dec.feed(stream[i : i + chunk])
            dec.close()
            assert final.read_bytes() == truth.tobytes()

            cb_img = base.copy()

            def on_blocks(blocks: np.ndarray, data: np.ndarray) -> None:
                cb_img[blocks] = data
                got.extend(np.unique(blocks).tolist())

            dec2 = Decoder(refs, {"memory": on_blocks})
            dec2.feed(stream)
            dec2.close()
        finally:
            decoder.WINDOW_BLOCKS = old
        assert cb_img.tobytes() == truth.tobytes()
        assert sorted(got) == sorted(seen)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), window=st.sampled_from([2, 5, 16]), nblocks=st.integers(20, 120))
def test_slow_writer_thread(seed: int, window: int, nblocks: int) -> None:
    """The decoder's copier thread lagging behind (as under load): copies from blocks of a window whose
    base copy is still under way, and frames spanning windows, must still see the right bytes."""
    import time

    rng = np.random.default_rng(seed)
    base = image(rng, nblocks)
    new = apply_edits(rng, base, [base], [("random", i * 7, 2) for i in range(nblocks // 6)])
    src = rng.integers(0, nblocks, nblocks // 3)
    dst = np.sort(rng.choice(nblocks, nblocks // 3, replace=False))
    for s, d in zip(src, dst, strict=True):
        if s < d:
            new[d] = new[s]  # copies of blocks sent earlier: STREAM entries reading back
    old_w, old_write = decoder.WINDOW_BLOCKS, decoder._Image._copy_job

    def slow(self: decoder._Image, *a: object) -> None:
        time.sleep(0.002)
        old_write(self, *a)  # type: ignore[arg-type]

    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        refs = {"b": write(d / "b", base)}
        nd = write(d / "n", new)
        buf = io.BytesIO()
        encode_files(refs, [Target("disk", "disk", nd, "b")], buf, batch_blocks=1 + seed % 9)
        decoder.WINDOW_BLOCKS, decoder._Image._copy_job = window, slow  # type: ignore[method-assign]
        try:
            decode_files(io.BytesIO(buf.getvalue()), refs, {"disk": d / "o"})
        finally:
            decoder.WINDOW_BLOCKS, decoder._Image._copy_job = old_w, old_write  # type: ignore[method-assign]
        assert (d / "o").read_bytes() == nd.read_bytes()
