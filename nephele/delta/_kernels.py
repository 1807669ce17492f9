"""numba kernels of the delta engine: block hash, zero test, classifier, hash tables.

Everything works on whole arrays of 4 KiB blocks viewed as ``uint64[n, 512]``; no Python runs per block.
All kernels are ``cache=True`` (compiled once into ``NUMBA_CACHE_DIR``) and ``nogil=True`` so a second
thread can read or compress while one classifies.

The block hash ("nph128") is two xxh64-style 4-lane accumulators over the same words, sharing the
product ``m = w*P2`` (a bijection of the word, so nothing is lost): lanes ``a`` use xxh64's round
``rotl(a + m, 31) * P1``; lanes ``b`` a different round ``rotl(b ^ m, 27) * P3 + P5`` with another
seed. Each half ends with xxh64's merge and avalanche. It is not XXH3 and not cryptographic: it is a
fast (memory-bound on this machine) 128-bit fingerprint for dedup candidates and for the per-block
verification list (see ``wire.py``). Half ``h1`` keys the hash tables; a table hit is confirmed with
``h2`` and then either byte for byte (reference images) or by the full 128 bits plus a version check
(blocks earlier in the stream).
"""

from __future__ import annotations

import numpy as np
from numba import njit

WORDS = 512  # uint64 words per 4 KiB block

P1 = np.uint64(0x9E3779B185EBCA87)
P2 = np.uint64(0xC2B2AE3D27D4EB4F)
P3 = np.uint64(0x165667B19E3779F9)
P4 = np.uint64(0x85EBCA77C2B2AE63)
P5 = np.uint64(0x27D4EB2F165667C5)
SEED_A = np.uint64(0x6E657068656C6531)  # "nephele1"
SEED_B = np.uint64(0x6E657068656C6532)  # "nephele2"
U0 = np.uint64(0)
U1 = np.uint64(1)
R1 = np.uint64(1)
R7 = np.uint64(7)
R12 = np.uint64(12)
R18 = np.uint64(18)
R27 = np.uint64(27)
R31 = np.uint64(31)
S29 = np.uint64(29)
S32 = np.uint64(32)
S33 = np.uint64(33)
BLOCK_LEN = np.uint64(4096)
LOW40 = np.int64((1 << 40) - 1)

# Block classes: these are also the op codes on the wire (wire.py documents them).
BASE = 0  # equal to the base image block at the same offset
ZERO = 1  # all zero bytes
RAW = 2  # sent by value
XOR = 3  # sent by value, XOR the base block at the same offset
REF = 4  # a block of a reference image: arg = ref << 40 | block
STREAM = 5  # the current content of a block sent earlier in this stream: arg = target << 40 | block
KEEP = 6  # the receiver already holds exactly this content at this place
XOR_LIMIT = WORDS // 4  # XOR when fewer than a quarter of the words differ from the base block


@njit(inline="always")
def _rotl(x: np.uint64, r: np.uint64) -> np.uint64:
    return (x << r) | (x >> (np.uint64(64) - r))


@njit(inline="always")
def _merge(h: np.uint64, acc: np.uint64) -> np.uint64:
    acc = _rotl(acc * P2, R31) * P1
    return (h ^ acc) * P1 + P4


@njit(inline="always")
def _avalanche(h: np.uint64) -> np.uint64:
    h ^= h >> S33
    h *= P2
    h ^= h >> S29
    h *= P3
    h ^= h >> S32
    return h


@njit(inline="always")
def _hash_row(w: np.ndarray) -> tuple[np.uint64, np.uint64]:
    a0 = SEED_A + P1 + P2
    a1 = SEED_A + P2
    a2 = SEED_A
    a3 = SEED_A - P1
    b0 = SEED_B + P3
    b1 = SEED_B ^ P4
    b2 = SEED_B + P5
    b3 = SEED_B - P3
    for k in range(0, WORDS, 4):
        m0 = w[k] * P2
        m1 = w[k + 1] * P2
        m2 = w[k + 2] * P2
        m3 = w[k + 3] * P2
        a0 = _rotl(a0 + m0, R31) * P1
        a1 = _rotl(a1 + m1, R31) * P1
        a2 = _rotl(a2 + m2, R31) * P1
        a3 = _rotl(a3 + m3, R31) * P1
        b0 = _rotl(b0 ^ m0, R27) * P3 + P5
        b1 = _rotl(b1 ^ m1, R27) * P3 + P5
        b2 = _rotl(b2 ^ m2, R27) * P3 + P5
        b3 = _rotl(b3 ^ m3, R27) * P3 + P5
    ha = _rotl(a0, R1) + _rotl(a1, R7) + _rotl(a2, R12) + _rotl(a3, R18)
    ha = _merge(ha, a0)
    ha = _merge(ha, a1)
    ha = _merge(ha, a2)
    ha = _merge(ha, a3)
    hb = _rotl(b0, R7) + _rotl(b1, R1) + _rotl(b2, R18) + _rotl(b3, R12)
    hb = _merge(hb, b3)
    hb = _merge(hb, b2)
    hb = _merge(hb, b1)
    hb = _merge(hb, b0)
    return _avalanche(ha + BLOCK_LEN), _avalanche(hb ^ BLOCK_LEN)


