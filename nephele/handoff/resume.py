"""Resumable handoffs: the RAM pages a destination verified before a failed attempt, kept for the next one.

A handoff cut by the link (or any failure after memory moved) used to start over: the retry sent all of
RAM again, minus what the base image covers. Now the destination keeps, per RAM block, the latest
verified content of every page it received, in a sparse file (``<root>/cache/handoff-resume/<uuid>/``),
written as pages are rebuilt and checked (the memory channel's per-run xxh3). The next handoff of that
instance into this node offers those files as reference images (``resume:mem:<block>``).

The live VM kept running after the failed attempt, so part of that content is stale. That does not
matter: a reference is content-addressed. The destination sends the source the index of each file (size,
digest, and the 128-bit hash of every block it holds); the delta encoder matches the source's pages
against those hashes ("remote" references, nephele.delta.BlockIndex.from_remote) and sends a reference
wherever a page's current content is one the destination already holds, at any offset. The source never
reads the destination's bytes, so a match is trusted on the 128-bit hash alone (rsync's argument); the
end-to-end checks stay: the reference digest (the destination re-indexes its file), the per-run xxh3 of
the page payloads, every RAM block's digest at END and the sha256 of the whole stream before the
destination QEMU gets its device state. A wrong reference fails the handoff; it cannot corrupt the VM.

Lifetime: kept ``KEEP_SECONDS`` after the failed attempt (the next receive or ``handoff.cleanup`` on the
node sweeps older ones), removed when a handoff of that instance into this node succeeds, and dropped
when an attempt that used it failed verification (so a bad cache cannot fail every retry). While a
receiver writes, the directory holds its pid (``.writing``); what a killed receiver was writing is
removed by the next sweep, and what an earlier attempt kept stays.

The offer (the memory channel's RESUME message, destination -> source, before anything else):

    JSON line: {"refs": [{"id", "size", "digest", "held"}]}
    per ref:   bitmap of held blocks (ceil(blocks / 8) bytes, numpy packbits order)
               held x (h1, h2) u64 LE: nph128 of each held block
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from nephele.delta import BlockIndex
from nephele.delta.decoder import copy_range
from nephele.delta.index import BLOCK, nblocks_of, zero_hash
from nephele.errors import DeltaError, HandoffError, NepheleError
from nephele.node.procs import pid_alive

KEEP_SECONDS = 3600.0
DIRNAME = "handoff-resume"
META = "resume.json"
WRITING = ".writing"
PREFIX = "resume:"


def resume_root(root: Path) -> Path:
    return root / "cache" / DIRNAME


def ref_id(block: str) -> str:
    """The reference id of the kept pages of one RAM block (the base image's are ``mem:<block>``)."""
    return f"{PREFIX}mem:{block}"


def _file_name(block: str) -> str:
    return hashlib.sha256(block.encode()).hexdigest()[:24] + ".raw"  # block names may hold '/'


def held_blocks(ix: BlockIndex) -> np.ndarray:
    """Blocks of a kept file that hold data (holes and zero pages are never offered)."""
    zh = np.array(zero_hash(), np.uint64)
    held: np.ndarray = (ix.hashes != zh).any(axis=1)
    return held


# ---------------------------------------------------------------------------------------------- the offer


def encode_offer(refs: dict[str, Path]) -> bytes:
    """The RESUME payload for the kept files (ref id -> path); b"" when there are none."""
    if not refs:
        return b""
    head: list[dict[str, Any]] = []
    body: list[bytes] = []
    for rid, path in refs.items():
        ix = BlockIndex.load_or_build(path)
        held = held_blocks(ix)
        head.append({"id": rid, "size": ix.size, "digest": ix.digest.hex(), "held": int(held.sum())})
        body.append(np.packbits(held).tobytes())
        body.append(np.ascontiguousarray(ix.hashes[held], dtype="<u8").tobytes())
    return json.dumps({"refs": head}).encode() + b"\n" + b"".join(body)


def decode_offer(payload: bytes, *, max_size: int = 1 << 40) -> dict[str, BlockIndex]:
    """Ref id -> remote BlockIndex from a RESUME payload (the source side); a malformed offer, or one
    describing a file larger than max_size (what this end would allocate for its index), is refused
    with a HandoffError (the handoff then fails before anything moves)."""
    if not payload:
        return {}
    head, sep, body = payload.partition(b"\n")
    try:
        refs = json.loads(head)["refs"] if sep else None
        if not isinstance(refs, list):
            raise ValueError("no refs list")
        out: dict[str, BlockIndex] = {}
        pos = 0
        zh = np.array(zero_hash(), np.uint64)
        for r in refs:
            rid, size, digest, held = str(r["id"]), int(r["size"]), bytes.fromhex(r["digest"]), int(r["held"])
            if size > max_size:
                raise ValueError(f"entry {rid!r} of {size} bytes, larger than any RAM block ({max_size})")
            if not rid.startswith(PREFIX) or rid in out or size < 0 or held < 0:
                raise ValueError(f"bad entry {r!r}")
            n = nblocks_of(size)
            nb = (n + 7) // 8
            if held > n or pos + nb + 16 * held > len(body):
                raise ValueError(f"entry {rid!r} runs past the end of the offer")
            mask = np.unpackbits(np.frombuffer(body, np.uint8, nb, pos), count=n).astype(np.bool_)
            pos += nb
            if int(mask.sum()) != held:
                raise ValueError(f"entry {rid!r}: its bitmap holds {int(mask.sum())} blocks, not {held}")
            hashes = np.empty((n, 2), np.uint64)
            hashes[:] = zh
            hashes[mask] = np.frombuffer(body, "<u8", 2 * held, pos).reshape(held, 2)
            pos += 16 * held
            out[rid] = BlockIndex.from_remote(size, hashes, digest)
        if pos != len(body):
            raise ValueError(f"{len(body) - pos} bytes after the last entry")
    except (ValueError, KeyError, TypeError, OverflowError, DeltaError) as exc:
        raise HandoffError(f"memory channel: malformed resume offer from the destination ({exc})") from None
    return out


# -------------------------------------------------------------------------------------------- the cache


class ResumeCache:
    """The kept pages of one instance on this node, as one receive sees and extends them."""

    def __init__(self, root: Path, uuid: str, *, now: float | None = None) -> None:
        self.dir = resume_root(root) / uuid
        self.kept: dict[str, Path] = {}  # RAM block -> kept file (immutable while a receive reads it)
        self.saved = 0.0
        self._new: dict[str, tuple[int, Path, np.ndarray]] = {}  # block -> fd, path, pages written
        self._order: list[str] = []  # RAM blocks in the stream's order (its block numbers)
        self.written = 0  # pages written this attempt
        # the memory channel's thread writes; the receive's thread settles the files (keep/discard), once
        # that channel has stopped, but a late write must never land in a closed (or reused) fd
        self._lock = threading.Lock()
        self._closed = False
        self.failed: str | None = None  # keeping failed (disk full...): the handoff goes on without it
        meta = self.dir / META
        try:
            info = json.loads(meta.read_text())
            self.saved = float(info["saved"])
            blocks = {str(k): self.dir / Path(str(v)).name for k, v in dict(info["blocks"]).items()}
        except (OSError, ValueError, KeyError, TypeError):
            return
        if (now or time.time()) - self.saved > KEEP_SECONDS:
            return  # too old to be worth its index: swept, not offered
        self.kept = {b: p for b, p in blocks.items() if p.is_file()}

    def refs(self) -> dict[str, Path]:
        """Ref id -> kept file, for the decoder (the files the offer describes)."""
        return {ref_id(b): p for b, p in self.kept.items()}

    def offer(self) -> bytes:
        """The RESUME payload; b"" (and nothing kept any more) if the kept files cannot be indexed."""
        try:
            return encode_offer(self.refs())
        except (OSError, NepheleError):
            self.kept = {}
            return b""

    # -- writing -----------------------------------------------------------------------------------
    def begin(self, blocks: list[tuple[str, int]]) -> None:
        """The stream's RAM blocks (name, size): open a sparse file for each, written as pages arrive.
        Best effort, like every write here: an error stops keeping pages, never the handoff."""
        with self._lock:
            try:
                self._begin(blocks)
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.failed = f"keeping pages for a retry failed: {exc}"
        self._closed = True
        for fd, _, _ in self._new.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _begin(self, blocks: list[tuple[str, int]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / WRITING).write_text(str(os.getpid()))
        for name, size in blocks:
            self._order.append(name)
            path = self.dir / (_file_name(name) + ".new")
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, size)
            self._new[name] = (fd, path, np.zeros(nblocks_of(size), np.bool_))

    def write(self, block: int, pages: np.ndarray, rows: np.ndarray) -> None:
        """Pages (numbers, any order, distinct) of RAM block #block with their verified content."""
        with self._lock:
            if not self._closed:
                try:
                    self._write(block, pages, rows)
                except OSError as exc:
                    self._fail(exc)

    def _write(self, block: int, pages: np.ndarray, rows: np.ndarray) -> None:
        if block >= len(self._order) or pages.size == 0:
            return
        fd, _, done = self._new[self._order[block]]
        order = np.argsort(pages, kind="stable")
        ps = pages[order]
        if int(ps[-1]) >= done.shape[0] or int(ps[0]) < 0:
            return  # beyond the block: the memory channel refuses such a stream itself
        cut = np.flatnonzero(np.diff(ps) != 1) + 1
        for a, b in zip([0, *cut.tolist()], [*cut.tolist(), ps.size], strict=True):
            buf = np.ascontiguousarray(rows[order[a:b]]).data.cast("B")
            off = int(ps[a]) * BLOCK
            while len(buf):
                k = os.pwrite(fd, buf, off)
                buf, off = buf[k:], off + k
        done[ps] = True
        self.written += int(ps.size)

    def _close_new(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd, _, _ in self._new.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def keep(self) -> dict[str, Any]:
        """The attempt failed: keep what it verified, merged with what earlier attempts kept (their
        pages this attempt did not rewrite). Returns a summary for the records."""
        self._close_new()
        if self.failed:
            self.discard()
            return {"kept": False, "pages": 0, "error": self.failed}
        try:
            if not self._new or not self.written:
                for _, path, _ in self._new.values():
                    path.unlink(missing_ok=True)
                return {"kept": bool(self.kept), "pages": 0}
            blocks: dict[str, str] = {}
            held_total = 0
            for name, (_, path, done) in self._new.items():
                old = self.kept.get(name)
                if old is not None:
                    self._merge(old, path, done)
                final = self.dir / _file_name(name)
                os.replace(path, final)
                index = BlockIndex.load_or_build(final)  # indexed now, not in the next handoff
                held_total += int(held_blocks(index).sum())
                blocks[name] = final.name
            for name, old in self.kept.items():  # blocks this attempt never declared: kept as they were
                blocks.setdefault(name, old.name)
            tmp = self.dir / (META + ".tmp")
            tmp.write_text(json.dumps({"saved": time.time(), "blocks": blocks}))
            os.replace(tmp, self.dir / META)
            return {"kept": True, "pages": held_total}
        except (OSError, NepheleError) as exc:  # best effort: a retry without it is only slower
            self.discard()
            return {"kept": False, "pages": 0, "error": str(exc)}
        finally:
            (self.dir / WRITING).unlink(missing_ok=True)

    @staticmethod
    def _merge(old: Path, new: Path, done: np.ndarray) -> None:
        """Copy into new the blocks old holds and this attempt did not write."""
        held = held_blocks(BlockIndex.load_or_build(old))
        k = min(held.shape[0], done.shape[0])
        want = np.zeros(done.shape[0], np.bool_)
        want[:k] = held[:k] & ~done[:k]
        if not want.any():
            return
        edges = np.flatnonzero(np.diff(np.concatenate(([False], want, [False])).astype(np.int8)))
        src = os.open(old, os.O_RDONLY)
        dst = os.open(new, os.O_WRONLY)
        try:
            size = os.fstat(src).st_size
            for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
                copy_range(src, dst, a * BLOCK, min(b * BLOCK, size), src_name=old)
        finally:
            os.close(src)
            os.close(dst)

    def discard(self) -> None:
        """Remove everything kept for this instance (the handoff succeeded, or the cache failed it)."""
        self._close_new()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.kept = {}


def size_of(root: Path) -> int:
    """Bytes the resume cache of a node holds on disk (allocated: the files are sparse)."""
    total = 0
    for p in resume_root(root).glob("*/*"):
        with contextlib.suppress(OSError):
            total += p.stat().st_blocks * 512
    return total


def sweep(root: Path, *, now: float | None = None) -> list[str]:
    """Remove what is too old to keep, and what dead receivers were writing (their earlier kept state
    stays). Never touches a directory a live receiver writes."""
    removed: list[str] = []
    now = now or time.time()
    base = resume_root(root)
    if not base.is_dir():
        return removed
    for d in base.iterdir():
        if not d.is_dir():
            continue
        try:
            owner = int((d / WRITING).read_text().strip() or 0)
        except (OSError, ValueError):
            owner = 0
        if owner and pid_alive(owner):
            continue
        for p in d.glob("*.new"):
            p.unlink(missing_ok=True)
        (d / WRITING).unlink(missing_ok=True)
        try:
            saved = float(json.loads((d / META).read_text())["saved"])
        except (OSError, ValueError, KeyError, TypeError):
            saved = 0.0
        if now - saved > KEEP_SECONDS:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed
