"""The receiving side: parse frames as they arrive, rebuild each target, verify, then publish.

Each target is rebuilt in a temporary file beside its output (or a scratch file for a callback-only sink).
The blocks a frame carries are written straight into that file (zero blocks not at all: they stay holes);
a per-block state says what the file holds. Once the stream has moved past a 16 MiB window, a copier
thread has the kernel copy the window's untouched blocks from the base image (copy_file_range; through a
buffer where the kernel refuses), leaving zero base blocks as holes. Blocks written behind that point (a
later pre-copy iteration) wait for the copies first. The decoder keeps the nph128 hash of every block it
holds (hashed as it writes them, or taken from the base's index for untouched blocks), so the END frame's
digests are checked without reading the images back. Only then, in close(), are the files fsynced (timed
apart: StreamStats.sync_seconds) and renamed. On any error every temporary file is removed and nothing
appears at the output paths.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, NoReturn

import lz4.block
import numpy as np
import xxhash
import zstandard

from nephele.delta import _kernels as K
from nephele.delta import wire as W
from nephele.delta.index import (
    BLOCK,
    BlockIndex,
    RefReader,
    image_digest,
    nblocks_of,
    read_full,
    zero_hash,
)
from nephele.delta.stats import StreamStats
from nephele.errors import DeltaError, NepheleError, StreamCorrupt, StreamTruncated, VerificationFailed

WINDOW_BLOCKS = 4096  # 16 MiB: the base is copied a window at a time, behind the stream


def _verification(msg: str, *, offset: int) -> VerificationFailed:
    return VerificationFailed(f"{msg} (at stream byte {offset})")


BlockCallback = Callable[[np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Sink:
    """Where a rebuilt target goes: a file (published only after verification), a callback receiving
    every rebuilt batch as (block_numbers int64[n], data uint8[n, 4096]) in stream order, or both. A
    callback-only sink still keeps the image in a scratch file (in scratch_dir) to resolve references."""

    path: Path | None = None
    on_blocks: BlockCallback | None = None
    scratch_dir: Path | None = None


SinkSpec = Sink | Path | str | BlockCallback


def _as_sink(spec: SinkSpec) -> Sink:
    if isinstance(spec, Sink):
        return spec
    if isinstance(spec, str | os.PathLike):
        return Sink(path=Path(spec))
    if callable(spec):
        return Sink(on_blocks=spec)
    raise DeltaError(f"not a sink: {spec!r}")


# Per-block state of a target being rebuilt: what the receiver holds at each block right now.
UNTOUCHED = 0  # the initial content (the base block, or zeros); in the file once its window is copied
DATA = 1  # written by the stream, in the file
ZEROED = 2  # set to zeros by the stream (a hole unless the block had been written before)

# copy_file_range refusals that mean "copy it yourself" (other filesystem, old kernel, unsupported)
_COPY_ERRNOS = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
MAX_COPY_JOBS = 8  # base copies queued for the copier thread before the decoder waits for the oldest


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of every run of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _block_runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) index ranges of runs of consecutive block numbers in an ascending array."""
    if blocks.size == 0:
        return []
    cut = np.flatnonzero(np.diff(blocks) != 1) + 1
    edges = [0, *cut.tolist(), int(blocks.size)]
    return list(itertools.pairwise(edges))


def _write_all(fd: int, mv: memoryview, off: int) -> None:
    while len(mv):
        k = os.pwrite(fd, mv, off)
        mv = mv[k:]
        off += k


def copy_range(src: int, dst: int, off: int, end: int, *, kernel: bool = True, src_name: object = "") -> bool:
    """Copy bytes [off, end) of src to the same offsets of dst: by the kernel (copy_file_range: no pass
    through this process, a reflink where the filesystem can), else through a buffer when the kernel or
    filesystem refuses (another filesystem, an old kernel, not Linux) or kernel=False. Returns whether
    the kernel copy may be tried again."""
    cfr = getattr(os, "copy_file_range", None) if kernel else None
    while off < end and cfr is not None:
        try:
            k = cfr(src, dst, end - off, off, off)
        except OSError as exc:
            if exc.errno not in _COPY_ERRNOS:
                raise
            cfr = None
            break
        if k <= 0:
            raise DeltaError(f"base image {src_name} shrank while in use")
        off += k
    buf = bytearray(min(end - off, 1 << 20)) if off < end else bytearray()
    while off < end:
        mv = memoryview(buf)[: min(len(buf), end - off)]
        k = os.preadv(src, [mv], off)
        if k <= 0:
            raise DeltaError(f"base image {src_name} shrank while in use")
        _write_all(dst, mv[:k], off)
        off += k
    return cfr is not None


