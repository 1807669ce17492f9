"""Parser throughput: the engine must not be the bottleneck of a proxy (target: >= 200 MB/s of stream)."""

from __future__ import annotations

import time

import numpy as np

from nephele.vmstate import stream as s
from tests.vmstate import streams as b

N_PAGES = 8192  # 32 MiB of page payload


def _stream(zero: bool) -> bytes:
    rng = np.random.default_rng(1)
    blocks = [("pc.ram", N_PAGES * s.PAGE_SIZE)]
    recs = []
    for i in range(N_PAGES):
        name = "pc.ram" if i == 0 else None
        off = i * s.PAGE_SIZE
        recs.append(b.zero(name, off) if zero else b.page(name, off, rng.bytes(s.PAGE_SIZE)))
    return (
        s.FILE_HEADER
        + b.config()
        + b.start(2, blocks)
        + b.section(s.SEC_PART, 2, recs)
        + b.section(s.SEC_END, 2, [])
        + b.tail()
    )


def _best_time(data: bytes, chunk: int = 65536) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        p = s.MigrationStreamParser()
        n = 0
        for i in range(0, len(data), chunk):
            n += len(p.feed(data[i : i + chunk]))
        p.close()
        best = min(best, time.perf_counter() - t0)
    assert n > N_PAGES
    return best


def test_parser_throughput() -> None:
    data = _stream(zero=False)
    t = _best_time(data)
    rate = len(data) / t / 1e6
    print(f"\npage records: {rate:.0f} MB/s of stream, {N_PAGES / t:.0f} pages/s (64 KiB feeds)")
    assert rate >= 200, f"{rate:.0f} MB/s"
    zdata = _stream(zero=True)
    t = _best_time(zdata)
    print(
        f"zero records: {N_PAGES / t:.0f} records/s = {N_PAGES * s.PAGE_SIZE / t / 1e6:.0f} MB/s of guest RAM"
    )
    assert N_PAGES / t >= 200_000


def test_writer_throughput() -> None:
    rng = np.random.default_rng(2)
    pages = [rng.bytes(s.PAGE_SIZE) for _ in range(N_PAGES)]
    best = float("inf")
    written = 0
    for _ in range(3):
        w = s.MigrationStreamWriter(lambda data: None)
        t0 = time.perf_counter()
        w.write(s.Page("pc.ram", 0, pages[0], False))
        for i in range(1, N_PAGES):
            w.write(s.Page("pc.ram", i * s.PAGE_SIZE, pages[i], True))
        w.flush()
        best = min(best, time.perf_counter() - t0)
        written = w.bytes_written
    rate = written / best / 1e6
    print(f"\nwriter, page records: {rate:.0f} MB/s, {N_PAGES / best:.0f} pages/s")
    assert rate >= 200, f"{rate:.0f} MB/s"
