"""Small image builders for the delta engine tests (a few MiB at most)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

BLOCK = 4096


def write(path: Path, blocks: np.ndarray, size: int | None = None) -> Path:
    data = np.ascontiguousarray(blocks, dtype=np.uint8).tobytes()
    path.write_bytes(data if size is None else data[:size])
    return path


def rand_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, BLOCK), dtype=np.uint8)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def frames(stream: bytes) -> list[dict[str, object]]:
    """Walk a stream's frames (for tests that cut or alter them): offset, end, type, payload after
    decompression, and the header fields."""
    import lz4.block
    import zstandard

    from nephele.delta import wire as W

    out: list[dict[str, object]] = []
    pos = len(W.MAGIC)
    while pos < len(stream):
        ftype, codec, target, seq, slen, rlen = W.FRAME_HEAD.unpack_from(stream, pos)
        body = stream[pos + W.FRAME_HEAD.size : pos + W.FRAME_HEAD.size + slen]
        if codec == W.LZ4:
            raw = lz4.block.decompress(body, uncompressed_size=rlen)
        elif codec == W.ZSTD:
            raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=rlen)
        else:
            raw = body
        end = pos + W.FRAME_HEAD.size + slen + W.CHECK.size
        out.append(
            {
                "offset": pos,
                "end": end,
                "type": ftype,
                "target": target,
                "seq": seq,
                "codec": codec,
                "raw": raw,
            }
        )
        pos = end
    return out


def frame(ftype: int, target: int, seq: int, raw: bytes) -> bytes:
    """A well-formed uncompressed frame with a valid checksum (whatever its content means)."""
    import xxhash

    from nephele.delta import wire as W

    head = W.FRAME_HEAD.pack(ftype, W.NONE, target, seq, len(raw), len(raw))
    return head + raw + W.CHECK.pack(xxhash.xxh3_64_intdigest(head + raw))


def rebuild(parts: list[dict[str, object]]) -> bytes:
    """A stream from (possibly edited) frame dicts, renumbered in order."""
    from nephele.delta import wire as W

    out = [W.MAGIC]
    for i, f in enumerate(parts):
        out.append(frame(int(f["type"]), int(f["target"]), i, bytes(f["raw"])))  # type: ignore[call-overload]
    return b"".join(out)