class _Image:
    """A target image being rebuilt in a temporary file.

    Blocks the stream sends are written straight to the file (zero blocks not at all: they stay holes);
    ``state`` records per block what the file should hold. The blocks left UNTOUCHED hold the base image's
    content, which is copied file to file by a copier thread (copy_file_range) once the stream has moved
    past their 16 MiB window; zero base blocks stay holes. Blocks sent behind that point (a later pre-copy
    round) first wait for the copies, so a copy never overwrites what the stream wrote.
    """

    def __init__(
        self,
        sink: Sink,
        name: str,
        size: int,
        base: RefReader | None,
        base_hashes: np.ndarray | None,
        sha256: bool,
        durable: bool,
    ) -> None:
        self.final = sink.path
        self.size = size
        self.nblocks = nblocks_of(size)
        self.base = base
        self.base_n = base.nblocks if base is not None else 0
        # Which base blocks hold data (from the base's index): zero ones become holes, not copies.
        zh = np.array(zero_hash(), np.uint64)
        self.base_data = (base_hashes != zh).any(axis=1) if base_hashes is not None else np.zeros(0, np.bool_)
        d = sink.path.parent if sink.path is not None else sink.scratch_dir
        prefix = f".{sink.path.name}." if sink.path is not None else f"nephele-{name}."
        try:
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=d)
        except OSError as exc:
            raise DeltaError(f"cannot create a temporary file for target {name!r} in {d}: {exc}") from exc
        self.fd = fd
        self.tmp = Path(tmp)
        os.ftruncate(fd, self.nblocks * BLOCK)
        # A scratch file (callback-only sink) is deleted at the end: making it durable would be wasted.
        self.durable = durable and sink.path is not None
        self.state = np.zeros(self.nblocks, np.uint8)
        self.W = max(1, WINDOW_BLOCKS)
        self.wstart = 0  # blocks below have been handed to the copier
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nephele-delta-copy")
        self._jobs: deque[Future[None]] = deque()
        # SHA-256 of the whole image, when the stream carries one: computed by the copier as the windows
        # complete in order; a write behind the window (a later pre-copy round) means reading back.
        self._sha = hashlib.sha256() if sha256 else None
        self._in_order = True
        self._zeros: np.ndarray | None = None
        self._kernel_copy = True  # copy_file_range works here (until it says otherwise)

    # -- the copier ----------------------------------------------------------------------------------
    def advance(self, block: int) -> None:
        """The stream has reached `block`: hand every whole window below its window to the copier."""
        stop = min(self.nblocks, block // self.W * self.W)
        if stop > self.wstart:
            self._submit(self.wstart, stop)

    def _submit(self, first: int, stop: int) -> None:
        k = max(0, min(stop, self.base_n) - first)
        copy: list[tuple[int, int]] = []
        if k and self.base is not None:  # which rows still need the base: decided now, on this thread
            clean = (self.state[first : first + k] == UNTOUCHED) & self.base_data[first : first + k]
            copy = [(first + a, first + b) for a, b in _runs(clean)]
        self.wstart = stop
        if not copy and self._sha is None:
            return
        self._jobs.append(self._pool.submit(self._copy_job, first, stop, copy))
        while len(self._jobs) > MAX_COPY_JOBS:
            self._jobs.popleft().result()

    def _copy_job(self, first: int, stop: int, copy: list[tuple[int, int]]) -> None:
        assert self.base is not None or not copy
        for a, b in copy:
            assert self.base is not None
            end = min(b * BLOCK, self.base.size)
            self._kernel_copy = copy_range(
                self.base.fd, self.fd, a * BLOCK, end, kernel=self._kernel_copy, src_name=self.base.path
            )
        if self._sha is not None:  # hash what is now in the file, in order
            buf = bytearray(min(stop - first, 2048) * BLOCK)
            off, end = first * BLOCK, min(stop * BLOCK, self.size)
            while off < end:
                mv = memoryview(buf)[: min(len(buf), end - off)]
                if read_full(self.fd, mv, off) != len(mv):
                    raise DeltaError(f"short read back of the rebuilt image at byte {off}")
                self._sha.update(mv)
                off += len(mv)

    def _wait(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()

    def _behind(self, blocks: np.ndarray) -> None:
        """Before writing blocks below the copier's mark: let its copies finish (they could overwrite)."""
        if blocks.size and int(blocks.min()) < self.wstart:
            self._wait()
            self._in_order = False

    # -- writing -------------------------------------------------------------------------------------
    def write(self, blocks: np.ndarray, rows: np.ndarray) -> None:
        """Write rows (uint8[n, 4096], C-contiguous) at blocks (ascending, distinct)."""
        self._behind(blocks)
        for a, b in _block_runs(blocks):
            _write_all(self.fd, rows[a:b].data.cast("B"), int(blocks[a]) * BLOCK)
        self.state[blocks] = DATA

    def zero(self, blocks: np.ndarray) -> None:
        """Set blocks (ascending, distinct) to zeros: nothing to write where the file still has a hole."""
        s = self.state[blocks]
        base_there = (blocks < self.wstart) & (s == UNTOUCHED) & (blocks < self.base_n)
        if base_there.any():
            base_there[base_there] = self.base_data[blocks[base_there]]
        need = blocks[(s == DATA) | base_there]
        if need.size:
            self._behind(need)
            if self._zeros is None:
                self._zeros = np.zeros((256, BLOCK), np.uint8)
            for a, b in _block_runs(need):
                for c in range(a, b, 256):
                    n = min(256, b - c)
                    _write_all(self.fd, self._zeros[:n].data.cast("B"), int(need[c]) * BLOCK)
        self.state[blocks] = ZEROED

    # -- reading -------------------------------------------------------------------------------------
    def read(self, blocks: np.ndarray) -> np.ndarray:
        """The current content of some blocks (for STREAM copies and for callbacks)."""
        out = np.empty((blocks.shape[0], BLOCK), np.uint8)
        s = self.state[blocks]
        data = np.flatnonzero(s == DATA)
        if data.size:  # in the file (written synchronously)
            order = data[np.argsort(blocks[data], kind="stable")]
            bs = blocks[order]
            tmp = np.empty((order.size, BLOCK), np.uint8)
            for a, b in _block_runs(bs):
                if read_full(self.fd, tmp[a:b].data.cast("B"), int(bs[a]) * BLOCK) != (b - a) * BLOCK:
                    raise DeltaError(f"short read of the rebuilt image at block {int(bs[a])}")
            out[order] = tmp
        out[s == ZEROED] = 0
        init = np.flatnonzero(s == UNTOUCHED)
        if init.size:
            out[init] = 0
            has = init[blocks[init] < self.base_n]
            if has.size and self.base is not None:
                out[has] = self.base.gather(blocks[has])
        return out

    # -- the end -------------------------------------------------------------------------------------
    def finish(self) -> bytes | None:
        """Copy the rest of the base; returns the image's SHA-256 if the stream carries one."""
        if self.wstart < self.nblocks:
            self._submit(self.wstart, self.nblocks)
        self._wait()
        self._pool.shutdown()
        os.ftruncate(self.fd, self.size)
        if self._sha is None:
            return None
        if self._in_order:
            return self._sha.digest()
        h = hashlib.sha256()  # blocks were rewritten behind the window: hash the file as it is now
        buf = bytearray(16 << 20)
        off = 0
        while k := os.preadv(self.fd, [buf], off):
            h.update(memoryview(buf)[:k])
            off += k
        return h.digest()

    def sync(self) -> None:
        if self.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def publish(self) -> None:
        if self.final is None:
            self.tmp.unlink(missing_ok=True)
            return
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.final)
        if not self.durable:
            return
        try:
            dfd = os.open(self.final.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass

    def abort(self) -> None:
        for f in self._jobs:
            f.cancel()
        with contextlib.suppress(Exception):  # the stream already failed; this only drains the copier
            self._wait()
        self._pool.shutdown()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


@dataclass
class _Ref:
    id: str
    index: BlockIndex
    reader: RefReader


@dataclass
class _Target:
    index: int
    name: str
    kind: str
    size: int
    nblocks: int
    base: int | None
    image: _Image
    hashes: np.ndarray  # nph128 of what this receiver holds at each block
    on_blocks: BlockCallback | None


class Decoder:
    """Incremental decoder: feed() bytes as they arrive, then close() to verify and publish.

    sinks maps each target name to a Sink, an output path or a block callback. Errors raise
    StreamCorrupt / StreamTruncated / VerificationFailed (with the stream offset and frame number) and
    remove every temporary file."""

    def __init__(
        self,
        refs: Mapping[str, Path],
        sinks: Mapping[str, SinkSpec],
        *,
        max_target_bytes: int = 1 << 40,
        durable: bool = True,
    ) -> None:
        """durable=False skips fsync (scratch outputs, benchmarks of the engine alone): outputs are still
        published only after verification, but a crash soon after may lose them."""
        self.durable = durable
        self._ref_paths = {k: Path(v) for k, v in refs.items()}
        self._sinks = {k: _as_sink(v) for k, v in sinks.items()}
        paths = [s.path.resolve() for s in self._sinks.values() if s.path is not None]
        if len(set(paths)) != len(paths):
            raise DeltaError("two targets would be written to the same output file")
        # The decoder keeps 16 bytes per block of every target, so a hostile size is refused up front.
        self.max_target_bytes = max_target_bytes
        self.stats = StreamStats()
        self._t0 = time.perf_counter()
        self._buf = bytearray()
        self._bstart = 0
        self._pos = 0  # stream offset of _buf[0]
        self._magic = False
        self._seq = 0
        self._frame_off = 0
        self._refs: list[_Ref] | None = None
        self._targets: list[_Target] = []
        self._names: set[str] = set()
        self._ended = False
        self._want_sha = False
        self._closed = False
        self._failed: BaseException | None = None
        self._zd = zstandard.ZstdDecompressor()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is not None or not self._closed:
            self.abort()

    # -- errors ------------------------------------------------------------------------------------
    def _corrupt(self, msg: str) -> NoReturn:
        raise StreamCorrupt(f"frame {self._seq}: {msg}", offset=self._frame_off)

    def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        for t in self._targets:
            t.image.abort()
        if self._refs is not None:
            for r in self._refs:
                r.reader.close()
        self._closed = True

    def _guard(self, fn: Callable[[], None]) -> None:
        if self._failed is not None:
            raise DeltaError(f"decoder already failed: {self._failed}")
        if self._closed:
            raise DeltaError("decoder is closed")
        try:
            fn()
        except NepheleError as exc:
            self._failed = exc
            self.abort()
            raise
        except OSError as exc:
            self._failed = exc
            self.abort()
            raise DeltaError(f"writing the rebuilt image failed: {exc}") from exc
        except BaseException as exc:
            self._failed = exc
            self.abort()
            raise

    # -- input -------------------------------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) == 0:
            return

        def run() -> None:
            if self._bstart > (1 << 20) and self._bstart * 2 > len(self._buf):
                del self._buf[: self._bstart]
                self._pos += self._bstart
                self._bstart = 0
            self._buf += data
            self._parse()

        self._guard(run)

    def _parse(self) -> None:
        buf = self._buf
        while True:
            avail = len(buf) - self._bstart
            self._frame_off = self._pos + self._bstart
            if not self._magic:
                if avail < len(W.MAGIC):
                    if bytes(buf[self._bstart :]) != W.MAGIC[:avail]:
                        raise StreamCorrupt("not a nephele delta stream (bad magic)", offset=0)
                    return
                if bytes(buf[self._bstart : self._bstart + len(W.MAGIC)]) != W.MAGIC:
                    raise StreamCorrupt("not a nephele delta stream (bad magic)", offset=0)
                self._bstart += len(W.MAGIC)
                self.stats.wire_bytes += len(W.MAGIC)
                self._magic = True
                continue
            if avail == 0:
                return
            if self._ended:
                raise StreamCorrupt(f"{avail} bytes of data after the END frame", offset=self._frame_off)
            if avail < W.FRAME_HEAD.size:
                return
            ftype, codec, target, seq, slen, rlen = W.FRAME_HEAD.unpack_from(buf, self._bstart)
            if ftype not in W.FRAME_TYPES:
                self._corrupt(f"unknown frame type {ftype}")
            if codec not in (W.NONE, W.LZ4, W.ZSTD):
                self._corrupt(f"unknown codec {codec}")
            if slen > W.MAX_STORED or rlen > W.MAX_RAW or (codec == W.NONE and slen != rlen):
                self._corrupt(f"bad frame lengths (stored {slen}, raw {rlen})")
            total = W.FRAME_HEAD.size + slen + W.CHECK.size
            if avail < total:
                return
            end = self._bstart + W.FRAME_HEAD.size + slen
            with memoryview(buf) as mv, mv[self._bstart + W.FRAME_HEAD.size : end] as stored:
                (check,) = W.CHECK.unpack_from(mv, end)
                if xxhash.xxh3_64_intdigest(mv[self._bstart : end]) != check:
                    self._corrupt("checksum mismatch")
                if seq != self._seq:
                    self._corrupt(f"frame number {seq} out of sequence")
                raw = self._decompress(codec, stored, rlen)  # straight from the input buffer
            name = W.FRAME_TYPES[ftype]
            if self._refs is None and ftype != W.HEADER:
                self._corrupt(f"{name} frame before the HEADER")
            if ftype == W.HEADER:
                self._on_header(target, raw)
            elif ftype == W.TARGET:
                self._on_target(target, raw)
            elif ftype == W.BLOCKS:
                self._on_blocks(target, raw, slen)
            else:
                self._on_end(target, raw)
            self._bstart += total
            self._seq += 1
            self.stats.wire_bytes += total
            self.stats.frames += 1

    def _decompress(self, codec: int, stored: memoryview, rlen: int) -> bytes | bytearray:
        try:
            if codec == W.NONE:
                raw: bytes | bytearray = bytes(stored)
            elif codec == W.LZ4:
                raw = lz4.block.decompress(stored, uncompressed_size=rlen, return_bytearray=True)
            else:
                raw = self._zd.decompress(stored, max_output_size=rlen)
        except (lz4.block.LZ4BlockError, zstandard.ZstdError, ValueError) as exc:
            self._corrupt(f"payload does not decompress: {exc}")
        if len(raw) != rlen:
            self._corrupt(f"payload decompressed to {len(raw)} bytes, header says {rlen}")
        return raw

    def _json(self, raw: bytes | bytearray) -> dict[str, Any]:
        if len(raw) > W.MAX_JSON:
            self._corrupt("JSON payload too large")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._corrupt(f"bad JSON payload: {exc}")
        if not isinstance(obj, dict):
            self._corrupt("JSON payload is not an object")
        return obj

    # -- frames ------------------------------------------------------------------------------------
    def _on_header(self, target: int, raw: bytes | bytearray) -> None:
        if self._refs is not None or self._seq != 0:
            self._corrupt("duplicate HEADER frame")
        if target != W.NO_TARGET:
            self._corrupt("HEADER frame names a target")
        h = self._json(raw)
        if h.get("format") != W.FORMAT:
            self._corrupt(f"unsupported format version {h.get('format')!r} (this decoder reads {W.FORMAT})")
        if h.get("block_size") != BLOCK:
            self._corrupt(f"unsupported block size {h.get('block_size')!r}")
        sha = h.get("sha256", False)
        if not isinstance(sha, bool):
            self._corrupt("HEADER field sha256 must be true or false")
        self._want_sha = sha
        refs = h.get("refs")
        if not isinstance(refs, list):
            self._corrupt("HEADER has no refs list")
        out: list[_Ref] = []
        self._refs = out
        seen: set[str] = set()
        for r in refs:
            if not (
                isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("digest"), str)
            ):
                self._corrupt(f"bad reference entry {r!r}")
            if not isinstance(r.get("size"), int):
                self._corrupt(f"bad reference entry {r!r}")
            rid = r["id"]
            if rid in seen:
                self._corrupt(f"reference {rid!r} listed twice")
            seen.add(rid)
            path = self._ref_paths.get(rid)
            if path is None:
                self._corrupt(f"the stream needs reference image {rid!r}, which this receiver does not hold")
            ix = BlockIndex.load_or_build(path)
            if ix.size != r["size"] or ix.digest.hex() != r["digest"]:
                raise VerificationFailed(
                    f"reference image {rid!r} at {path} is not the one the stream was made against "
                    f"(size {ix.size}, digest {ix.digest.hex()[:16]}… ; stream expects size {r['size']}, "
                    f"digest {str(r['digest'])[:16]}…)"
                )
            out.append(_Ref(rid, ix, RefReader(path, ix.size)))

    def _on_target(self, target: int, raw: bytes | bytearray) -> None:
        assert self._refs is not None
        info = self._json(raw)
        idx, name, kind, size, base = (info.get(k) for k in ("index", "name", "kind", "size", "base"))
        if target != len(self._targets) or idx != target:
            self._corrupt(f"TARGET frame declares index {idx!r}, expected {len(self._targets)}")
        if not isinstance(name, str) or not name or name in self._names:
            self._corrupt(f"bad or repeated target name {name!r}")
        if kind not in W.KINDS:
            self._corrupt(f"target {name!r}: bad kind {kind!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 1 << 50:
            self._corrupt(f"target {name!r}: bad size {size!r}")
        if size > self.max_target_bytes:
            self._corrupt(
                f"target {name!r}: size {size} exceeds this receiver's limit {self.max_target_bytes}"
            )
        bpos: int | None = None
        if base is not None:
            ids = [r.id for r in self._refs]
            if base not in ids:
                self._corrupt(f"target {name!r}: base {base!r} is not a reference of this stream")
            bpos = ids.index(base)
        sink = self._sinks.get(name)
        if sink is None:
            raise DeltaError(f"the stream carries target {name!r} but no output was given for it")
        n = nblocks_of(size)
        hashes = np.empty((n, 2), np.uint64)
        hashes[:] = zero_hash()
        reader = None
        if bpos is not None:
            bref = self._refs[bpos]
            reader = bref.reader
            k = min(n, bref.index.nblocks)
            hashes[:k] = bref.index.hashes[:k]
        base_hashes = self._refs[bpos].index.hashes if bpos is not None else None
        image = _Image(sink, name, size, reader, base_hashes, self._want_sha, self.durable)
        self._targets.append(_Target(target, name, kind, size, n, bpos, image, hashes, sink.on_blocks))
        self._names.add(name)
        self.stats.kind(kind)
        self.stats.input_bytes += size

    def _on_blocks(self, target: int, raw: bytes | bytearray, slen: int) -> None:
        assert self._refs is not None
        if target >= len(self._targets):
            self._corrupt(f"BLOCKS frame for unknown target {target}")
        st = self._targets[target]
        if len(raw) < W.BLOCKS_HEAD.size:
            self._corrupt("BLOCKS payload too short")
        n, nval, nargs, reserved = W.BLOCKS_HEAD.unpack_from(raw, 0)
        if reserved != 0 or len(raw) != W.blocks_raw_len(n, nval, nargs):
            self._corrupt(
                f"BLOCKS payload of {len(raw)} bytes does not match its counts ({n}, {nval}, {nargs})"
            )
        if n == 0:
            self._corrupt("empty BLOCKS frame")
        if n > W.MAX_ENTRIES:
            self._corrupt(f"BLOCKS frame with {n} entries (at most {W.MAX_ENTRIES})")
        p = W.BLOCKS_HEAD.size
        deltas = np.frombuffer(raw, "<i8", n, p)
        p += 8 * n
        ops = np.frombuffer(raw, np.uint8, n, p)
        p += n
        args = np.frombuffer(raw, "<i8", nargs, p).astype(np.int64)
        p += 8 * nargs
        vals = np.frombuffer(raw, np.uint8, nval * BLOCK, p).reshape(nval, BLOCK)
        with np.errstate(over="ignore"):
            blocks = np.cumsum(deltas.astype(np.int64))
        if int(blocks.min()) < 0 or int(blocks.max()) >= st.nblocks:
            self._corrupt(f"block number outside target {st.name!r} (0..{st.nblocks - 1})")
        if np.unique(blocks).size != n:
            self._corrupt("a block is listed twice in one frame")
        if int(ops.max()) > K.KEEP:
            self._corrupt(f"unknown block op {int(ops.max())}")
        isval = (ops == K.RAW) | (ops == K.XOR)
        isarg = (ops == K.REF) | (ops == K.STREAM)
        if int(isval.sum()) != nval or int(isarg.sum()) != nargs:
            self._corrupt("op counts do not match the frame's value and argument counts")
        needbase = (ops == K.BASE) | (ops == K.XOR)
        if needbase.any():
            if st.base is None:
                self._corrupt(f"target {st.name!r} has no base but the frame copies or XORs base blocks")
            if int(blocks[needbase].max()) >= st.image.base_n:
                self._corrupt("a base block beyond the end of the base image")
        argops = ops[isarg]
        argpos = np.flatnonzero(isarg)
        if nargs and int(args.min()) < 0:
            self._corrupt("negative block reference")
        aref = args >> 40
        ablk = args & K.LOW40
        refm = argops == K.REF
        strm = argops == K.STREAM
        if refm.any():
            rr = aref[refm]
            if int(rr.max()) >= len(self._refs):
                self._corrupt(f"reference to unknown reference image #{int(rr.max())}")
            lim = np.array([r.index.nblocks for r in self._refs], np.int64)
            if (ablk[refm] >= lim[rr]).any():
                self._corrupt("reference to a block beyond the end of a reference image")
        if strm.any():
            tt = aref[strm]
            if int(tt.max()) >= len(self._targets):
                self._corrupt(f"reference to unknown target #{int(tt.max())}")
            lim = np.array([t.nblocks for t in self._targets], np.int64)
            if (ablk[strm] >= lim[tt]).any():
                self._corrupt("reference to a block beyond the end of a target")

        img = st.image
        base_reader = self._refs[st.base].reader if st.base is not None else None
        # Phase 1: every entry that carries or names its content (BASE, RAW, XOR, REF) becomes one row of
        # `rows`, in entry order. When the values are all there is, they are used where they lie.
        isdata = isval | (ops == K.BASE) | (ops == K.REF)
        row_of = np.cumsum(isdata) - 1
        dpos = np.flatnonzero(isdata)
        xsel = np.flatnonzero(ops == K.XOR)
        if dpos.size == nval and (xsel.size == 0 or vals.flags.writeable):
            rows = vals
        else:
            rows = np.empty((dpos.size, BLOCK), np.uint8)
            if nval:
                rows[row_of[np.flatnonzero(isval)]] = vals
            bsel = np.flatnonzero(ops == K.BASE)
            if bsel.size and base_reader is not None:
                rows[row_of[bsel]] = base_reader.gather(blocks[bsel])
            if refm.any():
                rpos, rr, rb = argpos[refm], aref[refm], ablk[refm]
                for r in np.unique(rr):
                    m = rr == r
                    rows[row_of[rpos[m]]] = self._refs[int(r)].reader.gather(rb[m])
        if xsel.size and base_reader is not None:
            xr = row_of[xsel]
            rows[xr] ^= base_reader.gather(blocks[xsel])
        if dpos.size:
            self._apply(st, blocks[dpos], rows)
        zsel = np.flatnonzero(ops == K.ZERO)
        if zsel.size:
            zb = np.sort(blocks[zsel])
            st.hashes[zb] = zero_hash()
            img.zero(zb)
        # Phase 2: STREAM entries copy what the receiver holds now.
        srows: np.ndarray | None = None
        if strm.any():
            spos, tt, sb = argpos[strm], aref[strm], ablk[strm]
            srows = np.empty((spos.size, BLOCK), np.uint8)
            for t in np.unique(tt):
                m = tt == t
                srows[m] = self._targets[int(t)].image.read(sb[m])
            self._apply(st, blocks[spos], srows)
        img.advance(int(blocks.max()))
        if st.on_blocks is not None:
            out = np.empty((n, BLOCK), np.uint8)
            out[dpos] = rows
            out[zsel] = 0
            if srows is not None:
                out[argpos[strm]] = srows
            keep = np.flatnonzero(ops == K.KEEP)
            if keep.size:
                out[keep] = img.read(blocks[keep])
            st.on_blocks(blocks, out)
        ks = self.stats.kind(st.kind)
        ks.add_ops(ops)
        ks.raw_bytes += len(raw)
        ks.payload_bytes += slen
        ks.wire_bytes += slen + W.OVERHEAD
        ks.frames += 1

    @staticmethod
    def _apply(st: _Target, blocks: np.ndarray, rows: np.ndarray) -> None:
        """Hash rows (the per-block verification list) and write them at blocks."""
        h = np.empty((rows.shape[0], 2), np.uint64)
        K.hash_blocks(rows.view(np.uint64), h)
        st.hashes[blocks] = h
        if blocks.size > 1 and not bool((np.diff(blocks) > 0).all()):
            order = np.argsort(blocks, kind="stable")
            blocks, rows = blocks[order], rows[order]
        st.image.write(blocks, rows)

    def _on_end(self, target: int, raw: bytes | bytearray) -> None:
        info = self._json(raw)
        entries = info.get("targets")
        if not isinstance(entries, list):
            self._corrupt("END frame has no list of targets")
        if len(entries) != len(self._targets):
            self._corrupt(f"END frame lists {len(entries)} targets, the stream declared {len(self._targets)}")
        seen = set()
        for e in entries:
            if not isinstance(e, dict):
                self._corrupt("bad END entry")
            i = e.get("index")
            if not isinstance(i, int) or not 0 <= i < len(self._targets) or i in seen:
                self._corrupt(f"END entry for unknown or repeated target {i!r}")
            seen.add(i)
            t = self._targets[i]
            if e.get("blocks") != t.nblocks or not isinstance(e.get("digest"), str):
                self._corrupt(f"END entry for target {t.name!r} is malformed")
            if self._want_sha != isinstance(e.get("sha256"), str):
                self._corrupt(f"END entry for target {t.name!r}: sha256 given or missing against the HEADER")
            sha = t.image.finish()
            if sha is not None and sha.hex() != e["sha256"]:
                raise _verification(
                    f"frame {self._seq}: target {t.name!r}: SHA-256 of the rebuilt image "
                    f"{sha.hex()[:16]}… != the sender's {str(e['sha256'])[:16]}…",
                    offset=self._frame_off,
                )
            have = image_digest(t.size, t.hashes).hex()
            if have != e["digest"]:
                raise _verification(
                    f"frame {self._seq}: target {t.name!r}: rebuilt image does not match the sender digest "
                    f"({have[:16]}… != {e['digest'][:16]}…)",
                    offset=self._frame_off,
                )
        self._ended = True

    # -- the end -----------------------------------------------------------------------------------
    def close(self) -> StreamStats:
        """Check the stream is complete and verified, then fsync and publish every target."""

        def run() -> None:
            if not self._magic or not self._ended:
                total = self._pos + len(self._buf)
                partial = len(self._buf) - self._bstart
                where = f"inside frame {self._seq}" if partial else f"before frame {self._seq}"
                raise StreamTruncated(
                    f"stream ended {where} without its END frame ({total} bytes received)", offset=total
                )
            missing = sorted(set(self._sinks) - self._names)
            if missing:
                raise DeltaError(f"the stream carries no target named {', '.join(map(repr, missing))}")
            t0 = time.perf_counter()  # durability is the disk's cost, not the decoder's: timed apart
            for t in self._targets:
                t.image.sync()
            for t in self._targets:
                t.image.publish()
            self.stats.sync_seconds = time.perf_counter() - t0
            if self._refs is not None:
                for r in self._refs:
                    r.reader.close()
            self._closed = True

        self._guard(run)
        self.stats.seconds = time.perf_counter() - self._t0
        return self.stats


def decode_files(
    inp: BinaryIO, refs: Mapping[str, Path], outputs: Mapping[str, Path], *, durable: bool = True
) -> StreamStats:
    """Read a whole stream and write each target to outputs[name] (fsynced unless durable=False);
    nothing is left there on error."""
    dec = Decoder(refs, {k: Path(v) for k, v in outputs.items()}, durable=durable)
    try:
        while True:
            chunk = inp.read(4 << 20)
            if not chunk:
                break
            dec.feed(chunk)
        return dec.close()
    except BaseException:
        dec.abort()
        raise
