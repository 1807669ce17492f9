"""How the decoder writes its output: zero blocks as holes, the base copied by the kernel (or through a
buffer where the kernel refuses), rewrites behind the copier, and durability timed apart."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np
import pytest

from nephele.delta import Decoder, Encoder, RefSet, Target, decode_files, decoder, encode_files
from nephele.errors import DeltaError
from tests.delta.conftest import rand_blocks, write

BLOCK = 4096


def _case(tmp_path: Path, rng: np.random.Generator, n: int = 600) -> tuple[dict[str, Path], Path, bytes]:
    """A base full of data and a target that zeroes most of it, keeps some and changes a few blocks."""
    base = rand_blocks(rng, n)
    new = base.copy()
    new[: n * 3 // 4] = 0
    new[n - 20 : n - 10] = rand_blocks(rng, 10)
    refs = {"b": write(tmp_path / "b", base)}
    nd = write(tmp_path / "n", new)
    buf = io.BytesIO()
    encode_files(refs, [Target("disk", "disk", nd, "b")], buf)
    return refs, nd, buf.getvalue()


def test_zero_blocks_are_holes(tmp_path: Path, rng: np.random.Generator) -> None:
    refs, nd, stream = _case(tmp_path, rng)
    out = tmp_path / "o"
    decode_files(io.BytesIO(stream), refs, {"disk": out})
    assert out.read_bytes() == nd.read_bytes()
    # 450 of the 600 blocks are zero: they take no space (the filesystem may round up a little).
    assert out.stat().st_blocks * 512 <= 200 * BLOCK


@pytest.mark.parametrize("how", ["EXDEV", "ENOSYS", "EOPNOTSUPP", "missing"])
def test_base_copy_falls_back_when_the_kernel_refuses(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    refs, nd, stream = _case(tmp_path, rng)
    calls = []
    if how == "missing":
        monkeypatch.delattr(os, "copy_file_range")
    else:

        def refuse(*a: object) -> int:
            calls.append(a)
            raise OSError(getattr(errno, how), os.strerror(getattr(errno, how)))

        monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(decoder, "WINDOW_BLOCKS", 64)  # several windows: refused once, then not retried
    out = tmp_path / "o"
    decode_files(io.BytesIO(stream), refs, {"disk": out})
    assert out.read_bytes() == nd.read_bytes()
    assert len(calls) == (0 if how == "missing" else 1)


def test_a_failing_base_copy_is_an_error_and_publishes_nothing(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs, _, stream = _case(tmp_path, rng)

    def broken(*a: object) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(DeltaError, match="Input/output error"):
        decode_files(io.BytesIO(stream), refs, {"disk": tmp_path / "o"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "b.nxi", "n"]


def test_fsync_only_when_durable_and_timed_apart(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs, nd, stream = _case(tmp_path, rng)
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    st = decode_files(io.BytesIO(stream), refs, {"disk": tmp_path / "o1"})
    assert len(synced) == 2  # the file, then its directory after the rename
    assert 0 < st.sync_seconds <= st.seconds
    synced.clear()
    st = decode_files(io.BytesIO(stream), refs, {"disk": tmp_path / "o2"}, durable=False)
    assert synced == [] and st.sync_seconds < st.seconds
    assert (tmp_path / "o2").read_bytes() == nd.read_bytes()
    got: list[np.ndarray] = []
    dec = Decoder(refs, {"disk": decoder.Sink(on_blocks=lambda b, r: got.append(b), scratch_dir=tmp_path)})
    dec.feed(stream)
    dec.close()
    assert synced == [] and got  # a scratch file is deleted at the end: no fsync


@pytest.mark.parametrize("window", [1, 3, 8, 4096])
def test_rewrites_behind_the_copier(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Pre-copy rounds: data, then zeros over data and over base blocks already copied, then data again
    over zeros, and copies (STREAM) of blocks in every state; the file and a callback agree with the truth."""
    monkeypatch.setattr(decoder, "WINDOW_BLOCKS", window)
    n = 40
    base = rand_blocks(rng, n)
    base[5:8] = 0
    refs = {"m": write(tmp_path / "m", base)}
    truth = base.copy()
    out = io.BytesIO()
    enc = Encoder(RefSet.open(refs), out, "lz4", batch_blocks=3)
    enc.begin_target("ram", "memory", n * BLOCK, "m")
    rounds = [
        (np.arange(0, n, 2), None),  # data on even blocks, in order
        (np.array([2, 4, 9, 11, 30]), 0),  # zeros over data and over untouched base blocks
        (np.array([4, 6, 9, 35]), None),  # data over zeros, over a zero base block, and far ahead
        (np.array([38, 1, 20]), "copy"),  # copies of blocks sent earlier, out of order
        (np.array([0, 5, 12]), 0),
        (np.array([2, 30, 7, 21]), "same"),  # KEEP entries of blocks zeroed, untouched, sent earlier
    ]
    for blocks, what in rounds:
        if what is None:
            data = rand_blocks(rng, blocks.size)
        elif what == "copy":
            data = truth[[4, 35, 9]]  # STREAM sources in states DATA, DATA, DATA (rewritten)
        elif what == "same":
            data = truth[blocks]
        else:
            data = np.zeros((blocks.size, BLOCK), np.uint8)
        enc.put_blocks("ram", blocks, data)
        truth[blocks] = data
    enc.finish()
    stream = out.getvalue()
    dec = Decoder(refs, {"ram": tmp_path / "o"})
    for i in range(0, len(stream), 997):
        dec.feed(stream[i : i + 997])
    dec.close()
    assert (tmp_path / "o").read_bytes() == truth.tobytes()
    img = base.copy()

    def on_blocks(b: np.ndarray, r: np.ndarray) -> None:
        img[b] = r

    dec = Decoder(refs, {"ram": decoder.Sink(on_blocks=on_blocks, scratch_dir=tmp_path)})
    dec.feed(stream)
    st = dec.close()
    assert img.tobytes() == truth.tobytes()
    assert st.kinds["memory"].kept == 5  # the last round, and zeros put over the zero base block 5
