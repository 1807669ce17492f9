"""The memory channel on synthetic streams (no VM): many pre-copy sections re-sending pages whose content
repeats, returns to the base image, becomes zero and back, across several RAM blocks, cut into random
chunks so the sender's run boundaries differ every time. The destination must rebuild every byte."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from nephele.handoff.memory import MemoryDestination, MemorySource, mem_ref_id
from nephele.vmstate import stream as s
from tests.vmstate import streams as st

PAGE = s.PAGE_SIZE
# pc.ram larger than the decoder's 32 MiB window, so later sections hit blocks behind it
BLOCKS = [("pc.ram", 9000 * PAGE), ("pc.bios", 16 * PAGE), ("/rom@etc/acpi/tables", 8 * PAGE)]
SEEDS = int(os.environ.get("NEPHELE_TEST_SEEDS", "4"))


def make_stream(rng: random.Random, base: dict[str, bytes], sections: int) -> bytes:
    pool = [rng.randbytes(PAGE) for _ in range(24)] + [bytes(PAGE)]
    sid = 2
    out = (
        s.FILE_HEADER + st.config() + st.command(s.CMD_OPEN_RETURN_PATH) + st.command(s.CMD_PING, st.be32(1))
    )
    out += st.start(sid, BLOCKS)
    cur = None
    # iteration 1: every page in order, in sections of up to 700 records
    first = []
    for name, size in BLOCKS:
        for off in range(0, size, PAGE):
            r = rng.random()
            data = base[name][off : off + PAGE] if r < 0.6 else rng.choice(pool) if r < 0.8 else bytes(PAGE)
            cont = name == cur
            cur = name
            first.append(
                st.zero(None if cont else name, off)
                if not any(data)
                else st.page(None if cont else name, off, data)
            )
    for i in range(0, len(first), 700):
        out += st.section(s.SEC_PART, sid, first[i : i + 700])
    for _ in range(sections):
        recs = []
        for _ in range(rng.randint(1, 120)):
            name, size = rng.choice(BLOCKS) if rng.random() < 0.3 else BLOCKS[0]
            off = rng.randrange(size // PAGE) * PAGE
            r = rng.random()
            if r < 0.2:
                data = base[name][off : off + PAGE]
            elif r < 0.3:
                oname, osize = rng.choice(BLOCKS)  # a block of any reference image, at any offset
                other = rng.randrange(osize // PAGE) * PAGE
                data = base[oname][other : other + PAGE]
            elif r < 0.45:
                data = rng.randbytes(PAGE)
            else:
                data = rng.choice(pool)
            cont = name == cur
            cur = name
            if not any(data):
                recs.append(st.zero(None if cont else name, off))
            else:
                recs.append(st.page(None if cont else name, off, data))
        out += st.section(s.SEC_PART, sid, recs)
    out += st.section(s.SEC_END, sid, [])
    return out + st.tail()


def run_pair(
    tmp: Path, stream: bytes, refs: dict[str, Path], rng: random.Random
) -> tuple[bytes, object, object]:
    q_src, q_proxy = socket.socketpair()
    wan_a, wan_b = socket.socketpair()
    dst_qemu = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def fake_dst() -> None:
        c, _ = dst_qemu.accept()
        while len(got) < len(stream):
            d = c.recv(1 << 16)
            if not d:
                break
            got.extend(d)
        c.sendall(b"\x00\x03\x00\x00")  # something on the return path
        c.close()

    def fake_src() -> None:
        pos = 0
        while pos < len(stream):
            n = rng.choice([1, 7, 100, 4096, 5000, 65536, 300000])
            q_src.sendall(stream[pos : pos + n])
            pos += n
            if rng.random() < 0.2:
                time.sleep(0.001)
        q_src.recv(16)  # the return path arrives, then "QEMU" closes
        q_src.close()

    dst = MemoryDestination(wan_b, dst_qemu.getsockname(), refs, tmp / "scratch")
    src = MemorySource(q_proxy, wan_a, refs)
    threads = [threading.Thread(target=f, daemon=True) for f in (fake_dst, fake_src)]
    for t in threads:
        t.start()
    res: dict[str, object] = {}
    td = threading.Thread(target=lambda: res.update(d=dst.run()), daemon=True)
    td.start()
    ss = src.run()
    td.join(60)
    for t in threads:
        t.join(10)
    dst_qemu.close()
    return bytes(got), ss, res["d"]


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_precopy_streams_are_rebuilt_exactly(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    base = {
        name: b"".join(rng.randbytes(PAGE) if rng.random() < 0.7 else bytes(PAGE) for _ in range(n // PAGE))
        for name, n in BLOCKS
    }
    refs: dict[str, Path] = {}
    for i, (name, _n) in enumerate(BLOCKS[:2]):
        p = tmp_path / f"base{i}.ram"
        p.write_bytes(base[name])
        refs[mem_ref_id(name)] = p
    disk = tmp_path / "disk.raw"  # a "disk" holding the third block's content: references across images
    disk.write_bytes(rng.randbytes(3 * PAGE) + base[BLOCKS[2][0]])
    refs["disk"] = disk
    stream = make_stream(rng, base, sections=40)
    got, ss, ds = run_pair(tmp_path, stream, refs, rng)
    assert ds.error is None and ss.error is None, (ss.error, ds.error)  # type: ignore[attr-defined]
    assert got == stream
    assert ds.verified  # type: ignore[attr-defined]
