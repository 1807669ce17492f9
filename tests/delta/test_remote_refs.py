"""Hash-only ("remote") references: the sender knows only the index of an image the receiver holds.

A match on such a reference is accepted by the full 128-bit block hash, without the byte comparison
local references get; the receiver's own checks (the reference digest in the HEADER, the per-target
digest at END) must turn any disagreement into a clear failure with nothing written.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from nephele.delta import BlockIndex, Decoder, Encoder, RefSet
from nephele.delta import _kernels as K
from nephele.delta.index import zero_hash
from nephele.errors import DeltaError, VerificationFailed
from tests.delta.conftest import BLOCK, rand_blocks, write


def _offer(held: Path, blocks: np.ndarray | None = None) -> BlockIndex:
    """What a receiver holding `held` sends: size, whole-index digest, hashes of the offered blocks."""
    ix = BlockIndex.load_or_build(held)
    h = np.empty_like(ix.hashes)
    h[:] = zero_hash()
    sel = np.arange(ix.nblocks) if blocks is None else blocks
    h[sel] = ix.hashes[sel]
    return BlockIndex.from_remote(ix.size, h, ix.digest)


def _encode(refs: dict[str, Path | BlockIndex], new: np.ndarray, base: str | None) -> tuple[bytes, Encoder]:
    buf = io.BytesIO()
    enc = Encoder(RefSet.open(refs), buf, "lz4")
    t = enc.begin_target("ram0", "memory", new.nbytes, base)
    order = np.random.default_rng(5).permutation(new.shape[0])  # any order, like pre-copy
    for part in np.array_split(order, 4):
        enc.put_blocks(t, part, new[part])
    enc.finish()
    enc.refs.close()
    return buf.getvalue(), enc


def _decode(stream: bytes, refs: dict[str, Path], out: Path) -> None:
    dec = Decoder(refs, {"ram0": out}, durable=False)
    try:
        dec.feed(stream)
        dec.close()
    except BaseException:
        dec.abort()
        raise


@pytest.fixture
def images(tmp_path: Path, rng: np.random.Generator) -> dict[str, object]:
    base = rand_blocks(rng, 256)
    held = np.zeros((256, BLOCK), np.uint8)  # a sparse resume file: what arrived before a cut
    held[:160] = rand_blocks(rng, 160)
    new = base.copy()
    new[:160] = held[:160]  # the pages the receiver already verified, still current
    new[20:30] = rand_blocks(rng, 10)  # changed since the cut
    new[200:210] = held[40:50]  # moved content
    recv = tmp_path / "receiver"
    recv.mkdir()
    return {
        "base": write(tmp_path / "base", base),
        "held": write(recv / "held", held),
        "new": new,
        "tmp": tmp_path,
    }


def test_round_trip_by_hash_only(images: dict[str, object]) -> None:
    base, held, new, tmp = images["base"], images["held"], images["new"], images["tmp"]
    assert isinstance(base, Path) and isinstance(held, Path) and isinstance(tmp, Path)
    assert isinstance(new, np.ndarray)
    remote = _offer(held)
    # the sender never reads the receiver's file: it is not even where the index came from any more
    moved = tmp / "receiver-copy"
    held.rename(moved)
    stream, enc = _encode({"base": base, "held": remote}, new, "base")
    assert enc.refs.readers[1] is None
    m = enc.stats.kinds["memory"]
    assert m.by_ref == 160 - 10 + 10  # the still-current pages and the moved ones, all by hash
    assert m.by_value == 10
    out = tmp / "out"
    _decode(stream, {"base": base, "held": moved}, out)
    assert out.read_bytes() == new.tobytes()
    # without the remote reference the same pages cost their bytes
    plain, _ = _encode({"base": base}, new, "base")
    assert len(stream) * 4 < len(plain)


def test_only_offered_blocks_are_referenced(images: dict[str, object]) -> None:
    base, held, new, tmp = images["base"], images["held"], images["new"], images["tmp"]
    assert isinstance(base, Path) and isinstance(held, Path) and isinstance(tmp, Path)
    assert isinstance(new, np.ndarray)
    remote = _offer(held, np.arange(0, 100))  # the receiver offers part of what it holds
    stream, enc = _encode({"base": base, "held": remote}, new, "base")
    m = enc.stats.kinds["memory"]
    assert m.by_ref == 90 + 10  # blocks 0..99 minus the 10 changed, plus the moved 40..49
    _decode(stream, {"base": base, "held": held}, tmp / "out")
    assert (tmp / "out").read_bytes() == new.tobytes()


def test_receiver_file_changed_since_its_index_was_sent(images: dict[str, object]) -> None:
    base, held, new, tmp = images["base"], images["held"], images["new"], images["tmp"]
    assert isinstance(base, Path) and isinstance(held, Path) and isinstance(tmp, Path)
    assert isinstance(new, np.ndarray)
    remote = _offer(held)
    stream, _ = _encode({"base": base, "held": remote}, new, "base")
    data = bytearray(held.read_bytes())
    data[5 * BLOCK + 7] ^= 1  # the receiver's copy is not what it described
    held.write_bytes(bytes(data))
    with pytest.raises(VerificationFailed, match="not the one the stream was made against"):
        _decode(stream, {"base": base, "held": held}, tmp / "out")
    assert not (tmp / "out").exists()
    assert not list(tmp.glob(".out.*"))  # no temporary file left either


def test_wrong_hash_in_the_offer_fails_at_end(images: dict[str, object]) -> None:
    """A hash collision, simulated: the offer says block 5 holds what the sender is about to send, the
    receiver's block 5 is something else. The digests of the reference still agree (the receiver's true
    index), so the END digest of the rebuilt image is what catches it."""
    base, held, new, tmp = images["base"], images["held"], images["new"], images["tmp"]
    assert isinstance(base, Path) and isinstance(held, Path) and isinstance(tmp, Path)
    assert isinstance(new, np.ndarray)
    true = BlockIndex.load_or_build(held)
    forged = true.hashes.copy()
    fresh = np.empty((1, 2), np.uint64)
    K.hash_blocks(np.ascontiguousarray(new[20:21]).view(np.uint64), fresh)
    forged[5] = fresh[0]  # new block 20 (changed since the cut) "is" held block 5
    remote = BlockIndex.from_remote(true.size, forged, true.digest)
    stream, enc = _encode({"base": base, "held": remote}, new, "base")
    m = enc.stats.kinds["memory"]
    # block 20 goes by the forged reference; held block 5 is no longer offered, so new block 5 goes by value
    assert (m.by_ref, m.by_value) == (160, 10)
    with pytest.raises(VerificationFailed, match="does not match the sender digest"):
        _decode(stream, {"base": base, "held": held}, tmp / "out")
    assert not (tmp / "out").exists()


def test_remote_index_checks(tmp_path: Path, images: dict[str, object]) -> None:
    base, held = images["base"], images["held"]
    assert isinstance(base, Path) and isinstance(held, Path)
    ix = BlockIndex.load_or_build(held)
    with pytest.raises(DeltaError, match="hashes for an image of"):
        BlockIndex.from_remote(ix.size, ix.hashes[:-1], ix.digest)
    with pytest.raises(DeltaError, match="bad size"):
        BlockIndex.from_remote(ix.size, ix.hashes, ix.digest[:8])
    with pytest.raises(DeltaError, match="by its path"):
        RefSet.open({"held": ix})  # a local index is passed by path (its bytes are read and confirmed)
    remote = BlockIndex.from_remote(ix.size, ix.hashes, ix.digest)
    enc = Encoder(RefSet.open({"base": base, "held": remote}), io.BytesIO(), "lz4")
    with pytest.raises(DeltaError, match="remote reference"):
        enc.begin_target("ram0", "memory", ix.size, "held")
    with pytest.raises(DeltaError, match="is remote"):
        enc.refs.reader(1)
    enc.refs.close()
