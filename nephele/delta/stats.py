"""Per-stream accounting, memory and disk separately, and the original tool's stats table.

Columns as in Elijah's handoff .stats file: DIRTIED = blocks written (by value + by reference + zeros;
a block re-sent in a later pre-copy iteration counts again), BY VALUE = RAW and XOR entries, BY REF =
references to a reference image, to a block earlier in the stream or to the base block at the same
offset, ZEROS = zero blocks. KEEP entries (the receiver already holds that content there) are counted
apart and are not dirtied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from nephele.delta import _kernels as K

MiB = 1 << 20
BLOCK = 4096


@dataclass
class KindStats:
    by_value: int = 0  # blocks
    xor: int = 0  # of which sent as XOR against the base block
    by_ref: int = 0
    zeros: int = 0
    kept: int = 0
    raw_bytes: int = 0  # frame payload bytes before compression (metadata + values)
    payload_bytes: int = 0  # the same after compression
    wire_bytes: int = 0  # payload + frame headers and checksums
    frames: int = 0

    @property
    def dirtied(self) -> int:
        return self.by_value + self.by_ref + self.zeros

    def add_ops(self, ops: np.ndarray) -> None:
        c = np.bincount(ops, minlength=7)
        self.by_value += int(c[K.RAW] + c[K.XOR])
        self.xor += int(c[K.XOR])
        self.by_ref += int(c[K.REF] + c[K.STREAM] + c[K.BASE])
        self.zeros += int(c[K.ZERO])
        self.kept += int(c[K.KEEP])


@dataclass
class StreamStats:
    """What one stream carried; the same numbers on both ends."""

    kinds: dict[str, KindStats] = field(default_factory=lambda: {"memory": KindStats(), "disk": KindStats()})
    wire_bytes: int = 0  # every byte of the stream, magic and all frames
    frames: int = 0
    input_bytes: int = 0  # size of the target images (encode_files) or bytes put (incremental)
    seconds: float = 0.0
    # decoder: the part of `seconds` spent making the outputs durable (fsync of files and directory)
    sync_seconds: float = 0.0

    def kind(self, kind: str) -> KindStats:
        return self.kinds.setdefault(kind, KindStats())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "wire_bytes": self.wire_bytes,
            "frames": self.frames,
            "input_bytes": self.input_bytes,
            "seconds": self.seconds,
            "sync_seconds": self.sync_seconds,
        }
        for name, k in self.kinds.items():
            d = asdict(k)
            d["dirtied"] = k.dirtied
            for col in ("dirtied", "by_value", "by_ref", "zeros"):
                d[f"{col}_mib"] = d[col] * BLOCK / MiB
            out[name] = d
        return out

    def table(self) -> str:
        """The DIRTIED / BY VALUE / BY REF / ZEROS table (MiB, blocks below), then byte totals."""
        cols = ("DIRTIED", "BY VALUE", "BY REF", "ZEROS")
        lines = [f"{'':8}" + "".join(f"{c:>16}" for c in cols)]
        for name in ("memory", "disk"):
            k = self.kinds.get(name, KindStats())
            vals = (k.dirtied, k.by_value, k.by_ref, k.zeros)
            lines.append(f"{name.upper():8}" + "".join(f"{v * BLOCK / MiB:>12.2f} MiB" for v in vals))
            lines.append(f"{'':8}" + "".join(f"{v:>11} blk" for v in vals).replace(" blk", " blk "))
        lines.append("")
        for name in ("memory", "disk"):
            k = self.kinds.get(name, KindStats())
            lines.append(
                f"{name.upper():8}payload {k.raw_bytes / MiB:.2f} MiB before compression, "
                f"{k.payload_bytes / MiB:.2f} MiB after; {k.wire_bytes / MiB:.2f} MiB on the wire "
                f"in {k.frames} frames ({k.xor} blocks as XOR, {k.kept} kept)"
            )
        lines.append(f"Total MBytes over wire: {self.wire_bytes / MiB:.2f} MiB ({self.wire_bytes} bytes)")
        return "\n".join(lines)
