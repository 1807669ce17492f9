"""Where a handoff dirtied memory and disk: one counter per 4 KiB block, greyscale PNGs and a tile pyramid.

A map lays its blocks out row by row, ``width`` blocks per row (a power of two near the square root of the
block count, so a row is a round number of bytes and the image is near square). Each time the destination
receives a block (a memory page of any pre-copy iteration, an NBD write of the disk mirror) its counter goes
up by one, saturating at 65535; brighter means dirtied more often, on a fixed scale (``LUT``) so images
taken at different moments compare: never 0, once 64, twice 112, 4x 160, 8x 208, 16x or more 255.

For the page the map is cut into a pyramid: level 0 is one pixel per block, level L one pixel per
2^L x 2^L blocks holding their maximum (a single dirty block stays visible at any zoom), each level served
as 256 x 256 tiles. A 25 GB disk (6.1 M blocks, 4096 x 1491) has 5 levels; its coarsest fits one tile.

PNGs are written with zlib and struct (8-bit greyscale, filter 0): no image library.
"""

from __future__ import annotations

import math
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np

from nephele.errors import InvalidInput

BLOCK = 4096
TILE = 256
MAX_COUNT = 0xFFFF
KINDS = ("memory", "disk")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LEVEL_CACHE_S = 1.0  # a pyramid is rebuilt at most once a second (the page polls every second)


