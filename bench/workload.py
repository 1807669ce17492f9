#!/usr/bin/env python3
"""Deterministic synthetic VM-state workload for the delta benchmark (bench/delta_vs_tools.py).

    python bench/workload.py --out DIR [--disk-mib 2048] [--mem-mib 1024] [--seed 42] [--scale 1.0]

Writes into DIR:
  D0.img, M0.img   base disk and base memory (what the receiver already holds)
  D1.img, M1.img   the modified pair (what a handoff has to ship)
  truth.npz        per block of D1 and M1: class, detailed kind, dup source (see TRUTH FILE below)
  summary.json     parameters, file sizes and xxh3-128 hashes, realised amounts per class and kind

The same seed and arguments give byte-identical images: one numpy Generator is consumed in a fixed order,
and every chunk has a fixed size. Images are written in 16 MiB chunks, so RAM stays far below image size.
summary.json is written last (atomically): a directory without it is not a finished workload.

CONTENT MODEL (tunable constants below; shaped like the measured handoff in PRIOR-ART-ELIJAH.md §3.1 #5)
  Base disk D0, extents of 64 blocks: zero, text (Zipf tokens), "bin" (zeros, small ints and pointers as
  64-bit words), random, and internal copies of other extents.
  Base memory M0, extents of 4 blocks: the same kinds plus page-cache copies of D0 runs.
  Dirtying works on aligned slots (16 blocks on disk, 4 in memory). At --scale 1.0 and the default sizes the
  dirtied amounts are the real example's MiB x 0.5 (memory: 482 MiB zero, 199 MiB dup, 257 MiB new; disk:
  3.9 / 50.8 / 38.8); other sizes scale proportionally. Zero slots are placed only over non-zero base data,
  edits (small changes of the base block at the same offset) likewise. Duplicates copy a block the receiver
  already has: the own base at another offset (contiguous runs on disk), the other base image, or a new block
  earlier in the same image ("stream").

Every generated (non-zero) block carries a unique 64-bit content id in its last 8 bytes, so two blocks are
byte-identical exactly when the generator copied one from the other. That is what makes the truth exact.

TRUTH FILE (truth.npz; stream order is D1 then M1, as the benchmark encodes them)
  {disk,memory}_class  uint8 per block: 0 unchanged (same bytes as the base at this offset, zero or not),
                       1 zero (all zero, base was not), 2 dup (bytes equal to a block the receiver has:
                       either base image, or a NEW block earlier in the stream), 3 new (first occurrence)
  {disk,memory}_kind   uint8 detail: 0 unchanged, 1 zero, 2 dup of the own base, 3 dup of the other base,
                       4 dup of an earlier stream block, 5 new edit, 6 new text, 7 new bin, 8 new random
  {disk,memory}_src    int64 for dups: image << 40 | block, image 0 D0, 1 M0, 2 D1, 3 M1 (own base first,
                       then the other base, each at its first block with these bytes); -1 otherwise
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

VERSION = 2  # bump when the content model changes: cached workloads are keyed on it
BLOCK = 4096
WORDS = BLOCK // 8
BLOCKS_PER_MIB = (1 << 20) // BLOCK
CHUNK_BLOCKS = 4096  # 16 MiB per write; also fixes the order of random draws
FILES = {"D0": "D0.img", "M0": "M0.img", "D1": "D1.img", "M1": "M1.img"}
SUMMARY = "summary.json"
TRUTH = "truth.npz"
IMG_D0, IMG_M0, IMG_D1, IMG_M1 = 0, 1, 2, 3
SRC_SHIFT = 40

# Generation kinds (plan only).
G_KEEP, G_ZERO, G_TEXT, G_BIN, G_RAND, G_EDIT, G_COPY = range(7)
GENERATED = (G_TEXT, G_BIN, G_RAND, G_EDIT)
# Truth classes and detailed kinds.
C_UNCHANGED, C_ZERO, C_DUP, C_NEW = 0, 1, 2, 3
CLASS_NAMES = ("unchanged", "zero", "dup", "new")
K_UNCHANGED, K_ZERO, K_DUP_SAME, K_DUP_OTHER, K_DUP_STREAM, K_NEW_EDIT, K_NEW_TEXT, K_NEW_BIN, K_NEW_RAND = (
    range(9)
)
KIND_NAMES = ("unchanged", "zero", "dup_same", "dup_other", "dup_stream", "edit", "text", "bin", "rand")
NEW_KIND = {G_EDIT: K_NEW_EDIT, G_TEXT: K_NEW_TEXT, G_BIN: K_NEW_BIN, G_RAND: K_NEW_RAND}

# Base images: shares of extents ("copy" = internal duplicate, "cache" = page-cache copy of a D0 run).
DISK_EXTENT, MEM_EXTENT = 64, 4
DISK_BASE = {"zero": 0.35, "text": 0.20, "bin": 0.25, "rand": 0.15, "copy": 0.05}
MEM_BASE = {"zero": 0.30, "cache": 0.15, "text": 0.10, "bin": 0.35, "rand": 0.05, "copy": 0.05}
# Dirtied MiB of the real example (memory 1876 MiB, disk 187 MiB) x 0.5, over the default 2048/1024 MiB.
REF_DISK_MIB, REF_MEM_MIB = 2048, 1024
DISK_DIRTY_MIB = {"zero": 7.82 / 2, "dup": 101.62 / 2, "new": 77.52 / 2}
MEM_DIRTY_MIB = {"zero": 964.99 / 2, "dup": 397.12 / 2, "new": 514.30 / 2}
DISK_SLOT, MEM_SLOT = 16, 4
DISK_DUP = {"same": 0.60, "other": 0.15, "stream": 0.25}  # same = D0, other = M0
MEM_DUP = {"same": 0.35, "other": 0.45, "stream": 0.20}  # same = M0, other = D0
DISK_NEW = {"edit": 0.25, "text": 0.30, "bin": 0.20, "rand": 0.25}
MEM_NEW = {"edit": 0.30, "text": 0.20, "bin": 0.35, "rand": 0.15}
GEN_OF = {"zero": G_ZERO, "text": G_TEXT, "bin": G_BIN, "rand": G_RAND, "edit": G_EDIT}

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]
Bool = npt.NDArray[np.bool_]


class WorkloadError(Exception):
    """The requested workload cannot be generated as asked (message says why)."""


# ---------------------------------------------------------------------------------------------------------
# Page generators: each returns (n, BLOCK) uint8 rows; callers stamp the content id afterwards.


class TextGen:
    """Zipf-distributed words from a fixed random vocabulary, separated by spaces and some newlines."""

    WIDTH = 16

    def __init__(self, rng: np.random.Generator, vocab: int = 4096) -> None:
        lens = np.clip(rng.geometric(0.22, vocab) + 1, 1, self.WIDTH - 2)
        words = rng.integers(ord("a"), ord("z") + 1, (vocab, self.WIDTH), dtype=np.uint8)
        punct = rng.random(vocab)
        rows = np.arange(vocab)
        # Some words carry punctuation; every token ends with a separator (space, or newline below).
        words[rows, lens] = np.where(punct < 0.06, ord(","), np.where(punct < 0.10, ord("."), ord(" ")))
        lens = lens + (punct < 0.10)
        words[rows, lens] = ord(" ")
        lines = words.copy()
        lines[rows, lens] = ord("\n")
        self.table = np.concatenate([words, lines])  # token t < vocab: word + " ", t >= vocab: word + "\n"
        self.tlen = np.concatenate([lens, lens]).astype(np.int64) + 1
        # Inverse-CDF lookup with 2^20 buckets: sampling is one integer draw and one gather per token.
        p = 1.0 / np.arange(1, vocab + 1) ** 1.05
        cdf = np.cumsum(p / p.sum())
        self.lookup = np.searchsorted(cdf, (np.arange(1 << 20) + 0.5) / (1 << 20)).astype(np.uint16)
        self.mean = float((p / p.sum() * self.tlen[:vocab]).sum())
        self.vocab = vocab

    def pages(self, rng: np.random.Generator, n: int) -> U8:
        need = n * BLOCK
        parts: list[U8] = []
        have = 0
        while have < need:
            k = int((need - have) / self.mean * 1.03) + 64
            tok = self.lookup[rng.integers(0, 1 << 20, k, dtype=np.uint32)].astype(np.int64)
            tok += self.vocab * (rng.integers(0, 16, k, dtype=np.uint8) == 0)  # about 1 line break in 16
            rows = self.table[tok]
            s = rows[np.arange(self.WIDTH) < self.tlen[tok][:, None]]
            parts.append(s)
            have += s.size
        return np.concatenate(parts)[:need].reshape(n, BLOCK)


def bin_pages(rng: np.random.Generator, n: int) -> U8:
    """Words like a heap page: about 44 % zero, 25 % small ints, 19 % pointers near a per-page base,
    12 % arbitrary 64-bit values."""
    r = np.frombuffer(rng.bytes(n * BLOCK), dtype=np.uint64).reshape(n, WORDS)
    base = (rng.integers(0, 1 << 20, (n, 1), dtype=np.uint64) << np.uint64(24)) | np.uint64(
        0xFFFF888000000000
    )
    sel = r >> np.uint64(60)
    w = np.where(sel < 11, r & np.uint64(0x3FF), r)
    w = np.where(sel < 7, np.uint64(0), w)
    w = np.where((sel >= 11) & (sel < 14), base | (r & np.uint64(0xFFFF8)), w)
    return w.view(np.uint8).reshape(n, BLOCK)


def rand_pages(rng: np.random.Generator, n: int) -> U8:
    return np.frombuffer(rng.bytes(n * BLOCK), dtype=np.uint8).reshape(n, BLOCK)


def edit_pages(rng: np.random.Generator, base: U8) -> U8:
    """Small edits of base pages: 1 to 20 words changed (counter bumps or new values)."""
    n, most = base.shape[0], 20
    out = base.copy()
    w = out.view(np.uint64)
    k = np.asarray(rng.integers(1, most + 1, n), dtype=np.int64)
    pos = rng.integers(0, WORDS - 1, (n, most))  # the last word is the content id
    bump = rng.integers(1, 256, (n, most), dtype=np.uint64)
    fresh = np.frombuffer(rng.bytes(n * most * 8), dtype=np.uint64).reshape(n, most)
    use_bump = rng.random((n, most)) < 0.5
    live = np.arange(most) < k[:, None]
    rows = np.broadcast_to(np.arange(n)[:, None], (n, most))[live]
    cols = pos[live]
    w[rows, cols] = np.where(use_bump[live], w[rows, cols] + bump[live], fresh[live])
    return out


# ---------------------------------------------------------------------------------------------------------
# Plans: per block what to write and which content id results (0 = zero block).


@dataclass
class Plan:
    img: int
    n: int
    kind: U8  # G_* per block
    cid: I64  # content id per block after generation (0 = all zero)
    src: I64  # for G_COPY: image << 40 | block of the bytes to copy; else -1

    @classmethod
    def empty(cls, img: int, n: int) -> Plan:
        return cls(img, n, np.zeros(n, np.uint8), np.zeros(n, np.int64), np.full(n, -1, np.int64))


class _Ids:
    """Fresh content ids, handed out in a fixed order."""

    def __init__(self) -> None:
        self.next = 1

    def take(self, k: int) -> I64:
        out = np.arange(self.next, self.next + k, dtype=np.int64)
        self.next += k
        return out


def _split(total: int, shares: Sequence[float]) -> list[int]:
    """Integer counts summing to total, proportional to shares (largest remainder)."""
    raw = np.asarray(shares, dtype=np.float64) / sum(shares) * total
    counts = np.floor(raw).astype(np.int64)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def _runs(starts: I64, length: int) -> I64:
    return (starts[:, None] + np.arange(length)).ravel()


def plan_base(
    rng: np.random.Generator,
    img: int,
    n: int,
    extent: int,
    mix: dict[str, float],
    ids: _Ids,
    disk: Plan | None,
) -> Plan:
    plan = Plan.empty(img, n)
    slots = n // extent
    names = list(mix)
    slot_kind = np.repeat(np.arange(len(names)), _split(slots, [mix[k] for k in names]))
    slot_kind = rng.permutation(slot_kind)
    for i, name in enumerate(names):
        if name in GEN_OF:
            plan.kind[_runs(np.flatnonzero(slot_kind == i) * extent, extent)] = GEN_OF[name]
    uniq = np.isin(plan.kind, (G_TEXT, G_BIN, G_RAND))
    plan.cid[uniq] = ids.take(int(uniq.sum()))
    # Copies take contiguous runs of generated (never copied, never zero) blocks as their source.
    for i, name in enumerate(names):
        if name not in ("copy", "cache"):
            continue
        targets = np.flatnonzero(slot_kind == i)
        src_plan = plan if name == "copy" else disk
        if src_plan is None or not targets.size:
            continue
        ok = np.isin(src_plan.kind, (G_TEXT, G_BIN, G_RAND)).reshape(-1, extent).all(axis=1)
        cand = np.flatnonzero(ok)
        if not cand.size:
            raise WorkloadError(f"image {img}: no generated extent to copy from (image too small)")
        src = _runs(cand[rng.integers(0, cand.size, targets.size)] * extent, extent)
        dst = _runs(targets * extent, extent)
        plan.kind[dst] = G_COPY
        plan.cid[dst] = src_plan.cid[src]
        plan.src[dst] = (src_plan.img << SRC_SHIFT) | src
    return plan


def _slot_count(mib: float, n: int, ref_blocks: int, scale: float, slot: int) -> int:
    want = mib * BLOCKS_PER_MIB * n / ref_blocks * scale / slot
    return max(1, round(want)) if want > 0 else 0


def plan_dirty(
    rng: np.random.Generator,
    img: int,
    base: Plan,
    other: Plan,
    *,
    slot: int,
    dirty_mib: dict[str, float],
    ref_blocks: int,
    scale: float,
    dup_mix: dict[str, float],
    new_mix: dict[str, float],
    contiguous_same: bool,
    ids: _Ids,
) -> Plan:
    n = base.n
    plan = Plan(img, n, np.full(n, G_KEEP, np.uint8), base.cid.copy(), np.full(n, -1, np.int64))
    slots = n // slot
    n_zero, n_dup, n_new = (
        _slot_count(dirty_mib[k], n, ref_blocks, scale, slot) for k in ("zero", "dup", "new")
    )
    new_names = list(new_mix)
    new_counts = dict(zip(new_names, _split(n_new, [new_mix[k] for k in new_names]), strict=True))
    nonzero = np.flatnonzero((base.cid.reshape(slots, slot) != 0).all(axis=1))
    name = "disk" if img == IMG_D1 else "memory"
    if n_zero + new_counts["edit"] > nonzero.size:
        raise WorkloadError(
            f"{name}: --scale {scale} needs {n_zero + new_counts['edit']} non-zero base slots for zero "
            f"pages and edits, the base has {nonzero.size}"
        )
    p = rng.permutation(nonzero)
    zero_s, edit_s = p[:n_zero], p[n_zero : n_zero + new_counts["edit"]]
    taken = np.zeros(slots, np.bool_)
    taken[p[: n_zero + new_counts["edit"]]] = True
    free = rng.permutation(np.flatnonzero(~taken))
    rest = [("dup", n_dup)] + [(k, c) for k, c in new_counts.items() if k != "edit"]
    if sum(c for _, c in rest) > free.size:
        raise WorkloadError(
            f"{name}: --scale {scale} dirties {n_zero + n_dup + n_new} slots of {slot} blocks, "
            f"the image has {slots}"
        )
    chosen: dict[str, I64] = {"zero": zero_s, "edit": edit_s}
    at = 0
    for k, c in rest:
        chosen[k] = free[at : at + c]
        at += c
    for k in ("zero", "edit", "text", "bin", "rand"):
        plan.kind[_runs(chosen[k] * slot, slot)] = GEN_OF[k]
    plan.cid[plan.kind == G_ZERO] = 0
    new_blocks = np.flatnonzero(np.isin(plan.kind, GENERATED))
    plan.cid[new_blocks] = ids.take(new_blocks.size)

    dup_names = list(dup_mix)
    dup_kind = rng.permutation(
        np.repeat(np.arange(len(dup_names)), _split(chosen["dup"].size, [dup_mix[k] for k in dup_names]))
    )
    for i, how in enumerate(dup_names):
        slots_i = np.sort(chosen["dup"][dup_kind == i])
        if not slots_i.size:
            continue
        dst = _runs(slots_i * slot, slot)
        if how == "same" and contiguous_same:
            src_plan, src = base, _pick_runs(rng, base, slots_i, slot)
        elif how == "stream":
            src_plan, src = plan, _pick_stream(rng, new_blocks, dst)
            fallback = src < 0  # no new block earlier in the image: copy from the own base instead
            if fallback.any():
                src[fallback] = _pick_blocks(rng, base, dst[fallback], base.cid)
        else:
            src_plan = base if how == "same" else other
            src = _pick_blocks(rng, src_plan, dst, base.cid)
        src_img = np.full(dst.size, src_plan.img, np.int64)
        if how == "stream":
            src_img[fallback] = base.img
        src_cid = np.empty(dst.size, np.int64)
        for p_ in (plan, base, other):
            m = src_img == p_.img
            src_cid[m] = p_.cid[src[m]]
        plan.kind[dst] = G_COPY
        plan.cid[dst] = src_cid
        plan.src[dst] = (src_img << SRC_SHIFT) | src
    return plan


def _pick_blocks(rng: np.random.Generator, src: Plan, dst: I64, dst_base_cid: I64) -> I64:
    """Random non-zero source blocks whose bytes differ from the base at the destination offset."""
    cand = np.flatnonzero(src.cid != 0)
    out = cand[rng.integers(0, cand.size, dst.size)]
    for _ in range(64):
        bad = np.flatnonzero(src.cid[out] == dst_base_cid[dst])
        if not bad.size:
            break
        out[bad] = cand[rng.integers(0, cand.size, bad.size)]
    return out


def _pick_runs(rng: np.random.Generator, base: Plan, dst_slots: I64, slot: int) -> I64:
    """Contiguous non-zero runs of the base at other offsets (a file copied or moved on disk)."""
    grid = base.cid.reshape(-1, slot)
    cand = np.flatnonzero((grid != 0).all(axis=1))
    out = cand[rng.integers(0, cand.size, dst_slots.size)]
    for _ in range(64):
        bad = np.flatnonzero((grid[out] == grid[dst_slots]).any(axis=1))
        if not bad.size:
            break
        out[bad] = cand[rng.integers(0, cand.size, bad.size)]
    return _runs(out * slot, slot)


def _pick_stream(rng: np.random.Generator, new_blocks: I64, dst: I64) -> I64:
    """A random new block earlier in the same image, or -1 where there is none."""
    before = np.searchsorted(new_blocks, dst)
    idx = (rng.random(dst.size) * before).astype(np.int64)
    return np.where(before > 0, new_blocks[np.minimum(idx, max(new_blocks.size - 1, 0))], -1)


# ---------------------------------------------------------------------------------------------------------
# Writing.


def _read_exact(f: Any, view: memoryview) -> None:
    got = 0
    while got < len(view):
        k = f.readinto(view[got:])
        if not k:
            raise WorkloadError(f"{f.name}: ended early while reading the base image")
        got += k


def write_image(
    path: Path, plan: Plan, rng: np.random.Generator, text: TextGen, base_path: Path | None
) -> None:
    """Pass 1: stream the base (or zeros) through, generating the planned blocks chunk by chunk."""
    buf = np.empty((CHUNK_BLOCKS, BLOCK), np.uint8)
    gens: dict[int, Callable[[np.random.Generator, int], U8]] = {
        G_TEXT: text.pages,
        G_BIN: bin_pages,
        G_RAND: rand_pages,
    }
    with open(path, "wb") as f, open(base_path, "rb") if base_path else contextlib.nullcontext() as bf:
        for start in range(0, plan.n, CHUNK_BLOCKS):
            m = min(CHUNK_BLOCKS, plan.n - start)
            b = buf[:m]
            if bf is not None:
                _read_exact(bf, memoryview(b.data).cast("B"))
            else:
                b.fill(0)
            k = plan.kind[start : start + m]
            b[k == G_ZERO] = 0
            for g, fn in gens.items():
                rows = np.flatnonzero(k == g)
                if rows.size:
                    b[rows] = fn(rng, rows.size)
            rows = np.flatnonzero(k == G_EDIT)
            if rows.size:
                b[rows] = edit_pages(rng, b[rows])
            rows = np.flatnonzero(np.isin(k, GENERATED))
            b.view("<u8")[rows, WORDS - 1] = plan.cid[start + rows].astype(np.uint64)
            f.write(memoryview(b.data).cast("B"))


def apply_copies(path: Path, plan: Plan, sources: dict[int, Path], sizes: dict[int, int]) -> None:
    """Pass 2: fill G_COPY blocks from their (final) source blocks. Sources are never copies themselves."""
    rows = np.flatnonzero(plan.kind == G_COPY)
    if not rows.size:
        return
    dst = np.memmap(path, dtype=np.uint8, mode="r+", shape=(plan.n, BLOCK))
    src_img = plan.src[rows] >> SRC_SHIFT
    src_blk = plan.src[rows] & ((1 << SRC_SHIFT) - 1)
    for img in np.unique(src_img):
        src = (
            dst
            if img == plan.img
            else np.memmap(sources[int(img)], dtype=np.uint8, mode="r", shape=(sizes[int(img)], BLOCK))
        )
        sel = np.flatnonzero(src_img == img)
        for i in range(0, sel.size, CHUNK_BLOCKS):
            part = sel[i : i + CHUNK_BLOCKS]
            dst[rows[part]] = src[src_blk[part]]
        del src
    dst.flush()
    del dst


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while k := f.readinto(view):
            h.update(view[:k])
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Truth: derived from the content ids, which equal exactly when the bytes do.


def _first_loc(cid: I64) -> tuple[I64, I64]:
    u, first = np.unique(cid, return_index=True)
    return u, first.astype(np.int64)


def _lookup(table: tuple[I64, I64], keys: I64) -> tuple[Bool, I64]:
    u, first = table
    pos = np.minimum(np.searchsorted(u, keys), u.size - 1)
    return u[pos] == keys, first[pos]


def derive_truth(d0: Plan, m0: Plan, d1: Plan, m1: Plan) -> dict[str, npt.NDArray[Any]]:
    tables = {IMG_D0: _first_loc(d0.cid), IMG_M0: _first_loc(m0.cid)}
    out: dict[str, npt.NDArray[Any]] = {}
    pending: list[tuple[str, Plan, I64]] = []  # blocks in no reference image, for the stream pass
    for name, tgt, base, other in (("disk", d1, d0, m0), ("memory", m1, m0, d0)):
        cls = np.zeros(tgt.n, np.uint8)
        kind = np.zeros(tgt.n, np.uint8)
        src = np.full(tgt.n, -1, np.int64)
        unchanged = tgt.cid == base.cid
        zero = ~unchanged & (tgt.cid == 0)
        cls[zero], kind[zero] = C_ZERO, K_ZERO
        idx = np.flatnonzero(~unchanged & ~zero)
        left = np.ones(idx.size, np.bool_)
        for ref, k in ((base, K_DUP_SAME), (other, K_DUP_OTHER)):
            hit, loc = _lookup(tables[ref.img], tgt.cid[idx])
            hit &= left
            cls[idx[hit]], kind[idx[hit]] = C_DUP, k
            src[idx[hit]] = (ref.img << SRC_SHIFT) | loc[hit]
            left &= ~hit
        pending.append((name, tgt, idx[left]))
        out[f"{name}_class"], out[f"{name}_kind"], out[f"{name}_src"] = cls, kind, src
    # Stream order is D1 then M1: the first occurrence of bytes is new, later ones are dups of it.
    cids = np.concatenate([t.cid[i] for _, t, i in pending])
    imgs = np.concatenate([np.full(i.size, t.img, np.int64) for _, t, i in pending])
    blks = np.concatenate([i for _, _, i in pending])
    _, first, inv = np.unique(cids, return_index=True, return_inverse=True)
    first_of = first[inv]
    is_first = first_of == np.arange(cids.size)
    at = 0
    for name, tgt, idx in pending:
        sl = slice(at, at + idx.size)
        at += idx.size
        new = is_first[sl]
        cls_, kind_, src_ = out[f"{name}_class"], out[f"{name}_kind"], out[f"{name}_src"]
        gk = tgt.kind[idx[new]]
        if not np.isin(gk, GENERATED).all():
            raise AssertionError("generator bug: a copied block is not in any reference image")
        cls_[idx[new]] = C_NEW
        kind_[idx[new]] = np.array([NEW_KIND.get(g, 0) for g in range(7)], np.uint8)[gk]
        dup = idx[~new]
        f = first_of[sl][~new]
        cls_[dup], kind_[dup] = C_DUP, K_DUP_STREAM
        src_[dup] = (imgs[f] << SRC_SHIFT) | blks[f]
    return out


def truth_amounts(truth: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for name in ("disk", "memory"):
        cls, kind = truth[f"{name}_class"], truth[f"{name}_kind"]
        cc = np.bincount(cls, minlength=4)
        kc = np.bincount(kind, minlength=len(KIND_NAMES))
        res[name] = {
            "blocks": {CLASS_NAMES[i]: int(cc[i]) for i in range(4)},
            "mib": {CLASS_NAMES[i]: round(int(cc[i]) / BLOCKS_PER_MIB, 3) for i in range(4)},
            "kind_mib": {
                KIND_NAMES[i]: round(int(kc[i]) / BLOCKS_PER_MIB, 3) for i in range(len(KIND_NAMES))
            },
        }
    res["new_bytes_total"] = sum(res[n]["blocks"]["new"] for n in ("disk", "memory")) * BLOCK
    return res


def load_truth(out: Path) -> dict[str, npt.NDArray[Any]]:
    with np.load(out / TRUTH) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------------------


def params_of(disk_mib: int, mem_mib: int, seed: int, scale: float) -> dict[str, Any]:
    return {"version": VERSION, "disk_mib": disk_mib, "mem_mib": mem_mib, "seed": seed, "scale": scale}


def generate(
    out: Path,
    disk_mib: int = REF_DISK_MIB,
    mem_mib: int = REF_MEM_MIB,
    seed: int = 42,
    scale: float = 1.0,
    *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the workload into out and return its summary (also written as out/summary.json)."""
    if disk_mib < 1 or mem_mib < 1:
        raise WorkloadError(f"image sizes must be at least 1 MiB (got disk {disk_mib}, memory {mem_mib})")
    if not scale > 0:
        raise WorkloadError(f"--scale must be positive (got {scale})")
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    ids = _Ids()
    text = TextGen(rng)
    n_d, n_m = disk_mib * BLOCKS_PER_MIB, mem_mib * BLOCKS_PER_MIB
    d0 = plan_base(rng, IMG_D0, n_d, DISK_EXTENT, DISK_BASE, ids, None)
    m0 = plan_base(rng, IMG_M0, n_m, MEM_EXTENT, MEM_BASE, ids, d0)
    d1 = plan_dirty(
        rng,
        IMG_D1,
        d0,
        m0,
        slot=DISK_SLOT,
        dirty_mib=DISK_DIRTY_MIB,
        ref_blocks=REF_DISK_MIB * BLOCKS_PER_MIB,
        scale=scale,
        dup_mix=DISK_DUP,
        new_mix=DISK_NEW,
        contiguous_same=True,
        ids=ids,
    )
    m1 = plan_dirty(
        rng,
        IMG_M1,
        m0,
        d0,
        slot=MEM_SLOT,
        dirty_mib=MEM_DIRTY_MIB,
        ref_blocks=REF_MEM_MIB * BLOCKS_PER_MIB,
        scale=scale,
        dup_mix=MEM_DUP,
        new_mix=MEM_NEW,
        contiguous_same=False,
        ids=ids,
    )
    tmp = {k: out / (v + ".tmp") for k, v in FILES.items()}
    final = {k: out / v for k, v in FILES.items()}
    paths = {IMG_D0: tmp["D0"], IMG_M0: tmp["M0"], IMG_D1: tmp["D1"], IMG_M1: tmp["M1"]}
    sizes = {IMG_D0: n_d, IMG_M0: n_m, IMG_D1: n_d, IMG_M1: n_m}
    try:
        for plan, base in ((d0, None), (m0, None), (d1, IMG_D0), (m1, IMG_M0)):
            t = time.perf_counter()
            write_image(paths[plan.img], plan, rng, text, paths[base] if base is not None else None)
            apply_copies(paths[plan.img], plan, paths, sizes)
            mib = plan.n * BLOCK / 2**20
            say(f"{list(FILES.values())[plan.img]}: {mib:.0f} MiB in {time.perf_counter() - t:.1f} s")
        truth = derive_truth(d0, m0, d1, m1)
        np.savez(out / TRUTH, **truth)  # type: ignore[arg-type]
        hashes = {k: file_hash(p) for k, p in tmp.items()}
        for k in FILES:
            os.replace(tmp[k], final[k])
    except BaseException:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        raise
    summary: dict[str, Any] = {
        "generator": "nephele bench/workload.py",
        "params": params_of(disk_mib, mem_mib, seed, scale),
        "block_size": BLOCK,
        "files": {
            k: {"path": FILES[k], "bytes": sizes[i] * BLOCK, "xxh3_128": hashes[k]}
            for i, k in enumerate(FILES)
        },
        "refs": {"D0": FILES["D0"], "M0": FILES["M0"]},
        "targets": {
            "disk": {"path": FILES["D1"], "base": "D0"},
            "memory": {"path": FILES["M1"], "base": "M0"},
        },
        "truth": truth_amounts(truth),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    tmp_summary = out / (SUMMARY + ".tmp")
    tmp_summary.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp_summary, out / SUMMARY)
    say(f"workload in {out}: {summary['seconds']} s")
    return summary