@njit(cache=True, nogil=True)
def hash_blocks(words: np.ndarray, out: np.ndarray) -> None:
    """out[i] = nph128(words[i]) for words uint64[n, 512], out uint64[n, 2]."""
    for i in range(words.shape[0]):
        h1, h2 = _hash_row(words[i])
        out[i, 0] = h1
        out[i, 1] = h2


@njit(inline="always")
def _is_zero(w: np.ndarray) -> bool:
    acc = U0
    for k in range(WORDS):
        acc |= w[k]
    return bool(acc == U0)


@njit(cache=True, nogil=True)
def nonzero_rows(words: np.ndarray, out: np.ndarray) -> int:
    """out[i] = block i is not all zero; returns how many are."""
    count = 0
    for i in range(words.shape[0]):
        nz = not _is_zero(words[i])
        out[i] = nz
        count += nz
    return count


@njit(inline="always")
def _slot(key: np.uint64, mask: np.uint64) -> np.int64:
    return np.int64(key & mask)


@njit(inline="always")
def _key(h1: np.uint64) -> np.uint64:
    return h1 if h1 != U0 else U1  # 0 marks an empty slot


@njit(cache=True, nogil=True)
def ref_table_insert(
    keys: np.ndarray, vals: np.ndarray, h2s: np.ndarray, hashes: np.ndarray, ref: int
) -> int:
    """Insert every non-zero block of one reference image (hashes uint64[n, 2]) as ref << 40 | block.

    Identical content (same 128-bit hash) is stored once, first occurrence wins; blocks whose h1 collides
    but h2 differs get their own slots. Returns the number of new entries.
    """
    mask = np.uint64(keys.shape[0] - 1)
    added = 0
    zh1, zh2 = _zero_hash()
    for b in range(hashes.shape[0]):
        h1 = hashes[b, 0]
        h2 = hashes[b, 1]
        if h1 == zh1 and h2 == zh2:
            continue
        k = _key(h1)
        s = _slot(k, mask)
        while True:
            if keys[s] == U0:
                keys[s] = k
                vals[s] = (np.int64(ref) << 40) | b
                h2s[s] = h2
                added += 1
                break
            if keys[s] == k and h2s[s] == h2:
                break
            s = (s + 1) & np.int64(mask)
    return added


@njit(cache=True, nogil=True)
def stream_table_insert(keys: np.ndarray, vals: np.ndarray, k: np.uint64, g: int) -> int:
    """Map key k to global block g (a newer location replaces an older one). Returns 1 if the slot was new."""
    mask = np.uint64(keys.shape[0] - 1)
    s = _slot(k, mask)
    while True:
        if keys[s] == U0:
            keys[s] = k
            vals[s] = g
            return 1
        if keys[s] == k:
            vals[s] = g
            return 0
        s = (s + 1) & np.int64(mask)


@njit(cache=True, nogil=True)
def stream_table_rehash(
    keys: np.ndarray, vals: np.ndarray, new_keys: np.ndarray, new_vals: np.ndarray
) -> int:
    n = 0
    for s in range(keys.shape[0]):
        if keys[s] != U0:
            n += stream_table_insert(new_keys, new_vals, keys[s], vals[s])
    return n


@njit(inline="always")
def _zero_hash() -> tuple[np.uint64, np.uint64]:
    z = np.zeros(WORDS, dtype=np.uint64)
    return _hash_row(z)


@njit(cache=True, nogil=True)
def zero_hash() -> tuple[np.uint64, np.uint64]:
    return _zero_hash()