def _lut() -> np.ndarray:
    c = np.arange(MAX_COUNT + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        v = 64.0 + 48.0 * np.log2(c)
    v[0] = 0.0
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


LUT = _lut()


def brightness(counts: np.ndarray) -> np.ndarray:
    """Counters -> grey levels (uint8), monotone, so max-pooling counters equals max-pooling grey."""
    out: np.ndarray = LUT[counts]
    return out


def grid_width(nblocks: int) -> int:
    """Blocks per row: the power of two at or above the square root of the block count (at least 1)."""
    if nblocks <= 1:
        return 1
    return 1 << math.ceil(math.log2(math.sqrt(nblocks)))


def png_grey(pixels: np.ndarray, *, level: int = 6) -> bytes:
    """An 8-bit greyscale PNG of a 2-D uint8 array (at least 1 x 1)."""
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise InvalidInput(f"a PNG needs a non-empty 2-D image, not shape {a.shape}")
    h, w = a.shape
    raw = np.zeros((h, w + 1), np.uint8)  # each scanline starts with filter type 0 (none)
    raw[:, 1:] = a

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8 bits, greyscale, deflate, no filter, no interlace
    return (
        PNG_MAGIC
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + chunk(b"IEND", b"")
    )


def _pool2(a: np.ndarray) -> np.ndarray:
    """2 x 2 max pooling (odd edges padded with 0, which never wins a max)."""
    h, w = a.shape
    ph, pw = h + (h & 1), w + (w & 1)
    if (ph, pw) != (h, w):
        p = np.zeros((ph, pw), a.dtype)
        p[:h, :w] = a
        a = p
    out: np.ndarray = np.maximum(  # four strided views: several times faster than reshape().max()
        np.maximum(a[0::2, 0::2], a[0::2, 1::2]), np.maximum(a[1::2, 0::2], a[1::2, 1::2])
    )
    return out


class BlockMap:
    """Dirtiness counters of one image (memory or disk), safe to update from several threads."""

    def __init__(self, kind: str, nblocks: int) -> None:
        if nblocks < 0:
            raise InvalidInput(f"heatmap {kind}: negative block count {nblocks}")
        self.kind = kind
        self.nblocks = max(int(nblocks), 1)
        self.width = grid_width(self.nblocks)
        self.counts = np.zeros(self.nblocks, np.uint16)
        self.version = 0  # bumped by every update: tile URLs carry it, so browsers cache per version
        self.writes = 0  # block writes seen (a block written twice counts twice)
        self._lock = threading.Lock()
        self._levels: list[np.ndarray] = []
        self._levels_version = -1
        self._levels_at = 0.0

    # -- updates -------------------------------------------------------------------------------------
    def add(self, blocks: np.ndarray) -> None:
        """Count one write of each listed block (block numbers; repeats within a call count once each)."""
        b = np.asarray(blocks, dtype=np.int64).ravel()
        if b.size == 0:
            return
        if int(b.min()) < 0:
            raise InvalidInput(f"heatmap {self.kind}: negative block number {int(b.min())}")
        with self._lock:
            top = int(b.max())
            if top >= self.nblocks:  # memory: QEMU's RAM blocks can add up to more than the guest's RAM
                grown = np.zeros(top + 1, np.uint16)
                grown[: self.nblocks] = self.counts
                self.counts, self.nblocks = grown, top + 1
            u, n = np.unique(b, return_counts=True)
            c = self.counts[u].astype(np.int64) + n
            self.counts[u] = np.minimum(c, MAX_COUNT).astype(np.uint16)
            self.writes += int(b.size)
            self.version += 1

    def add_range(self, first: int, count: int) -> None:
        if count > 0:
            self.add(np.arange(first, first + count, dtype=np.int64))

    # -- views ---------------------------------------------------------------------------------------
    @property
    def height(self) -> int:
        return -(-self.nblocks // self.width)

    def grid(self) -> np.ndarray:
        """The counters as a (height, width) array; the cells after the last block are 0."""
        with self._lock:
            flat = np.zeros(self.height * self.width, np.uint16)
            flat[: self.nblocks] = self.counts
        return flat.reshape(self.height, self.width)

    def levels(self) -> list[np.ndarray]:
        """The pyramid of counters, level 0 first; cached for LEVEL_CACHE_S while updates arrive."""
        now = time.monotonic()
        if self._levels and (self._levels_version == self.version or now - self._levels_at < LEVEL_CACHE_S):
            return self._levels
        version = self.version
        out = [self.grid()]
        while out[-1].shape[0] > TILE or out[-1].shape[1] > TILE:
            out.append(_pool2(out[-1]))
        self._levels, self._levels_version, self._levels_at = out, version, now
        return out

    def nlevels(self) -> int:
        n, h, w = 1, self.height, self.width
        while h > TILE or w > TILE:
            h, w, n = -(-h // 2), -(-w // 2), n + 1
        return n

    def tile(self, level: int, tx: int, ty: int) -> bytes:
        """One 256 x 256 tile (smaller at the right and bottom edges) of a level, as a PNG."""
        levels = self.levels()
        if not 0 <= level < len(levels):
            raise InvalidInput(f"heatmap {self.kind}: no level {level} (0..{len(levels) - 1})")
        a = levels[level]
        y0, x0 = ty * TILE, tx * TILE
        if tx < 0 or ty < 0 or y0 >= a.shape[0] or x0 >= a.shape[1]:
            raise InvalidInput(f"heatmap {self.kind}: no tile {tx},{ty} at level {level}")
        return png_grey(brightness(a[y0 : y0 + TILE, x0 : x0 + TILE]), level=1)

    def png(self) -> bytes:
        """The whole map at one pixel per block."""
        return png_grey(brightness(self.grid()))

    def summary(self) -> dict[str, int]:
        with self._lock:
            touched = int(np.count_nonzero(self.counts))
            top = int(self.counts.max()) if self.counts.size else 0
            return {
                "nblocks": self.nblocks,
                "width": self.width,
                "height": self.height,
                "levels": self.nlevels(),
                "version": self.version,
                "writes": self.writes,
                "dirtied_blocks": touched,
                "max_count": top,
            }


class Heatmap:
    """The memory and disk maps of one handoff. ``observe`` is the hook the handoff's channels call."""

    def __init__(self, memory_bytes: int, disk_bytes: int) -> None:
        self.maps = {
            "memory": BlockMap("memory", -(-int(memory_bytes) // BLOCK)),
            "disk": BlockMap("disk", -(-int(disk_bytes) // BLOCK)),
        }
        self.first_block_at: float | None = None  # wall clock of the first memory block (for the ETA)
        self.error: str | None = None  # set when an update failed: the maps stop there

    def observe(self, kind: str, blocks: np.ndarray, cls: str = "data") -> None:
        """One decoded batch: ``kind`` "memory" or "disk", block numbers, their class ("data"/"zero")."""
        m = self.maps.get(kind)
        if m is None or self.error is not None:
            return
        if kind == "memory" and self.first_block_at is None:
            self.first_block_at = time.time()
        try:
            m.add(blocks)
        except Exception as exc:  # a picture must never fail the handoff that it shows
            self.error = f"heatmap {kind}: {exc}"

    def save(self, logs_dir: Path, stem: str) -> list[Path]:
        """Write ``mem_<stem>.png`` and ``disk_<stem>.png`` beside the handoff's log (stem is
        ``from_<ip>_at_<ts>``), each written to a temporary name first so no half image is left."""
        logs_dir.mkdir(parents=True, exist_ok=True)
        out = []
        for kind, prefix in (("memory", "mem"), ("disk", "disk")):
            path = logs_dir / f"{prefix}_{stem}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            try:
                tmp.write_bytes(self.maps[kind].png())
                tmp.replace(path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            out.append(path)
        return out


def image_paths(log_path: Path) -> dict[str, Path]:
    """The heatmap images kept with a handoff's log ``handoff_from_<ip>_at_<ts>.log`` (may not exist)."""
    stem = log_path.stem.removeprefix("handoff_")
    return {"memory": log_path.with_name(f"mem_{stem}.png"), "disk": log_path.with_name(f"disk_{stem}.png")}
