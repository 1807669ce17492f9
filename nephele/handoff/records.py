"""The destination's records of a handoff: ``<root>/logs/handoff_from_<ip>_at_<ts>.log`` and ``.stats``.

The .stats file is rewritten (atomically) every second while the handoff runs and once at the end, with
the original tool's fields: iterations, elapsed time, VM disk and memory size, blobs (delta frames)
received, MB over the wire, downtime, and the DIRTIED / BY VALUE / BY REF / ZEROS table for MEMORY and
DISK (MiB). MEMORY comes from the delta decoder (plus QEMU's own ZERO records); DISK from the NBD write
requests of libvirt's disk mirror as they arrived (all by value, lz4 on the wire; zero blocks counted).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
BLOCK = 4096


@dataclass
class HandoffRecord:
    source_ip: str
    title: str
    uuid: str
    memory_bytes: int
    disk_bytes: int
    started: float = field(default_factory=time.time)
    status: str = "running"
    iteration: int = 0
    frames: int = 0
    wire: dict[str, int] = field(default_factory=dict)  # channel -> bytes received
    downtime: float | None = None
    stream_bytes: int = 0
    # table rows, in blocks: dirtied, by value, by ref, zeros
    memory: tuple[int, int, int, int] = (0, 0, 0, 0)
    disk: tuple[int, int, int, int] = (0, 0, 0, 0)
    finished: float | None = None

    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source_ip,
            "title": self.title,
            "uuid": self.uuid,
            "status": self.status,
            "iterations": self.iteration,
            "elapsed_s": round(self.elapsed(), 3),
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "blobs": self.frames,
            "wire_bytes": dict(self.wire),
            "wire_total_bytes": sum(self.wire.values()),
            "downtime_s": None if self.downtime is None else round(self.downtime, 3),
            "stream_bytes": self.stream_bytes,
            "table_blocks": {"memory": list(self.memory), "disk": list(self.disk)},
        }

    def render(self) -> str:
        wire = sum(self.wire.values())
        parts = ", ".join(f"{k} {v / MiB:.2f}" for k, v in sorted(self.wire.items()))
        dt = "-" if self.downtime is None else f"{self.downtime:.3f} s (source stop -> destination resume)"
        lines = [
            f"Handoff of {self.title} [{self.uuid}] from {self.source_ip}",
            f"Status: {self.status}",
            f"Iterations: {self.iteration}",
            f"Elapsed Time: {self.elapsed():.2f} s",
            f"VM Disk Size: {self.disk_bytes / MiB:.2f} MiB",
            f"VM Memory Size: {self.memory_bytes / MiB:.2f} MiB",
            f"Blobs Received: {self.frames}",
            f"Total MBytes Received over wire: {wire / MiB:.2f} MiB ({parts})",
            f"Migration stream rebuilt: {self.stream_bytes / MiB:.2f} MiB",
            f"Downtime: {dt}",
            "",
            table(self.memory, self.disk),
        ]
        return "\n".join(lines) + "\n"


def table(memory: tuple[int, int, int, int], disk: tuple[int, int, int, int]) -> str:
    cols = ("DIRTIED", "BY VALUE", "BY REF", "ZEROS")
    out = [f"{'':8}" + "".join(f"{c:>14}" for c in cols)]
    for name, row in (("MEMORY", memory), ("DISK", disk)):
        out.append(f"{name:8}" + "".join(f"{v * BLOCK / MiB:>10.2f} MiB" for v in row))
    return "\n".join(out)


class Records:
    """The .log and .stats files of one handoff; ``start()`` refreshes .stats every second."""

    def __init__(self, logs_dir: Path, record: HandoffRecord) -> None:
        logs_dir.mkdir(parents=True, exist_ok=True)
        ts = time.strftime("%Y%m%dT%H%M%S", time.gmtime(record.started))
        base = f"handoff_from_{record.source_ip}_at_{ts}"
        self.log_path = logs_dir / f"{base}.log"
        self.stats_path = logs_dir / f"{base}.stats"
        self.record = record
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log(f"handoff of {record.title} [{record.uuid}] from {record.source_ip} announced")

    def log(self, message: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"
        with self._lock, open(self.log_path, "a") as f:
            f.write(f"{stamp} {message}\n")

    def write_stats(self) -> None:
        text = self.record.render()
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        with self._lock:
            tmp.write_text(text)
            os.replace(tmp, self.stats_path)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(1.0):
                self.write_stats()

        self._thread = threading.Thread(target=loop, name="handoff-stats", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.record.finished = self.record.finished or time.time()
        self.write_stats()
