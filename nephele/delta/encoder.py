"""The sending side: classify blocks, dedup, XOR, compress in batches, write frames (wire.py)."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import lz4.block
import numpy as np
import xxhash
import zstandard

from nephele.delta import _kernels as K
from nephele.delta import wire as W
from nephele.delta.index import BLOCK, RefSet, image_digest, nblocks_of, read_full, zero_hash
from nephele.delta.stats import StreamStats
from nephele.errors import DeltaError

CHUNK_BLOCKS = 1024  # encode_files classifies 4 MiB chunks (target and base, in place through their maps)
MAX_ENTRIES = 4096  # entries per BLOCKS frame (at most W.MAX_ENTRIES): bounds the receiver's memory per frame
# Values per BLOCKS frame: 1 MiB compresses as well as 256 KiB with lz4 (0.2 % smaller on the benchmark)
# and quarters the per-frame costs: decode needed 0.3-0.4 s less CPU on the 3.2 GB benchmark workload
# (1188 frames -> 301).
DEFAULT_BATCH = 256
MAX_PENDING_FRAMES = 16  # frames queued for the writer thread (about 16 MiB)


@dataclass(frozen=True)
class Target:
    """One image to rebuild on the receiver."""

    name: str  # e.g. "disk", "memory"
    kind: Literal["disk", "memory"]
    path: Path  # the new image (sender side)
    base: str | None  # ref id of its base image (same-offset "unchanged" test and XOR delta), or None


@dataclass
class _TargetState:
    index: int
    name: str
    kind: str
    size: int
    nblocks: int
    base: int | None  # position in the RefSet
    start: int  # global index of block 0


class Encoder:
    """Incremental encoder: declare targets, put blocks (any order, repeats allowed: later wins), finish.

    ``refs`` are the images the receiver holds. Unless ``emit_keep`` is False, every block put produces an
    entry (a KEEP costs a few bytes before compression) so a receiver with a callback sink sees every block.
    """

    def __init__(
        self,
        refs: RefSet | Mapping[str, Path],
        out: BinaryIO,
        codec: str = "lz4",
        level: int | None = None,
        *,
        batch_blocks: int | None = None,
        emit_keep: bool = True,
        sha256: bool = False,
        threaded: bool = False,
    ) -> None:
        if codec not in W.CODECS:
            raise DeltaError(f"unknown codec {codec!r} (choose from {', '.join(W.CODECS)})")
        self.refs = refs if isinstance(refs, RefSet) else RefSet.open(refs)
        self._own_refs = not isinstance(refs, RefSet)
        self._out = out
        self._codec = W.CODECS[codec]
        self._level = level
        self._zc = zstandard.ZstdCompressor(level=3 if level is None else level) if codec == "zstd" else None
        self.batch_blocks = max(1, batch_blocks or DEFAULT_BATCH)
        self.emit_keep = emit_keep
        self.stats = StreamStats()
        self._t0 = time.perf_counter()
        self._seq = 0
        self._targets: list[_TargetState] = []
        self._names: dict[str, int] = {}
        self._cur_h = np.zeros((0, 2), np.uint64)
        self._stamp = np.zeros(0, np.int64)
        self._tstart = np.zeros(1, np.int64)
        self._call = 0
        self._skeys = np.zeros(1 << 12, np.uint64)
        self._svals = np.zeros(1 << 12, np.int64)
        self._sused = 0
        self._finished = False
        # threaded: a writer thread compresses and writes frames while this thread classifies the next batch.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="nephele-delta-frames") if threaded else None
        self._pending: deque[Future[None]] = deque()
        # coalesce: frames may span put calls (encode_files only: every block is put exactly once)
        self.coalesce = False
        self._carry: tuple[_TargetState, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.collisions = 0  # reference candidates whose bytes differed (sent by value instead)
        self.sha256 = sha256
        self._write(W.MAGIC)
        header = {
            "format": W.FORMAT,
            "block_size": BLOCK,
            "sha256": sha256,
            "refs": [
                {"id": rid, "size": ix.size, "digest": ix.digest.hex()}
                for rid, ix in zip(self.refs.ids, self.refs.indexes, strict=True)
            ],
        }
        self._frame(W.HEADER, W.NO_TARGET, W.json_payload(header), compress=False)

    # -- declaring targets -------------------------------------------------------------------------
    def begin_target(self, name: str, kind: str, size: int, base: str | None = None) -> int:
        if self._finished:
            raise DeltaError("encoder already finished")
        if not name or len(name.encode()) > 255:
            raise DeltaError(f"target name {name!r} must be 1 to 255 bytes")
        if name in self._names:
            raise DeltaError(f"target {name!r} declared twice")
        if kind not in W.KINDS:
            raise DeltaError(f"target {name!r}: kind must be one of {W.KINDS}, not {kind!r}")
        if size < 0 or size > 1 << 50:
            raise DeltaError(f"target {name!r}: size {size} out of range")
        if len(self._targets) >= W.MAX_TARGETS:
            raise DeltaError("too many targets")
        bpos = self.refs.position(base) if base is not None else None
        if bpos is not None and self.refs.readers[bpos] is None:
            raise DeltaError(
                f"target {name!r}: base {base!r} is a remote reference (hashes only): a base must be "
                "readable here (BASE and XOR compare and combine its bytes)"
            )
        n = nblocks_of(size)
        t = _TargetState(len(self._targets), name, kind, size, n, bpos, int(self._tstart[-1]))
        init = np.empty((n, 2), np.uint64)
        init[:] = zero_hash()
        if bpos is not None:
            bh = self.refs.indexes[bpos].hashes
            k = min(n, bh.shape[0])
            init[:k] = bh[:k]
            # A partial last base block inside the target is compared zero-padded on both ends.
        self._cur_h = np.concatenate([self._cur_h, init])
        self._stamp = np.concatenate([self._stamp, np.zeros(n, np.int64)])
        self._tstart = np.append(self._tstart, t.start + n)
        self._targets.append(t)
        self._names[name] = t.index
        self.stats.kind(kind)
        info = {"index": t.index, "name": name, "kind": kind, "size": size, "base": base}
        self._frame(W.TARGET, t.index, W.json_payload(info), compress=False)
        return t.index

    def _target(self, target: str | int) -> _TargetState:
        if isinstance(target, int):
            if 0 <= target < len(self._targets):
                return self._targets[target]
        elif target in self._names:
            return self._targets[self._names[target]]
        raise DeltaError(f"unknown target {target!r}")

    # -- putting blocks ----------------------------------------------------------------------------
    def put_blocks(
        self, target: str | int, block_numbers: np.ndarray, data: np.ndarray | bytes | bytearray | memoryview
    ) -> None:
        """Send the current content of some blocks (data: uint8[n, 4096] or n*4096 bytes); a block put
        again later replaces what was sent, also within one call."""
        if self._finished:
            raise DeltaError("encoder already finished")
        t = self._target(target)
        blocks = np.asarray(block_numbers, dtype=np.int64).reshape(-1)
        if isinstance(data, bytes | bytearray | memoryview):
            data = np.frombuffer(data, np.uint8)
        if data.size % BLOCK:
            raise DeltaError(f"block data of {data.size} bytes is not a whole number of {BLOCK}-byte blocks")
        rows = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, BLOCK)
        if rows.shape[0] != blocks.shape[0]:
            raise DeltaError(f"{blocks.shape[0]} block numbers but {rows.shape[0]} blocks of data")
        if blocks.size == 0:
            return
        if int(blocks.min()) < 0 or int(blocks.max()) >= t.nblocks:
            raise DeltaError(f"target {t.name!r}: block number outside 0..{t.nblocks - 1}")
        uniq = np.unique(blocks)
        if uniq.size != blocks.size:  # keep the last occurrence of each block, in call order
            rev_first = np.unique(blocks[::-1], return_index=True)[1]
            keep = np.sort(blocks.size - 1 - rev_first)
            blocks, rows = blocks[keep], rows[keep]
        base_rows = np.zeros_like(rows)
        has_base = np.zeros(blocks.shape[0], np.bool_)
        base_h = np.zeros((blocks.shape[0], 2), np.uint64)
        if t.base is not None:
            bix = self.refs.indexes[t.base]
            has_base = blocks < bix.nblocks
            sel = np.flatnonzero(has_base)
            if sel.size:
                base_rows[sel] = self.refs.reader(t.base).gather(blocks[sel])
                base_h[sel] = bix.hashes[blocks[sel]]
        self.stats.input_bytes += rows.shape[0] * BLOCK
        self._put(t, blocks, rows, base_rows, has_base, base_h, self.emit_keep)

    def _put(
        self,
        t: _TargetState,
        blocks: np.ndarray,
        rows: np.ndarray,
        base_rows: np.ndarray,
        has_base: np.ndarray,
        base_h: np.ndarray,
        emit_keep: bool,
    ) -> None:
        n = blocks.shape[0]
        self._reserve_stream_slots(n)
        self._call += 1
        cls = np.empty(n, np.uint8)
        arg = np.empty(n, np.int64)
        gidx = blocks + t.start
        data64 = rows.view(np.uint64)
        base64 = base_rows.view(np.uint64)
        rs = self.refs
        self._sused += K.classify(
            data64, base64, has_base, base_h, gidx, self._cur_h, self._stamp, self._call,
            rs.keys, rs.vals, rs.h2s, self._skeys, self._svals, self._tstart, cls, arg,
        )  # fmt: skip
        self._confirm_refs(cls, arg, rows, base_rows, has_base, gidx)
        idx = np.arange(n) if emit_keep else np.flatnonzero(cls != K.KEEP)
        if idx.size:
            self._emit(t, blocks[idx], cls[idx], arg[idx], rows, base_rows, idx)

    def _confirm_refs(
        self,
        cls: np.ndarray,
        arg: np.ndarray,
        rows: np.ndarray,
        base_rows: np.ndarray,
        has_base: np.ndarray,
        gidx: np.ndarray,
    ) -> None:
        """Compare each reference candidate with the reference's bytes; a mismatch is sent by value.

        A remote reference (only its index is here) is confirmed by the full 128-bit hash instead: the
        block's hash (classify left it in _cur_h) against the one the receiver sent for that block. The
        table lookup compared h2 and a key derived from h1 (0 and 1 share a key), so this is exact. What
        remains is a 2^-128 chance per candidate, and the receiver's end-to-end checks (the targets'
        digests, any checksum its caller keeps over the rebuilt bytes) turn a wrong block into a failed
        stream, never a silent one."""
        refi = np.flatnonzero(cls == K.REF)
        if refi.size == 0:
            return
        rpos = arg[refi] >> 40
        rblk = arg[refi] & K.LOW40
        eq = np.empty(refi.size, np.bool_)
        rows64 = rows.view(np.uint64)
        for r in np.unique(rpos):
            sel = np.flatnonzero(rpos == r)
            reader = self.refs.readers[int(r)]
            if reader is None:  # remote: the full 128-bit hash
                have = self._cur_h[gidx[refi[sel]]]
                want = self.refs.indexes[int(r)].hashes[rblk[sel]]
                eq[sel] = (have == want).all(axis=1)
                continue
            ref = reader.mapped()
            part = np.empty(sel.size, np.bool_)
            if ref is not None and int(rblk[sel].max()) < ref.shape[0]:
                # compared where they lie (no copy of either), then the map's pages are dropped again
                K.rows_equal_at(rows64, refi[sel], ref.view(np.uint64), rblk[sel], part)
                ref = None
                reader.drop_all()
            else:  # a zero-padded last block of the reference: copied out
                cand = reader.gather(rblk[sel]).view(np.uint64)
                K.rows_equal(np.ascontiguousarray(rows[refi[sel]]).view(np.uint64), cand, part)
            eq[sel] = part
        bad = refi[~eq]
        if bad.size:
            self.collisions += int(bad.size)
            small = np.zeros(bad.size, np.bool_)
            K.xor_count_small(
                np.ascontiguousarray(rows[bad]).view(np.uint64),
                np.ascontiguousarray(base_rows[bad]).view(np.uint64),
                small,
            )
            cls[bad] = np.where(small & has_base[bad], K.XOR, K.RAW)
            arg[bad] = 0

    def _reserve_stream_slots(self, n: int) -> None:
        cap = self._skeys.shape[0]
        if (self._sused + n) * 2 <= cap:
            return
        new_cap = cap
        while (self._sused + n) * 2 > new_cap:
            new_cap *= 2
        keys = np.zeros(new_cap, np.uint64)
        vals = np.zeros(new_cap, np.int64)
        self._sused = K.stream_table_rehash(self._skeys, self._svals, keys, vals)
        self._skeys, self._svals = keys, vals

    def _emit(
        self,
        t: _TargetState,
        blocks: np.ndarray,
        ops: np.ndarray,
        args: np.ndarray,
        rows: np.ndarray,
        base_rows: np.ndarray,
        rowidx: np.ndarray,
    ) -> None:
        isval = (ops == K.RAW) | (ops == K.XOR)
        vrow = rowidx[isval]
        values = rows[vrow]
        xr = ops[isval] == K.XOR
        if xr.any():
            values[xr] ^= base_rows[vrow[xr]]
        isarg = (ops == K.REF) | (ops == K.STREAM)
        self.stats.kind(t.kind).add_ops(ops)
        if self._carry is not None:
            # encode_files: a frame may span chunks, since each block is put once and never rewritten
            # (a STREAM source is always complete before the frame that copies it is applied)
            ct, cb, co, ca, cv = self._carry
            assert ct is t
            blocks = np.concatenate((cb, blocks))
            ops = np.concatenate((co, ops))
            args = np.concatenate((ca, args[isarg]))
            values = np.concatenate((cv, values))
            self._carry = None
        else:
            args = args[isarg]
        self._frames(t, blocks, ops, args, values, final=not self.coalesce)

    def _frames(
        self,
        t: _TargetState,
        blocks: np.ndarray,
        ops: np.ndarray,
        args: np.ndarray,
        values: np.ndarray,
        final: bool,
    ) -> None:
        """Cut entries (in order; args and values only for the entries that have them) into frames of
        batch_blocks values or MAX_ENTRIES entries; with final=False a last, unfilled frame is carried."""
        isval = (ops == K.RAW) | (ops == K.XOR)
        isarg = (ops == K.REF) | (ops == K.STREAM)
        vcum = np.cumsum(isval)
        acum = np.cumsum(isarg)
        m = ops.shape[0]
        start = 0
        while start < m:
            v0 = int(vcum[start - 1]) if start else 0
            a0 = int(acum[start - 1]) if start else 0
            end = int(np.searchsorted(vcum, v0 + self.batch_blocks, side="left")) + 1
            end = min(end, start + MAX_ENTRIES, m)
            v1 = int(vcum[end - 1])
            a1 = int(acum[end - 1])
            if not final and end == m and v1 - v0 < self.batch_blocks and end - start < MAX_ENTRIES:
                self._carry = (t, blocks[start:], ops[start:], args[a0:], values[v0:])
                return
            b = blocks[start:end]
            parts = [
                np.frombuffer(W.BLOCKS_HEAD.pack(end - start, v1 - v0, a1 - a0, 0), np.uint8),
                np.diff(b, prepend=np.int64(0)).astype("<i8").view(np.uint8),
                ops[start:end],
                args[a0:a1].astype("<i8").view(np.uint8),
                values[v0:v1].reshape(-1),
            ]
            raw = np.concatenate(parts).data  # the values are copied once, into the frame
            self._frame(W.BLOCKS, t.index, raw, compress=True, kind=t.kind)
            start = end

    def _flush_carry(self) -> None:
        if self._carry is not None:
            t, b, o, a, v = self._carry
            self._carry = None
            self._frames(t, b, o, a, v, final=True)

    # -- frames ------------------------------------------------------------------------------------
    def _compress(self, raw: bytes | memoryview) -> bytes:
        if self._codec == W.LZ4:
            lvl = self._level
            if lvl is None or lvl == 0:
                out: bytes = lz4.block.compress(raw, store_size=False)
            elif lvl < 0:
                out = lz4.block.compress(raw, mode="fast", acceleration=-lvl, store_size=False)
            else:
                out = lz4.block.compress(raw, mode="high_compression", compression=lvl, store_size=False)
            return out
        assert self._zc is not None
        return self._zc.compress(raw)

    def _frame(
        self, ftype: int, target: int, raw: bytes | memoryview, *, compress: bool, kind: str | None = None
    ) -> None:
        if len(raw) > W.MAX_RAW:
            raise DeltaError(f"frame payload of {len(raw)} bytes exceeds {W.MAX_RAW}")
        seq = self._seq
        self._seq += 1
        if self._pool is None:
            self._frame_now(ftype, target, seq, raw, compress, kind)
            return
        self._pending.append(self._pool.submit(self._frame_now, ftype, target, seq, raw, compress, kind))
        while len(self._pending) > MAX_PENDING_FRAMES:  # bounded memory: wait for the oldest
            self._pending.popleft().result()

    def _frame_now(
        self, ftype: int, target: int, seq: int, raw: bytes | memoryview, compress: bool, kind: str | None
    ) -> None:
        """Compress, checksum and write one frame (on the writer thread when there is one: frames are
        written in submission order, and only this thread touches the byte counters meanwhile)."""
        codec, stored = W.NONE, raw
        if compress and self._codec != W.NONE:
            c = self._compress(raw)
            if len(c) < len(raw):
                codec, stored = self._codec, c
        head = W.FRAME_HEAD.pack(ftype, codec, target, seq, len(stored), len(raw))
        h = xxhash.xxh3_64(head)
        h.update(stored)
        self._write(head)
        self._write(stored)
        self._write(W.CHECK.pack(h.intdigest()))
        self.stats.frames += 1
        if kind is not None:
            ks = self.stats.kind(kind)
            ks.raw_bytes += len(raw)
            ks.payload_bytes += len(stored)
            ks.wire_bytes += len(stored) + W.OVERHEAD
            ks.frames += 1

    def flush(self) -> None:
        """Wait until every frame so far is written to out (threaded encoders compress in the background)."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Stop the writer thread (after finish(), or to abandon a stream after an error)."""
        if self._pool is not None:
            for f in self._pending:
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def _write(self, b: bytes | memoryview) -> None:
        self._out.write(b)
        self.stats.wire_bytes += len(b)

    # -- finishing ---------------------------------------------------------------------------------
    def digest(self, target: str | int) -> bytes:
        """The verification digest of what the receiver holds for target after what was put so far."""
        t = self._target(target)
        return image_digest(t.size, self._cur_h[t.start : t.start + t.nblocks])

    def finish(
        self, final_hashes: Mapping[str, bytes] | None = None, sha256s: Mapping[str, bytes] | None = None
    ) -> StreamStats:
        """Write the END frame. final_hashes, if given, are digests (index.image_digest) of the true
        images computed by the caller; otherwise the digest of what was sent is used. With sha256=True,
        sha256s must give the SHA-256 of every target's final image."""
        if self._finished:
            raise DeltaError("encoder already finished")
        self._flush_carry()
        entries = []
        for t in self._targets:
            d = (final_hashes or {}).get(t.name) or self.digest(t.index)
            e = {"index": t.index, "name": t.name, "blocks": t.nblocks, "digest": d.hex()}
            if self.sha256:
                sha = (sha256s or {}).get(t.name)
                if sha is None:
                    raise DeltaError(f"the stream promises a SHA-256 of target {t.name!r} but none was given")
                e["sha256"] = sha.hex()
            entries.append(e)
        self._frame(W.END, W.NO_TARGET, W.json_payload({"targets": entries}), compress=False)
        self.flush()
        self.close()
        self._finished = True
        self.stats.seconds = time.perf_counter() - self._t0
        if self._own_refs:
            self.refs.close()
        return self.stats


