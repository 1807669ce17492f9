"""The switchover check (nephele/handoff/ramcheck.py) on synthetic streams: when the guest's true RAM
differs from what QEMU's stream delivered (QEMU missed a write), the destination's rebuilt stream carries
the true pages in one more ram section before the device state, and still verifies end to end."""

from __future__ import annotations

import os
import random
import socket
import threading
from pathlib import Path

from nephele.handoff.memory import MemoryDestination, MemorySource
from nephele.handoff.report import switchover_line
from nephele.node.guestram import GuestRam
from nephele.vmstate import stream as s
from tests.handoff.test_memory_synthetic import BLOCKS
from tests.vmstate import streams as st

PAGE = s.PAGE_SIZE


def apply(stream: bytes) -> dict[str, bytearray]:
    """RAM as a loader would have it after the stream: every page record applied in order."""
    ram = {name: bytearray(size) for name, size in BLOCKS}
    p = s.MigrationStreamParser()
    for ev in [*p.feed(stream), *([] if p.done else p.close())]:
        if type(ev) is s.Page:
            ram[ev.block][ev.offset : ev.offset + PAGE] = ev.data
        elif type(ev) is s.ZeroPage:
            ram[ev.block][ev.offset : ev.offset + PAGE] = bytes([ev.fill]) * PAGE
    return ram


def run_pair(
    tmp: Path, stream: bytes, refs: dict[str, Path], truth: Path | None
) -> tuple[bytes, MemorySource, object]:
    q_src, q_proxy = socket.socketpair()
    wan_a, wan_b = socket.socketpair()
    dst_qemu = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def fake_dst() -> None:
        c, _ = dst_qemu.accept()
        parser = s.MigrationStreamParser()
        while not parser.done:
            d = c.recv(1 << 16)
            if not d:
                break
            got.extend(d)
            parser.feed(d)
        c.sendall(b"\x00\x03\x00\x00")
        c.close()

    def fake_src() -> None:
        q_src.sendall(stream)
        q_src.recv(16)
        q_src.close()

    def opener() -> GuestRam | None:
        if truth is None:
            return None
        fd = os.open(truth, os.O_RDONLY)
        return GuestRam(fd, os.fstat(fd).st_size, 0)

    dst = MemoryDestination(wan_b, dst_qemu.getsockname(), refs, tmp / "scratch")
    src = MemorySource(q_proxy, wan_a, refs, guest_ram=opener)
    threads = [threading.Thread(target=f, daemon=True) for f in (fake_dst, fake_src)]
    for t in threads:
        t.start()
    res: dict[str, object] = {}
    td = threading.Thread(target=lambda: res.update(d=dst.run()), daemon=True)
    td.start()
    src.run()
    td.join(60)
    for t in threads:
        t.join(10)
    dst_qemu.close()
    return bytes(got), src, res["d"]


def test_lost_writes_reach_the_destination(
    tmp_path: Path, case: tuple[bytes, dict[str, Path], dict[str, bytearray]]
) -> None:
    stream, refs, delivered = case
    truth = bytearray(delivered["pc.ram"])
    rng = random.Random(1)
    lost = sorted(rng.sample(range(len(truth) // PAGE), 40))
    for n in lost:  # the guest wrote these after their last copy went out; QEMU never resent them
        truth[n * PAGE : n * PAGE + PAGE] = rng.randbytes(PAGE) if n % 3 else bytes(PAGE)
    truth_file = tmp_path / "guest.ram"
    truth_file.write_bytes(truth)
    got, src, dst = run_pair(tmp_path, stream, refs, truth_file)
    assert src.stats.error is None and dst.error is None, (src.stats.error, dst.error)  # type: ignore[attr-defined]
    assert dst.verified  # type: ignore[attr-defined]
    changed = [
        n
        for n in lost
        if truth[n * PAGE : n * PAGE + PAGE] != delivered["pc.ram"][n * PAGE : n * PAGE + PAGE]
    ]
    assert len(changed) > 30
    assert src.stats.checked and src.stats.corrected == len(changed)
    assert dst.checked and dst.corrected == len(changed)  # type: ignore[attr-defined]
    rebuilt = apply(got)
    assert rebuilt["pc.ram"] == truth  # the destination resumes with the guest's true memory
    assert rebuilt["pc.bios"] == delivered["pc.bios"]
    assert stream.endswith(st.tail()) and got.endswith(st.tail())  # the device state follows unchanged


def test_nothing_lost_means_the_stream_goes_through_unchanged(
    tmp_path: Path, case: tuple[bytes, dict[str, Path], dict[str, bytearray]]
) -> None:
    stream, refs, delivered = case
    truth_file = tmp_path / "guest.ram"
    truth_file.write_bytes(delivered["pc.ram"])
    got, src, dst = run_pair(tmp_path, stream, refs, truth_file)
    assert dst.verified  # type: ignore[attr-defined]
    assert src.stats.checked and src.stats.corrected == 0
    assert got == stream


def test_ram_of_another_size_is_not_used(
    tmp_path: Path, case: tuple[bytes, dict[str, Path], dict[str, bytearray]]
) -> None:
    stream, refs, _delivered = case
    truth_file = tmp_path / "guest.ram"
    truth_file.write_bytes(bytes(PAGE * 3))
    got, src, dst = run_pair(tmp_path, stream, refs, truth_file)
    assert dst.verified  # type: ignore[attr-defined]
    assert not src.stats.checked
    assert got == stream


def test_the_report_says_what_the_check_found() -> None:
    assert "not available" in switchover_line({})
    assert "every page matched" in switchover_line({"checked": True, "corrected": 0})
    assert "3 stale page(s)" in switchover_line({"checked": True, "corrected": 3})
