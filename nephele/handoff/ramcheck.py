"""The switchover check: the destination gets the guest's true RAM, not only what QEMU chose to resend.

QEMU 7.2 under TCG now and then misses a guest write in its dirty tracking (stock libvirt migration
too: tools/handoff_soak.py, docs/handoff.md); the page goes out once, is written again, and is never
resent, so the destination resumes with a stale page and its kernel may crash seconds later. The source
proxy therefore keeps a hash of the last content it delivered for every page of the main RAM block; when
QEMU's ram END section is complete the VM is stopped, so the source reads the guest's RAM (a memfd,
node/guestram.py), hashes it (xxh3 per page) and sends every page whose truth differs before the
section's EOS. Cost: one hash pass over RAM during the downtime (~0.1 s for 256 MiB here).
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import xxhash

from nephele.node.guestram import GuestRam

PAGE = 4096
_H = xxhash.xxh3_64_intdigest  # ~2 GB/s per core here with the per-page call, 5x the numba nph128 scan


def page_hashes(pages: bytes | memoryview, n: int) -> np.ndarray:
    """xxh3-64 of each 4 KiB page of a buffer of n pages."""
    mv = memoryview(pages).cast("B")
    return np.fromiter((_H(mv[i : i + PAGE]) for i in range(0, n * PAGE, PAGE)), np.uint64, n)


def _fill_hash(fill: int) -> int:
    return _H(bytes([fill]) * PAGE)


class SentPages:
    """What the destination holds for each page of one RAM block, as 64-bit hashes (a check against
    QEMU's bookkeeping, not an adversary: 2^-64 per page of missing a stale one)."""

    def __init__(self, block: str, size: int, ram: GuestRam) -> None:
        self.block = block
        self.size = size
        self.ram = ram
        self.npages = -(-size // PAGE)
        # a page never sent is zero on the destination (fresh QEMU RAM)
        self.sent = np.full(self.npages, _fill_hash(0), np.uint64)

    def pages(self, numbers: np.ndarray, data: bytes | memoryview) -> None:
        self.sent[numbers] = page_hashes(data, len(numbers))

    def fills(self, numbers: np.ndarray, fills: bytes | bytearray) -> None:
        arr = np.frombuffer(bytes(fills), np.uint8)
        for fill in set(fills):
            self.sent[numbers[arr == fill]] = _fill_hash(fill)

    def stale(self) -> np.ndarray:
        """Page numbers whose true content (read now: the VM must be stopped) differs from what was sent."""
        full = self.size // PAGE
        with mmap.mmap(self.ram.fd, full * PAGE, prot=mmap.PROT_READ) as m:
            truth = page_hashes(memoryview(m), full)
        if self.npages > full:  # a partial last page
            truth = np.append(truth, _H(os.pread(self.ram.fd, PAGE, full * PAGE).ljust(PAGE, b"\0")))
        return np.flatnonzero(truth != self.sent)

    def read(self, numbers: np.ndarray) -> np.ndarray:
        out = np.zeros((len(numbers), PAGE), np.uint8)
        for i, n in enumerate(numbers.tolist()):
            os.preadv(self.ram.fd, [memoryview(out[i])], n * PAGE)
        return out

    def close(self) -> None:
        self.ram.close()
