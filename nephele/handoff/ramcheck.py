"""The switchover check: the destination gets the guest's true RAM, not only what QEMU chose to resend.

QEMU 7.2 under TCG now and then misses a guest write in its dirty tracking (stock libvirt migration
too: tools/handoff_soak.py, docs/handoff.md); the page goes out once, is written again, and is never
resent, so the destination resumes with a stale page and its kernel crashes seconds later. The source
proxy therefore keeps the 128-bit hash of the last content it delivered for every page of the main RAM
block; when the device-state tail begins the VM is stopped, so the source reads the guest's RAM (a
memfd, node/guestram.py), hashes it and sends every page whose truth differs, in one extra ram section
before the device state. Cost: one hash pass over RAM during the downtime (numba, memory speed).
"""

from __future__ import annotations

import os

import numpy as np

from nephele.delta import _kernels as K
from nephele.delta.index import hash_file
from nephele.node.guestram import GuestRam

PAGE = 4096


def page_hashes(pages: np.ndarray) -> np.ndarray:
    """nph128 of each row of uint8[n, 4096] (the delta engine's block hash)."""
    out = np.empty((pages.shape[0], 2), np.uint64)
    K.hash_blocks(np.ascontiguousarray(pages).view(np.uint64), out)
    return out


def _fill_hash(fill: int) -> np.ndarray:
    h: np.ndarray = page_hashes(np.full((1, PAGE), fill, np.uint8))[0]
    return h


class SentPages:
    """What the destination holds for each page of one RAM block, as hashes."""

    def __init__(self, block: str, size: int, ram: GuestRam) -> None:
        self.block = block
        self.size = size
        self.ram = ram
        self.npages = -(-size // PAGE)
        # a page never sent is zero on the destination (fresh QEMU RAM)
        self.sent = np.tile(_fill_hash(0), (self.npages, 1))
        self._fills: dict[int, np.ndarray] = {}

    def pages(self, numbers: np.ndarray, data: np.ndarray) -> None:
        self.sent[numbers] = page_hashes(data)

    def fills(self, numbers: np.ndarray, fills: bytes | bytearray) -> None:
        for fill in set(fills):
            h = self._fills.get(fill)
            if h is None:
                h = self._fills[fill] = _fill_hash(fill)
            sel = numbers[np.frombuffer(bytes(fills), np.uint8) == fill]
            self.sent[sel] = h

    def stale(self) -> np.ndarray:
        """Page numbers whose true content (read now: the VM must be stopped) differs from what was sent."""
        truth = hash_file(self.ram.fd, self.size)
        return np.flatnonzero((truth != self.sent).any(axis=1))

    def read(self, numbers: np.ndarray) -> np.ndarray:
        out = np.empty((len(numbers), PAGE), np.uint8)
        for i, n in enumerate(numbers.tolist()):
            got = os.preadv(self.ram.fd, [memoryview(out[i])], n * PAGE)
            if got != PAGE:
                out[i, got:] = 0  # the last page of a block whose size is not page aligned
        return out

    def close(self) -> None:
        self.ram.close()
