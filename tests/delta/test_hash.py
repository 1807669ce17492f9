"""nph128, the block hash both ends must agree on: pinned by a plain-Python reference implementation,
and sensitive to every single-bit change."""

from __future__ import annotations

import numpy as np

from nephele.delta import _kernels as K

M = (1 << 64) - 1
P1, P2, P3, P4, P5 = (int(p) for p in (K.P1, K.P2, K.P3, K.P4, K.P5))
SA, SB = int(K.SEED_A), int(K.SEED_B)


def rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M


def merge(h: int, acc: int) -> int:
    acc = rotl(acc * P2 & M, 31) * P1 & M
    return ((h ^ acc) * P1 + P4) & M


def avalanche(h: int) -> int:
    h ^= h >> 33
    h = h * P2 & M
    h ^= h >> 29
    h = h * P3 & M
    return h ^ (h >> 32)


def nph128(block: bytes) -> tuple[int, int]:
    words = np.frombuffer(block, "<u8").tolist()
    a = [(SA + P1 + P2) & M, (SA + P2) & M, SA, (SA - P1) & M]
    b = [(SB + P3) & M, SB ^ P4, (SB + P5) & M, (SB - P3) & M]
    for k in range(0, 512, 4):
        for j in range(4):
            m = words[k + j] * P2 & M
            a[j] = rotl((a[j] + m) & M, 31) * P1 & M
            b[j] = (rotl(b[j] ^ m, 27) * P3 + P5) & M
    ha = (rotl(a[0], 1) + rotl(a[1], 7) + rotl(a[2], 12) + rotl(a[3], 18)) & M
    for j in range(4):
        ha = merge(ha, a[j])
    hb = (rotl(b[0], 7) + rotl(b[1], 1) + rotl(b[2], 18) + rotl(b[3], 12)) & M
    for j in (3, 2, 1, 0):
        hb = merge(hb, b[j])
    return avalanche((ha + 4096) & M), avalanche(hb ^ 4096)


def test_matches_reference_implementation(rng: np.random.Generator) -> None:
    blocks = rng.integers(0, 256, size=(5, 4096), dtype=np.uint8)
    blocks[0] = 0
    blocks[1] = 0xFF
    out = np.empty((5, 2), np.uint64)
    K.hash_blocks(blocks.view(np.uint64), out)
    for i in range(5):
        assert tuple(int(x) for x in out[i]) == nph128(blocks[i].tobytes())
    assert tuple(int(x) for x in K.zero_hash()) == nph128(bytes(4096))


def test_every_single_bit_flip_changes_both_halves(rng: np.random.Generator) -> None:
    block = rng.integers(0, 256, size=4096, dtype=np.uint8)
    flips = np.repeat(block[None, :], 4096 * 8 // 7 + 1, axis=0)
    bits = np.arange(0, 4096 * 8, 7)
    flips = flips[: bits.size]
    flips[np.arange(bits.size), bits // 8] ^= (1 << (bits % 8)).astype(np.uint8)
    out = np.empty((bits.size, 2), np.uint64)
    K.hash_blocks(np.ascontiguousarray(flips).view(np.uint64), out)
    ref = np.empty((1, 2), np.uint64)
    K.hash_blocks(block[None, :].view(np.uint64), ref)
    assert (out[:, 0] != ref[0, 0]).all() and (out[:, 1] != ref[0, 1]).all()
    assert np.unique(out[:, 0]).size == bits.size and np.unique(out[:, 1]).size == bits.size