def read_summary(out: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    return data


def is_current(out: Path, params: dict[str, Any]) -> bool:
    """True if out holds a finished workload made with exactly these parameters (files of the right size)."""
    s = read_summary(out)
    if s is None or s.get("params") != params:
        return False
    try:
        return all((out / f["path"]).stat().st_size == f["bytes"] for f in s["files"].values())
    except (OSError, KeyError, TypeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, required=True, help="directory to write the images into")
    ap.add_argument("--disk-mib", type=int, default=REF_DISK_MIB)
    ap.add_argument("--mem-mib", type=int, default=REF_MEM_MIB)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiplies the dirtied amounts (1.0 = BASELINES §4)"
    )
    a = ap.parse_args(argv)
    try:
        s = generate(a.out, a.disk_mib, a.mem_mib, a.seed, a.scale, log=lambda m: print(m, file=sys.stderr))
    except WorkloadError as e:
        print(f"workload: {e}", file=sys.stderr)
        return 2
    for name in ("disk", "memory"):
        t = s["truth"][name]
        print(f"{name:7s} MiB: " + ", ".join(f"{k} {v}" for k, v in t["mib"].items()))
        print(
            f"{'':7s} kinds: " + ", ".join(f"{k} {v}" for k, v in t["kind_mib"].items() if k != "unchanged")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
