"""The parser, splitter and canonical rebuild against real QEMU 7.2 streams (TCG, 64 MiB, no kernel:
SeaBIOS boots a 512-byte sector that keeps dirtying memory). Each test loads what it rebuilt into a fresh
QEMU and compares guest RAM and CPU state with the source."""

from __future__ import annotations

import contextlib
import io
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from support import require

from nephele.vmstate import image
from nephele.vmstate import stream as s
from tests.vmstate.qemu import COUNTER_ADDR, Vm, boot_disk

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    require(root=False, tools=("qemu-system-x86_64",))  # fail loudly, never skip


MEM = 64 << 20
HOLE = (0xA0000, 0x100000)  # VGA window and BIOS shadows: guest-physical view differs from pc.ram there


def registers(vm: Vm) -> dict[str, str]:
    out = vm.qmp.hmp("info registers")
    regs = dict(re.findall(r"\b(E[A-Z]{2}|CR0)=([0-9a-f]+)", out))
    assert {"EIP", "EBX", "CR0"} <= set(regs), out
    return regs


def start_guest(tmp: Path, name: str = "src") -> Vm:
    vm = Vm(tmp, name, mem_mb=MEM >> 20, disk=boot_disk(tmp / "boot.img"))
    deadline = time.monotonic() + 30
    while vm.qmp.read_u32(COUNTER_ADDR) < 50:  # our boot sector is running
        assert time.monotonic() < deadline, "guest boot sector did not start"
        time.sleep(0.1)
    return vm


def parse_chunked(data: bytes, seed: int) -> list[s.Event]:
    rng = random.Random(seed)
    p = s.MigrationStreamParser()
    out: list[s.Event] = []
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 7, 4096, 4105, 65536, 1 << 20))
        out += p.feed(data[pos : pos + n])
        pos += n
    return out + p.close()


def check_round_trip(data: bytes) -> list[s.Event]:
    events = parse_chunked(data, 1)
    assert s.events_to_bytes(events) == data
    whole = s.MigrationStreamParser()
    assert s.events_to_bytes(whole.feed(data) + whole.close()) == data
    return events


def check_ram_image(ram: Path, guest: bytes) -> None:
    flat = ram.read_bytes()
    assert len(flat) == MEM
    assert flat[: HOLE[0]] == guest[: HOLE[0]]
    assert flat[HOLE[1] :] == guest[HOLE[1] :]


def rebuild(tmp: Path, stream_path: Path) -> tuple[Path, image.SplitResult]:
    with open(stream_path, "rb") as f:
        res = image.split_stream(f, tmp / "ram")
    out = tmp / "rebuilt.bin"
    with open(out, "wb") as f:
        image.write_canonical_stream(f, res.parts, res.ram)
    with open(out, "rb") as f:
        image.verify_canonical(f, res.parts, res.ram)
    return out, res


def load_and_compare(
    tmp: Path,
    uri: str,
    src_mem: bytes,
    src_regs: dict[str, str],
    counter: int,
    *,
    caps: dict[str, bool] | None = None,
    before: object = None,
) -> None:
    """Fresh QEMU, -S: load ``uri``, then RAM and registers must equal the source's; then it must run on."""
    with Vm(tmp, "dst", mem_mb=MEM >> 20, incoming="defer", paused=True) as dst:
        if caps:
            dst.qmp.caps(**caps)
        dst.qmp.cmd("migrate-incoming", uri=uri)
        if callable(before):
            before()
        dst.qmp.wait_migration(30)
        assert dst.qmp.status() == "paused"
        assert dst.pmem(tmp / "dst.mem", MEM) == src_mem
        assert registers(dst) == src_regs
        dst.qmp.cmd("cont")
        time.sleep(0.3)
        assert dst.qmp.status() == "running"
        assert dst.qmp.read_u32(COUNTER_ADDR) > counter  # the guest's loop carried on from where it was