def encode_files(
    refs: Mapping[str, Path],
    targets: Sequence[Target],
    out: BinaryIO,
    *,
    codec: str = "lz4",
    level: int | None = None,
    batch_blocks: int | None = None,
    sha256: bool = False,
) -> StreamStats:
    """Write one stream that rebuilds every target from the refs the receiver holds (a single file
    holding this stream is the export format). sha256=True adds the SHA-256 of every whole image to the
    trailer, checked by the receiver too: about 1 s per GiB on each end (on the reading/writing thread),
    on top of the per-block digest that is always there."""
    rs = RefSet.open(refs)
    try:
        for t in targets:
            if t.base is not None and t.base not in refs:
                raise DeltaError(f"target {t.name!r}: base {t.base!r} is not among the reference images")
        enc = Encoder(
            rs, out, codec, level, batch_blocks=batch_blocks, emit_keep=False, sha256=sha256, threaded=True
        )
        enc.coalesce = True
        shas: dict[str, bytes] = {}
        fds: list[int] = []
        try:
            for t in targets:
                try:
                    fd = os.open(t.path, os.O_RDONLY)
                except OSError as exc:
                    raise DeltaError(f"cannot open target image {t.path}: {exc.strerror}") from exc
                fds.append(fd)
                enc.begin_target(t.name, t.kind, os.fstat(fd).st_size, t.base)
            for t, fd in zip(targets, fds, strict=True):
                sha = _encode_file(enc, enc._target(t.name), fd, t.path, sha256)
                enc._flush_carry()  # frames never span targets
                if sha is not None:
                    shas[t.name] = sha
            return enc.finish(sha256s=shas)
        finally:
            enc.close()
            for fd in fds:
                os.close(fd)
    finally:
        rs.close()


