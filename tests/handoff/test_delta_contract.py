"""What the memory channel relies on from the delta engine: with a callback sink, the receiver hands back
the current content of every block put, in put order, for any batch (KEEP entries included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nephele.delta import Decoder, Encoder, RefSet
from nephele.delta.decoder import Sink


class _Capture:
    def __init__(self) -> None:
        self.buf = bytearray()

    def write(self, b: bytes) -> int:
        self.buf += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.buf)
        self.buf.clear()
        return out


def test_decoder_callback_returns_kept_blocks_across_a_window_boundary(tmp_path: Path) -> None:
    """Sequential batches of 500 blocks (a first pre-copy pass), 90 % equal to the base (sent as KEEP): the
    batch 4000..4499 straddles the decoder's 16 MiB window boundary at block 4096."""
    rng = np.random.default_rng(1)
    n = 12288
    base = rng.integers(0, 256, (n, 4096), dtype=np.uint8)
    base[rng.random(n) < 0.3] = 0
    (tmp_path / "base").write_bytes(base.tobytes())
    cap = _Capture()
    enc = Encoder(RefSet.open({"b": tmp_path / "base"}), cap, "zstd")  # type: ignore[arg-type]
    enc.begin_target("t", "memory", n * 4096, "b")
    got: list[tuple[np.ndarray, np.ndarray]] = []
    sink = Sink(on_blocks=lambda b, r: got.append((b.copy(), r.copy())), scratch_dir=tmp_path)
    dec = Decoder({"b": tmp_path / "base"}, {"t": sink})
    dec.feed(cap.take())
    for start in range(0, n, 500):
        blocks = np.arange(start, min(n, start + 500))
        blocks = blocks[base[blocks].any(axis=1)]
        data = base[blocks].copy()
        changed = rng.random(len(blocks)) < 0.1
        data[changed] = rng.integers(0, 256, (int(changed.sum()), 4096), dtype=np.uint8)
        got.clear()
        enc.put_blocks(0, blocks, data)
        dec.feed(cap.take())
        rows = np.concatenate([r for _, r in got])
        assert np.array_equal(np.concatenate([b for b, _ in got]), blocks)
        bad = np.flatnonzero((rows != data).any(axis=1))
        assert bad.size == 0, f"batch from block {start}: blocks {blocks[bad][:5]} came back wrong"