def test_paused_migration_to_file(tmp_path: Path) -> None:
    f = tmp_path / "paused.bin"
    with start_guest(tmp_path) as src:
        src.qmp.cmd("stop")
        src.qmp.cmd("migrate", uri=f"exec:cat > {f}")
        src.qmp.wait_migration(30)
        src_mem = src.pmem(tmp_path / "src.mem", MEM)
        src_regs = registers(src)
        counter = src.qmp.read_u32(COUNTER_ADDR)
    data = f.read_bytes()
    events = check_round_trip(data)
    rng = random.Random(7)
    for cut in [rng.randrange(len(data)) for _ in range(25)]:  # real streams cut anywhere: clean errors
        p = s.MigrationStreamParser()
        p.feed(data[:cut])
        with pytest.raises(s.VmStreamError) as exc:
            p.close()
        assert exc.value.truncated and exc.value.offset is not None and exc.value.offset <= cut
    kinds = [e.kind for e in events if isinstance(e, s.SectionStart)]
    assert kinds[0] == s.SEC_START and kinds[-1] == s.SEC_END
    rebuilt, res = rebuild(tmp_path, f)
    if kinds == [s.SEC_START, s.SEC_PART, s.SEC_END]:  # one pass (QEMU may split it under heavy load)
        assert rebuilt.read_bytes() == data  # the canonical form is QEMU's own for a one-pass save
    check_ram_image(res.ram["pc.ram"], src_mem)
    assert res.parts.config.machine == "pc-i440fx-7.2"
    assert {"pc.ram", "pc.bios", "pc.rom"} <= set(res.parts.blocks)
    assert res.parts.tail.startswith(bytes((s.SEC_FULL,)))
    load_and_compare(tmp_path, f"exec:cat {rebuilt}", src_mem, src_regs, counter)


