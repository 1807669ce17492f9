#!/usr/bin/env python3
"""Micro-benchmark of the delta engine's parts on a generated workload of a few hundred MiB.

    python bench/delta_kernels.py [--disk-mib 256] [--mem-mib 128] [--dir DIR] [--codec lz4|zstd]

Prints GB/s of: block hashing, the classification kernel alone (images already in RAM), index build,
encode_files and decode_files (files in the page cache), and the output size. Numbers are for one core on
a shared machine: repeat and compare ratios. (The comparison with xdelta3/zstd/rsync is
bench/delta_vs_tools.py.)
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nephele.delta import Target, decode_files, encode_files
from nephele.delta import _kernels as K
from nephele.delta.index import BlockIndex, RefSet, zero_hash

BLOCK = 4096


def text_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    alphabet = np.frombuffer(b"etaoin shrdlu\ncmfwypvbgkqjxz.,ETAOIN0123456789", np.uint8)
    return alphabet[rng.zipf(1.6, size=(n, BLOCK)) % alphabet.size]


def bin_blocks(rng: np.random.Generator, n: int) -> np.ndarray:
    w = rng.integers(0, 1 << 16, size=(n, BLOCK // 8), dtype=np.uint64)
    w[rng.random(w.shape) < 0.5] = 0
    ptr = rng.random(w.shape) < 0.2
    w[ptr] = np.uint64(0xFFFF888000000000) + (w[ptr] << np.uint64(12))
    return w.view(np.uint8).reshape(n, BLOCK)


def mixed(rng: np.random.Generator, n: int, zero: float) -> np.ndarray:
    out = np.zeros((n, BLOCK), np.uint8)
    kind = rng.choice(4, size=n, p=[zero, (1 - zero) * 0.35, (1 - zero) * 0.45, (1 - zero) * 0.2])
    for k, gen in ((1, text_blocks), (2, bin_blocks)):
        sel = np.flatnonzero(kind == k)
        out[sel] = gen(rng, sel.size)
    sel = np.flatnonzero(kind == 3)
    out[sel] = rng.integers(0, 256, size=(sel.size, BLOCK), dtype=np.uint8)
    return out


def modify(rng: np.random.Generator, img: np.ndarray, frac: float, refs: list[np.ndarray]) -> np.ndarray:
    """Dirty frac of the blocks: half zero, a fifth duplicates of reference blocks, the rest new
    (a third of those small edits of the base block)."""
    new = img.copy()
    n = img.shape[0]
    dirty = rng.choice(n, size=int(n * frac), replace=False)
    cls = rng.choice(4, size=dirty.size, p=[0.5, 0.2, 0.1, 0.2])
    new[dirty[cls == 0]] = 0
    d = dirty[cls == 1]
    src = refs[0] if len(refs) == 1 else np.concatenate(refs)
    new[d] = src[rng.integers(0, src.shape[0], d.size)]
    e = dirty[cls == 2]
    for j in range(8):
        pos = rng.integers(0, BLOCK, e.size)
        new[e, pos] ^= 0x5A + j
    r = dirty[cls == 3]
    new[r] = mixed(rng, r.size, 0.0)
    return new


def gbps(nbytes: int, secs: float) -> str:
    return f"{nbytes / secs / 1e9:6.2f} GB/s ({secs:.3f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--mem-mib", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--codec", default="lz4")
    ap.add_argument("--level", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="values per frame (default: the engine's)")
    ap.add_argument("--reuse", action="store_true", help="reuse images already in --dir (same sizes)")
    args = ap.parse_args()
    tmp = Path(args.dir or tempfile.mkdtemp(prefix="nephele-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)

    t = time.perf_counter()
    sizes = {"d0": args.disk_mib, "m0": args.mem_mib, "d1": args.disk_mib, "m1": args.mem_mib}
    paths = {name: tmp / f"{name}.img" for name in sizes}
    if args.reuse and all(p.exists() and p.stat().st_size == sizes[n] << 20 for n, p in paths.items()):
        d0, m0, d1, m1 = (
            np.fromfile(paths[n], np.uint8).reshape(-1, BLOCK) for n in ("d0", "m0", "d1", "m1")
        )
    else:
        d0 = mixed(rng, args.disk_mib * 256, 0.35)
        m0 = mixed(rng, args.mem_mib * 256, 0.30)
        m0[: m0.shape[0] // 7] = d0[rng.integers(0, d0.shape[0], m0.shape[0] // 7)]  # page cache
        d1 = modify(rng, d0, 0.04, [d0, m0])
        m1 = modify(rng, m0, 0.8, [m0, d0])
        for name, arr in (("d0", d0), ("m0", m0), ("d1", d1), ("m1", m1)):
            paths[name].write_bytes(arr.tobytes())
    for p in tmp.glob("*.nxi"):
        p.unlink()
    print(
        f"workload in {tmp}: disk {args.disk_mib} MiB, memory {args.mem_mib} MiB "
        f"({time.perf_counter() - t:.1f} s)"
    )
    total_new = d1.nbytes + m1.nbytes

    # kernels on arrays already in RAM, next to the machine's memory read speed
    words = d1.view(np.uint64).reshape(-1, 512)
    t = time.perf_counter()
    np.bitwise_or.reduce(words.reshape(-1))
    print("memory read (numpy OR-reduce)  ", gbps(d1.nbytes, time.perf_counter() - t))
    out = np.empty((words.shape[0], 2), np.uint64)
    K.hash_blocks(words, out)
    t = time.perf_counter()
    K.hash_blocks(words, out)
    print("hash nph128 (all blocks)       ", gbps(d1.nbytes, time.perf_counter() - t))

    rs = RefSet.open({"d0": paths["d0"], "m0": paths["m0"]}, cache=False)
    for new, base, bi in ((d1, d0, 0), (m1, m0, 1)):
        n = new.shape[0]
        for chunk in (n, 1024):  # whole arrays (DRAM-bound), and 4 MiB chunks as encode_files feeds it
            best = float("inf")
            for _ in range(3):  # best of 3, fresh state each time (the first run also pays page faults)
                cur = np.empty((n, 2), np.uint64)
                cur[:] = rs.indexes[bi].hashes
                stamp = np.zeros(n, np.int64)
                sk = np.zeros(1 << (2 * n).bit_length(), np.uint64)
                sv = np.zeros_like(sk, dtype=np.int64)
                cls = np.empty(n, np.uint8)
                arg = np.empty(n, np.int64)
                tst = np.array([0, n], np.int64)
                spent = 0.0
                for c in range(0, n, chunk):
                    sl = slice(c, min(n, c + chunk))
                    a = new[sl].copy() if chunk < n else new  # a chunk just read is in cache
                    b = base[sl].copy() if chunk < n else base
                    t = time.perf_counter()
                    K.classify(
                        a.view(np.uint64).reshape(-1, 512), b.view(np.uint64).reshape(-1, 512),
                        np.ones(a.shape[0], np.bool_), rs.indexes[bi].hashes[sl],
                        np.arange(sl.start, sl.stop, dtype=np.int64), cur, stamp, 1 + c,
                        rs.keys, rs.vals, rs.h2s, sk, sv, tst, cls[sl], arg[sl],
                    )  # fmt: skip
                    spent += time.perf_counter() - t
                best = min(best, spent)
            counts = np.bincount(cls, minlength=7)
            what = "whole image" if chunk == n else "4 MiB chunks"
            print(
                f"classify kernel ({'disk' if bi == 0 else 'memory'}, {what}), best of 3",
                gbps(new.nbytes, best),
                dict(
                    zip(("base", "zero", "raw", "xor", "ref", "stream", "keep"), counts.tolist(), strict=True)
                ),
            )
    rs.close()
    del words, out
    _ = zero_hash()

    t = time.perf_counter()
    BlockIndex.load_or_build(paths["d0"])
    BlockIndex.load_or_build(paths["m0"])
    print("index build (d0+m0, from file) ", gbps(d0.nbytes + m0.nbytes, time.perf_counter() - t))
    t = time.perf_counter()
    BlockIndex.load_or_build(paths["d0"])
    BlockIndex.load_or_build(paths["m0"])
    print(f"index load (cached .nxi)        {time.perf_counter() - t:.3f} s")

    # What the engine's I/O costs at least: read the new images and their bases (page cache), and copy the
    # new images to fresh files with fsync (what a decoder must write).
    buf = bytearray(16 << 20)
    t = time.perf_counter()
    for name in ("d1", "m1", "d0", "m0"):
        with open(paths[name], "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    print("read d1+m1+d0+m0 (page cache)  ", gbps(2 * total_new, time.perf_counter() - t))
    t = time.perf_counter()
    for name in ("d1", "m1"):
        with open(paths[name], "rb", buffering=0) as f, open(tmp / f"copy-{name}", "wb", buffering=0) as g:
            while k := f.readinto(buf):
                g.write(memoryview(buf)[:k])
            os.fsync(g.fileno())
    print("copy d1+m1 + fsync (cp-like)   ", gbps(total_new, time.perf_counter() - t))
    for name in ("d1", "m1"):
        (tmp / f"copy-{name}").unlink()

    refs = {"d0": paths["d0"], "m0": paths["m0"]}
    targets = [Target("disk", "disk", paths["d1"], "d0"), Target("memory", "memory", paths["m1"], "m0")]
    stream = tmp / "stream.nphd"
    for rep in range(2):
        with open(stream, "wb") as f:
            t = time.perf_counter()
            st = encode_files(refs, targets, f, codec=args.codec, level=args.level, batch_blocks=args.batch)
            f.flush()
            enc_s = time.perf_counter() - t
        outs = {"disk": tmp / "out-d1.img", "memory": tmp / "out-m1.img"}
        for p in outs.values():
            p.unlink(missing_ok=True)
        with open(stream, "rb") as f:
            t = time.perf_counter()
            dst = decode_files(f, refs, outs)
            dec_s = time.perf_counter() - t
        print(f"run {rep}: encode_files                 ", gbps(total_new, enc_s))
        # decode_files fsyncs in close(), after the stream is applied and verified: timed apart
        print(
            f"run {rep}: decode_files (page cache)    ",
            gbps(total_new, dec_s - dst.sync_seconds),
            f" then fsync {dst.sync_seconds:.2f} s",
        )
    size = os.path.getsize(stream)
    ok = all(outs[k].read_bytes() == paths[p].read_bytes() for k, p in (("disk", "d1"), ("memory", "m1")))
    print(st.table())
    print(f"stream {size / 2**20:.1f} MiB for {total_new / 2**20:.0f} MiB of images; outputs identical: {ok}")
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB "
        "(includes the generator)"
    )


if __name__ == "__main__":
    main()