def _encode_file(enc: Encoder, t: _TargetState, fd: int, path: Path, sha256: bool) -> bytes | None:
    """Stream one image through the encoder in 4 MiB chunks, read in place through read-only maps of the
    image and of its base: no copy into this process (reading into a buffer cost twice the CPU of the
    whole classification), and each chunk's pages are dropped from the maps once it is classified, so
    they do not pile up as RSS. The next chunk is prefetched (MADV_WILLNEED): an image not in the page
    cache is read from disk while this chunk is classified. A chunk reaching a partial last block is read
    into a buffer. The size is checked before every chunk (a shrunken file is an error, not a SIGBUS)."""
    rs = enc.refs
    full = t.size // BLOCK
    mm = mmap.mmap(fd, full * BLOCK, prot=mmap.PROT_READ) if full else None
    arr: np.ndarray | None = None
    if mm is not None:
        arr = np.frombuffer(mm, np.uint8).reshape(full, BLOCK)
    cap = min(CHUNK_BLOCKS, max(t.nblocks, 1))
    tail = np.zeros((cap, BLOCK), np.uint8)
    bbuf = np.zeros((cap, BLOCK), np.uint8)
    base_n = rs.indexes[t.base].nblocks if t.base is not None else 0
    base_reader = rs.reader(t.base) if t.base is not None else None
    base_h = np.zeros((cap, 2), np.uint64)
    has_base = np.zeros(cap, np.bool_)
    sha = hashlib.sha256() if sha256 else None
    rows: np.ndarray | None = None
    view: np.ndarray | None = None
    base_rows: np.ndarray | None = None
    try:
        for start in range(0, t.nblocks, CHUNK_BLOCKS):
            cnt = min(CHUNK_BLOCKS, t.nblocks - start)
            want = min(cnt * BLOCK, t.size - start * BLOCK)
            if os.fstat(fd).st_size < t.size:
                raise DeltaError(f"{path} shrank while being encoded (at byte {start * BLOCK})")
            if arr is not None and mm is not None and start + cnt <= full:
                rows = arr[start : start + cnt]
                nxt = min(CHUNK_BLOCKS, full - start - cnt)
                if nxt > 0:
                    mm.madvise(mmap.MADV_WILLNEED, (start + cnt) * BLOCK, nxt * BLOCK)
            else:
                mv = tail.data.cast("B")
                got = read_full(fd, mv[:want], start * BLOCK)
                if got != want:
                    raise DeltaError(
                        f"{path} shrank while being encoded (short read at byte {start * BLOCK + got})"
                    )
                mv[want : cnt * BLOCK] = bytes(cnt * BLOCK - want)
                rows = tail[:cnt]
            if sha is not None:
                sha.update(rows.data.cast("B")[:want])
            blocks = np.arange(start, start + cnt, dtype=np.int64)
            nb = max(0, min(cnt, base_n - start))
            has_base[:] = False
            has_base[:nb] = True
            base_h[:] = 0
            base_rows = bbuf[:cnt]
            view = None
            if base_reader is not None and nb:
                base_h[:nb] = rs.indexes[t.base].hashes[start : start + nb]  # type: ignore[index]
                view = base_reader.view(start, cnt)
                if view is not None:
                    base_rows = view
                else:
                    base_reader.read_range(start, bbuf[:nb])
            enc.stats.input_bytes += want
            enc._put(t, blocks, rows, base_rows, has_base[:cnt], base_h[:cnt], False)
            if base_reader is not None and view is not None:
                view = None
                base_reader.drop(start, cnt)
            if mm is not None and start + cnt <= full:
                mm.madvise(mmap.MADV_DONTNEED, start * BLOCK, cnt * BLOCK)
    finally:  # no view may outlive the maps (an exception's traceback would keep them alive)
        rows = arr = view = base_rows = None
        if mm is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the map goes with it
                mm.close()
    if os.fstat(fd).st_size != t.size:
        raise DeltaError(f"{path} changed size while being encoded")
    return sha.digest() if sha is not None else None