def test_live_migration_with_several_iterations(tmp_path: Path) -> None:
    f = tmp_path / "live.bin"
    with start_guest(tmp_path) as src:
        # a downtime limit nothing can meet keeps QEMU iterating; the bandwidth cap keeps the file small
        src.qmp.cmd("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 32 << 20})
        src.qmp.cmd("migrate", uri=f"exec:cat > {f}")
        deadline = time.monotonic() + 60
        while src.qmp.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        src.qmp.cmd("migrate-set-parameters", **{"downtime-limit": 20000})
        info = src.qmp.wait_migration(60)
        assert src.qmp.status() == "postmigrate"
        src_mem = src.pmem(tmp_path / "src.mem", MEM)
        src_regs = registers(src)
        counter = src.qmp.read_u32(COUNTER_ADDR)
    data = f.read_bytes()
    events = check_round_trip(data)
    parts = [e for e in events if isinstance(e, s.SectionStart) and e.kind == s.SEC_PART]
    assert len(parts) >= 3, len(parts)
    sent = [(e.block, e.offset) for e in events if isinstance(e, s.Page)]
    assert len(sent) > len(set(sent))  # the dirtied pages went again in later iterations
    assert len(sent) == info["ram"]["normal"]
    # a CONTINUE record opening a section (the block persists across sections) is normal in live streams
    rebuilt, res = rebuild(tmp_path, f)
    assert res.parts.iterations == len(parts) + 1
    check_ram_image(res.ram["pc.ram"], src_mem)
    assert rebuilt.stat().st_size < len(data)
    load_and_compare(tmp_path, f"exec:cat {rebuilt}", src_mem, src_regs, counter)


class ParsingRelay:
    """src QEMU -> [parse -> write] -> dst QEMU, and dst -> src raw (the return path). Flushes after every
    read, so nothing waits in the relay while QEMU waits for the other side."""

    def __init__(self, dst_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dst_port = dst_port
        self.fwd_in = bytearray()
        self.fwd_out = bytearray()
        self.back = bytearray()
        self.events: list[s.Event] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            src, _ = self.listener.accept()
            dst = socket.create_connection(("127.0.0.1", self.dst_port))
            back = threading.Thread(target=self._back, args=(dst, src), daemon=True)
            back.start()
            parser = s.MigrationStreamParser()

            def send(b: bytes | memoryview) -> None:
                dst.sendall(b)
                self.fwd_out.extend(b)

            w = s.MigrationStreamWriter(send)
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.fwd_in += data
                evs = parser.feed(data)
                self.events += [e for e in evs if not isinstance(e, s.Page)]
                w.write_all(evs)
                w.flush()
            self.events += parser.close()
            dst.shutdown(socket.SHUT_WR)
            back.join(10)
            src.close()
            dst.close()
        except BaseException as e:  # reported by the test
            self.error = e

    def _back(self, dst: socket.socket, src: socket.socket) -> None:
        while True:
            data = dst.recv(65536)
            if not data:
                break
            self.back += data
            src.sendall(data)
        with contextlib.suppress(OSError):
            src.shutdown(socket.SHUT_WR)


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port: int = sk.getsockname()[1]
        return port


def test_return_path_stream_through_a_parsing_proxy(tmp_path: Path) -> None:
    dst_port = free_port()
    with Vm(tmp_path, "mid", mem_mb=MEM >> 20, incoming="defer", paused=True) as mid:
        mid.qmp.caps(return_path=True)
        mid.qmp.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{dst_port}")
        relay = ParsingRelay(dst_port)
        with start_guest(tmp_path) as src:
            src.qmp.caps(return_path=True)
            src.qmp.cmd("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 64 << 20})
            src.qmp.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
            deadline = time.monotonic() + 60
            while src.qmp.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            src.qmp.cmd("migrate-set-parameters", **{"downtime-limit": 20000})
            src.qmp.wait_migration(60)
            src_mem = src.pmem(tmp_path / "src.mem", MEM)
            src_regs = registers(src)
            counter = src.qmp.read_u32(COUNTER_ADDR)
        relay.thread.join(30)
        assert relay.error is None, relay.error
        mid.qmp.wait_migration(30)
        assert mid.pmem(tmp_path / "mid.mem", MEM) == src_mem
        assert registers(mid) == src_regs
    assert bytes(relay.fwd_out) == bytes(relay.fwd_in)
    cmds = [e.name for e in relay.events if isinstance(e, s.Command)]
    assert cmds[:2] == ["OPEN_RETURN_PATH", "PING"]
    assert len(relay.back) > 0  # PONG and SHUT came back through the relay
    assert isinstance(relay.events[-1], s.StreamEnd)

    # the canonical rebuild keeps the commands in its prefix; feed it over TCP with a return path
    captured = tmp_path / "rp.bin"
    captured.write_bytes(relay.fwd_in)
    rebuilt, res = rebuild(tmp_path, captured)
    assert [c.name for c in res.parts.commands] == cmds[:2]
    check_ram_image(res.ram["pc.ram"], src_mem)
    port = free_port()
    reply = io.BytesIO()

    def feed() -> None:
        deadline = time.monotonic() + 10
        while True:
            try:
                sk = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with sk:
            sk.sendall(rebuilt.read_bytes())
            while chunk := sk.recv(4096):  # QEMU closes after SHUT
                reply.write(chunk)

    def start_feeder() -> None:
        threading.Thread(target=feed, daemon=True).start()

    load_and_compare(
        tmp_path,
        f"tcp:127.0.0.1:{port}",
        src_mem,
        src_regs,
        counter,
        caps={"return_path": True},
        before=start_feeder,
    )
    assert reply.getvalue()  # the destination answered on the return path


def test_ignore_shared_device_state_plus_ram_file_rebuilds_a_full_stream(tmp_path: Path) -> None:
    """LIVE-HANDOFF (A-a2): RAM in a shared file, x-ignore-shared device-only stream; strip the capability,
    merge the RAM file's pages in, and a plain QEMU (no shared file, no capability) loads it."""
    ram_file = tmp_path / "vm.ram"
    backend = [
        "-object",
        f"memory-backend-file,id=pc.ram,size={MEM >> 20}M,mem-path={ram_file},share=on",
        "-machine",
        "memory-backend=pc.ram",
    ]
    f = tmp_path / "dev.bin"
    with Vm(tmp_path, "src", mem_mb=MEM >> 20, disk=boot_disk(tmp_path / "boot.img"), extra=backend) as src:
        deadline = time.monotonic() + 30
        while src.qmp.read_u32(COUNTER_ADDR) < 50:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        src.qmp.caps(x_ignore_shared=True)
        src.qmp.cmd("stop")
        src.qmp.cmd("migrate", uri=f"exec:cat > {f}")
        src.qmp.wait_migration(30)
        src_mem = src.pmem(tmp_path / "src.mem", MEM)
        src_regs = registers(src)
        counter = src.qmp.read_u32(COUNTER_ADDR)
    data = f.read_bytes()
    assert len(data) < 2 << 20  # device state and small ROM blocks only
    events = check_round_trip(data)
    ram_marks = [e for e in events if isinstance(e, s.RamBlocks)]
    assert ram_marks[0].addrs is not None and len(ram_marks[0].addrs) == len(ram_marks[0].blocks)
    with open(f, "rb") as fh:
        res = image.split_stream(fh, tmp_path / "ram", allow_missing=True)
    assert res.parts.config.capabilities == ("x-ignore-shared",)
    assert res.missing == {"pc.ram": MEM // s.PAGE_SIZE}
    parts = image.strip_ignore_shared(res.parts)
    ram = dict(res.ram, **{"pc.ram": ram_file})
    rebuilt = tmp_path / "full.bin"
    with open(rebuilt, "wb") as fh:
        image.write_canonical_stream(fh, parts, ram)
    with open(rebuilt, "rb") as fh:
        image.verify_canonical(fh, parts, ram)
    load_and_compare(tmp_path, f"exec:cat {rebuilt}", src_mem, src_regs, counter)