@njit(cache=True, nogil=True)
def classify(
    data: np.ndarray,  # uint64[n, 512]: the new content of the blocks
    base: np.ndarray,  # uint64[n, 512]: the base block at the same offset (rows valid where has_base)
    has_base: np.ndarray,  # bool[n]
    base_h: np.ndarray,  # uint64[n, 2]: nph128 of the base block (valid where has_base)
    gidx: np.ndarray,  # int64[n]: global block index (target offset + block), unique within the call
    cur_h: np.ndarray,  # uint64[G, 2]: hash of what the receiver holds at each global block (updated)
    stamp: np.ndarray,  # int64[G]: call id of the last classification touching a block (updated)
    call_id: int,  # > 0, new for every call
    rkeys: np.ndarray,  # reference table: uint64 keys (0 = empty), int64 vals (ref << 40 | block), uint64 h2
    rvals: np.ndarray,
    rh2: np.ndarray,
    skeys: np.ndarray,  # stream table: uint64 keys, int64 vals (global block index)
    svals: np.ndarray,
    tstart: np.ndarray,  # int64[T+1]: global index of each target's first block (for STREAM args)
    out_cls: np.ndarray,  # uint8[n]
    out_arg: np.ndarray,  # int64[n]
) -> int:
    """Classify n blocks in order; returns the number of new stream-table slots used.

    Order of tests: byte-equal to the base block at the same offset (BASE) -> all zero (ZERO) -> hash;
    then if the receiver already holds that content there (KEEP, also for BASE/ZERO); a reference-image
    candidate (REF: must still be confirmed byte for byte by the caller); a block sent earlier in the
    stream whose current content still has this 128-bit hash and that this call does not rewrite later
    (STREAM); otherwise by value, XOR against the base block if fewer than a quarter of its words differ.
    """
    n = data.shape[0]
    for i in range(n):
        stamp[gidx[i]] = call_id
    zh1, zh2 = _zero_hash()
    rmask = np.uint64(rkeys.shape[0] - 1)
    smask = np.uint64(skeys.shape[0] - 1)
    new_slots = 0
    ntargets = tstart.shape[0] - 1
    for i in range(n):
        g = gidx[i]
        row = data[i]
        cls = RAW
        # One branch-free (vectorizable) pass: how many words differ from the base block, and the OR of
        # all words (zero test). Cheaper than an early-exit compare once the chunk is in cache.
        diffs = WORDS
        acc = U0
        if has_base[i]:
            diffs = 0
            brow = base[i]
            for k in range(WORDS):
                x = row[k]
                diffs += x != brow[k]
                acc |= x
            if diffs == 0:
                cls = BASE
        else:
            for k in range(WORDS):
                acc |= row[k]
        if cls == BASE:
            h1 = base_h[i, 0]
            h2 = base_h[i, 1]
        elif acc == U0:
            cls = ZERO
            h1 = zh1
            h2 = zh2
        else:
            h1, h2 = _hash_row(row)
        arg = np.int64(0)
        if cur_h[g, 0] == h1 and cur_h[g, 1] == h2:
            cls = KEEP
        elif cls == RAW:
            key = _key(h1)
            found = False
            s = _slot(key, rmask)
            while rkeys[s] != U0:
                if rkeys[s] == key and rh2[s] == h2:
                    arg = rvals[s]
                    cls = REF
                    found = True
                    break
                s = (s + 1) & np.int64(rmask)
            if not found:
                s = _slot(key, smask)
                while skeys[s] != U0:
                    if skeys[s] == key:
                        src = svals[s]
                        if cur_h[src, 0] == h1 and cur_h[src, 1] == h2 and stamp[src] != call_id:
                            t = 0
                            while t < ntargets - 1 and tstart[t + 1] <= src:
                                t += 1
                            arg = (np.int64(t) << 40) | (src - tstart[t])
                            cls = STREAM
                            found = True
                        break
                    s = (s + 1) & np.int64(smask)
            if not found:
                if diffs < XOR_LIMIT:
                    cls = XOR
                new_slots += stream_table_insert(skeys, svals, key, g)
        cur_h[g, 0] = h1
        cur_h[g, 1] = h2
        stamp[g] = -call_id
        out_cls[i] = cls
        out_arg[i] = arg
    return new_slots


@njit(cache=True, nogil=True)
def rows_equal(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out[i] = a[i] == b[i] for uint64[n, 512] rows (early exit per row)."""
    for i in range(a.shape[0]):
        eq = True
        for k in range(WORDS):
            if a[i, k] != b[i, k]:
                eq = False
                break
        out[i] = eq


@njit(cache=True, nogil=True)
def rows_equal_at(a: np.ndarray, ai: np.ndarray, b: np.ndarray, bi: np.ndarray, out: np.ndarray) -> None:
    """out[i] = a[ai[i]] == b[bi[i]] for uint64[*, 512] arrays (rows compared where they lie)."""
    for i in range(ai.shape[0]):
        x = a[ai[i]]
        y = b[bi[i]]
        eq = True
        for k in range(WORDS):
            if x[k] != y[k]:
                eq = False
                break
        out[i] = eq


@njit(cache=True, nogil=True)
def xor_count_small(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out[i] = fewer than a quarter of the words of a[i] and b[i] differ (the XOR heuristic)."""
    for i in range(a.shape[0]):
        d = 0
        for k in range(WORDS):
            if a[i, k] != b[i, k]:
                d += 1
                if d >= XOR_LIMIT:
                    break
        out[i] = d < XOR_LIMIT
