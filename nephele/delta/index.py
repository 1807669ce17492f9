"""Block indexes of reference images and the reference hash table.

A reference image is any image the receiver already holds (a base disk, a base memory image, an earlier
snapshot). Its index is one nph128 hash per 4 KiB block (the last partial block is hashed zero-padded),
stored beside the image as ``<image>.nxi`` so it is computed once:

    offset size  field
    0      8     magic b"NPHNXI2\\n" (2 = the nph128 version)
    8      8     image size in bytes (u64 LE)
    16     8     image mtime_ns (i64 LE)
    24     8     image inode number (u64 LE)
    32     8     number of blocks n (u64 LE)
    40     32    content digest of the image (wire.image_digest: SHA-256 over size and the hash list)
    72     16*n  per block: h1, h2 (u64 LE each)

An index whose size, mtime or inode differs from the image is stale and rebuilt (and rewritten when the
directory is writable; otherwise it is kept in memory only). Building it reads the image once in 32 MiB
chunks and hashes at memory speed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nephele.delta import _kernels as K
from nephele.errors import DeltaError

BLOCK = 4096
CHUNK_BLOCKS = 8192  # 32 MiB read chunks
GATHER_BATCH = 32  # blocks per scattered gather before the map's pages are dropped
NXI_MAGIC = b"NPHNXI2\n"  # the number changes whenever nph128 does
_NXI_HEAD = struct.Struct("<8sQqQQ32s")
_DIGEST_TAG = b"nephele-nph128-list-v1\0"


def nblocks_of(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK


def image_digest(size: int, hashes: np.ndarray) -> bytes:
    """The content digest of an image: SHA-256 over (tag, size, nph128 of every block in order).

    Costs one SHA-256 over 16 bytes per 4 KiB block (1/256 of the image), so it is cheap to recompute
    from an index or from the per-block hashes a decoder keeps while it rebuilds an image.
    """
    import hashlib

    h = hashlib.sha256(_DIGEST_TAG)
    h.update(struct.pack("<QQ", size, hashes.shape[0]))
    h.update(np.ascontiguousarray(hashes, dtype="<u8").tobytes())
    return h.digest()


_ZERO_HASH: tuple[int, int] | None = None


def zero_hash() -> tuple[int, int]:
    global _ZERO_HASH
    if _ZERO_HASH is None:
        a, b = K.zero_hash()
        _ZERO_HASH = (int(a), int(b))
    return _ZERO_HASH


def read_full(fd: int, buf: memoryview, offset: int) -> int:
    """Read into buf from offset until it is full or the file ends; returns the bytes read."""
    got = 0
    while got < len(buf):
        k = os.preadv(fd, [buf[got:]], offset + got)
        if k == 0:
            break
        got += k
    return got


def hash_file(fd: int, size: int) -> np.ndarray:
    """nph128 of every block of an open file of the given size (last block zero-padded)."""
    n = nblocks_of(size)
    out = np.empty((n, 2), dtype=np.uint64)
    buf = np.empty((min(CHUNK_BLOCKS, max(n, 1)), BLOCK), dtype=np.uint8)
    mv = buf.data.cast("B")
    for start in range(0, n, CHUNK_BLOCKS):
        cnt = min(CHUNK_BLOCKS, n - start)
        want = min(cnt * BLOCK, size - start * BLOCK)
        got = read_full(fd, mv[:want], start * BLOCK)
        if got != want:
            raise DeltaError(f"image shrank while being indexed (short read at byte {start * BLOCK + got})")
        if want < cnt * BLOCK:
            mv[want : cnt * BLOCK] = bytes(cnt * BLOCK - want)
        K.hash_blocks(buf[:cnt].view(np.uint64), out[start : start + cnt])
    return out


@dataclass
class BlockIndex:
    """The block hashes of one image plus what identifies the image's version."""

    path: Path
    size: int
    mtime_ns: int
    ino: int
    hashes: np.ndarray  # uint64[n, 2]
    digest: bytes
    # The index of an image this process cannot read (the receiver holds it; only its hashes were sent
    # here): the encoder accepts a match on it by the full 128-bit hash, with no byte comparison.
    remote: bool = False

    @property
    def nblocks(self) -> int:
        return int(self.hashes.shape[0])

    @classmethod
    def from_remote(cls, size: int, hashes: np.ndarray, digest: bytes) -> BlockIndex:
        """The index of an image only the receiver holds, from what it sent: the size and digest of its
        whole index (the decoder checks them against the image it holds), and the hashes of the blocks
        it offers, the others set to the zero block's hash (never offered as references)."""
        if size < 0 or len(digest) != 32:
            raise DeltaError(f"remote index: bad size {size} or digest of {len(digest)} bytes")
        h = np.ascontiguousarray(hashes, dtype=np.uint64)
        if h.ndim != 2 or h.shape != (nblocks_of(size), 2):
            raise DeltaError(f"remote index: {h.shape} hashes for an image of {nblocks_of(size)} blocks")
        return cls(Path(), size, 0, 0, h, bytes(digest), remote=True)

    @staticmethod
    def index_path(image: Path) -> Path:
        return image.with_name(image.name + ".nxi")

    @classmethod
    def load_or_build(cls, image: Path, *, cache: bool = True) -> BlockIndex:
        """The index of image, from ``<image>.nxi`` when it is current, otherwise computed (and saved)."""
        image = Path(image)
        try:
            fd = os.open(image, os.O_RDONLY)
        except OSError as exc:
            raise DeltaError(f"cannot open image {image}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if cache:
                idx = cls._load(image, st)
                if idx is not None:
                    return idx
            hashes = hash_file(fd, st.st_size)
            st2 = os.fstat(fd)
            if (st2.st_size, st2.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise DeltaError(f"image {image} changed while being indexed")
        finally:
            os.close(fd)
        idx = cls(image, st.st_size, st.st_mtime_ns, st.st_ino, hashes, image_digest(st.st_size, hashes))
        if cache:
            idx._save()
        return idx

    @classmethod
    def _load(cls, image: Path, st: os.stat_result) -> BlockIndex | None:
        p = cls.index_path(image)
        try:
            with open(p, "rb") as f:
                head = f.read(_NXI_HEAD.size)
                if len(head) != _NXI_HEAD.size:
                    return None
                magic, size, mtime, ino, n, digest = _NXI_HEAD.unpack(head)
                if magic != NXI_MAGIC or (size, mtime, ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
                    return None
                if n != nblocks_of(size):
                    return None
                raw = f.read(16 * n + 1)
        except OSError:
            return None
        if len(raw) != 16 * n:
            return None
        hashes = np.frombuffer(raw, dtype="<u8").astype(np.uint64).reshape(n, 2)
        if image_digest(size, hashes) != digest:
            return None  # a damaged index is recomputed, never trusted
        return cls(image, size, mtime, ino, hashes, digest)

    def _save(self) -> None:
        p = self.index_path(self.path)
        head = _NXI_HEAD.pack(NXI_MAGIC, self.size, self.mtime_ns, self.ino, self.nblocks, self.digest)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        except OSError:
            return  # read-only directory: keep the index in memory only
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(fd, os.stat(self.path).st_mode & 0o666)  # as readable as the image, no more
                f.write(head)
                f.write(np.ascontiguousarray(self.hashes, dtype="<u8").tobytes())
            os.replace(tmp, p)
        except OSError:
            Path(tmp).unlink(missing_ok=True)


class RefReader:
    """Random access to the 4 KiB blocks of one image (last block zero-padded, beyond the end: zeros)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.nblocks = nblocks_of(size)
        self._fd = os.open(self.path, os.O_RDONLY)
        self._full = size // BLOCK
        self._mm: mmap.mmap | None = None
        self._arr: np.ndarray | None = None
        if self._full:
            self._mm = mmap.mmap(self._fd, self._full * BLOCK, prot=mmap.PROT_READ)
            self._arr = np.frombuffer(self._mm, np.uint8).reshape(self._full, BLOCK)

    @property
    def fd(self) -> int:
        return self._fd

    def view(self, start: int, count: int) -> np.ndarray | None:
        """Blocks start..start+count straight from the map (no copy), if they are all whole blocks.
        Call drop() when done so the pages do not stay mapped (counted as RSS)."""
        if self._arr is None or start + count > self._full:
            return None
        if os.fstat(self._fd).st_size < self.size:
            raise DeltaError(f"reference image {self.path} shrank while in use")
        return self._arr[start : start + count]

    def mapped(self) -> np.ndarray | None:
        """All whole blocks straight from the map (uint8[full, 4096], no copy), for reads by index.
        Call drop_all() when done."""
        if self._arr is None:
            return None
        if os.fstat(self._fd).st_size < self.size:
            raise DeltaError(f"reference image {self.path} shrank while in use")
        return self._arr

    def drop_all(self) -> None:
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)

    def drop(self, start: int, count: int) -> None:
        if self._mm is not None and count > 0:
            self._mm.madvise(mmap.MADV_DONTNEED, start * BLOCK, count * BLOCK)

    def gather(self, blocks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """out[i] = block blocks[i].

        Whole blocks are copied out of a read-only map with one numpy gather per 1024 blocks, then the
        map's pages are dropped again (MADV_DONTNEED): the kernel maps 64 KiB around every faulting page,
        so scattered reads would otherwise pile up hundreds of MiB of (page-cache) RSS. A syscall per
        block would be slower and, next to the reader and writer threads, convoy on the GIL. References
        are immutable images; the size is checked first so a truncated file is an error, not a SIGBUS.
        """
        blocks = np.asarray(blocks, dtype=np.int64)
        if out is None:
            out = np.empty((blocks.shape[0], BLOCK), dtype=np.uint8)
        if blocks.size == 0:
            return out
        first = int(blocks[0])
        if blocks.size > 1 and int(blocks[-1]) - first == blocks.size - 1 and (np.diff(blocks) == 1).all():
            self.read_range(first, out)  # one ascending run (pages streamed in order): one read
            return out
        if os.fstat(self._fd).st_size < self.size:
            raise DeltaError(f"reference image {self.path} shrank while in use")
        inside = blocks < self._full
        if self._arr is not None and self._mm is not None:
            for i in range(0, blocks.size, GATHER_BATCH):
                np.take(
                    self._arr,
                    blocks[i : i + GATHER_BATCH],
                    axis=0,
                    out=out[i : i + GATHER_BATCH],
                    mode="clip",
                )
                self._mm.madvise(mmap.MADV_DONTNEED)
        for i in np.flatnonzero(~inside).tolist():  # the zero-padded last block, or beyond the end
            self.read_range(int(blocks[i]), out[i : i + 1])
        return out

    def read_range(self, start: int, out: np.ndarray) -> None:
        """Fill out (uint8[k, 4096]) with blocks start..start+k, zero beyond the end of the image."""
        mv = out.data.cast("B")
        want = max(0, min(len(mv), self.size - start * BLOCK))
        got = read_full(self._fd, mv[:want], start * BLOCK) if want else 0
        if got < len(mv):
            mv[got:] = bytes(len(mv) - got)

    def close(self) -> None:
        self._arr = None
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive (say, in a traceback) keeps the map
                self._mm.close()
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class RefSet:
    """The reference images of a stream, in wire order, with the combined dedup hash table."""

    ids: list[str]
    indexes: list[BlockIndex]
    readers: list[RefReader | None] = field(default_factory=list)  # None: a remote index (no bytes here)
    keys: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint64))
    vals: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    h2s: np.ndarray = field(default_factory=lambda: np.zeros(1, np.uint64))

    @classmethod
    def open(cls, refs: Mapping[str, Path | BlockIndex], *, cache: bool = True, table: bool = True) -> RefSet:
        """refs: id -> the image's path, or a remote BlockIndex (BlockIndex.from_remote) for an image
        only the receiver holds."""
        ids = list(refs)
        for rid in ids:
            if not rid or len(rid.encode()) > 255:
                raise DeltaError(f"reference id {rid!r} must be 1 to 255 bytes")
        indexes = []
        for r in ids:
            v = refs[r]
            if isinstance(v, BlockIndex):
                if not v.remote:
                    raise DeltaError(f"reference {r!r}: pass a local image by its path, not its index")
                indexes.append(v)
            else:
                indexes.append(BlockIndex.load_or_build(Path(v), cache=cache))
        rs = cls(ids, indexes)
        rs.readers = [None if ix.remote else RefReader(ix.path, ix.size) for ix in indexes]
        if table:
            rs.build_table()
        return rs

    def build_table(self) -> None:
        total = sum(ix.nblocks for ix in self.indexes)
        cap = 1 << max(4, int(2 * total + 1).bit_length())
        self.keys = np.zeros(cap, np.uint64)
        self.vals = np.zeros(cap, np.int64)
        self.h2s = np.zeros(cap, np.uint64)
        for r, ix in enumerate(self.indexes):
            K.ref_table_insert(self.keys, self.vals, self.h2s, ix.hashes, r)

    def position(self, rid: str) -> int:
        try:
            return self.ids.index(rid)
        except ValueError:
            raise DeltaError(
                f"unknown reference image {rid!r} (known: {', '.join(self.ids) or 'none'})"
            ) from None

    def reader(self, pos: int) -> RefReader:
        """The reader of a local reference image (a remote one has no bytes here)."""
        r = self.readers[pos]
        if r is None:
            raise DeltaError(f"reference image {self.ids[pos]!r} is remote: only its hashes are known here")
        return r

    def close(self) -> None:
        for r in self.readers:
            if r is not None:
                r.close()
