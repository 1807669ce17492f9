"""A real libvirt 9.0 save image (virsh save through the embedded QEMU driver, no daemon): split it,
write a canonical image from the parts, replace its XML, and restore it; guest RAM and registers must
match what was saved. Tests drive the virsh binary; only nephele/node may import libvirt."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from pathlib import Path

import pytest
from support import require

from nephele.vmstate import savefile as sf
from tests.vmstate.qemu import COUNTER_ADDR, boot_disk

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _prerequisites() -> None:
    require(root=False, tools=("virsh", "qemu-system-x86_64"))  # fail loudly, never skip


MEM = 64 << 20
HOLE = (0xA0000, 0x100000)
QEMU_CONF = 'stdio_handler = "file"\nuser = "root"\ngroup = "root"\ndynamic_ownership = 0\n'


class Virsh:
    """One virsh process on qemu:///embed?root=DIR: the domain lives as long as this process."""

    def __init__(self, root: Path) -> None:
        for d in (root / "etc", root / "etc" / "qemu"):
            d.mkdir(parents=True, exist_ok=True)
            (d / "qemu.conf").write_text(QEMU_CONF)  # no virtlogd here: QEMU logs to a file
        self.proc = subprocess.Popen(
            ["virsh", "-q", "-c", f"qemu:///embed?root={root}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.n = 0

    def run(self, command: str, timeout: float = 120) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        mark = f"__done_{self.n}__"
        self.proc.stdin.write(f"{command}\necho {mark}\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"virsh exited during {command!r}: {''.join(out)}")
            if mark in line:
                text = "".join(out)
                if re.search(r"^error:", text, re.M):
                    raise RuntimeError(f"virsh {command!r}: {text}")
                return text
            out.append(line)
        raise TimeoutError(command)

    def hmp(self, line: str) -> str:
        return self.run(f'qemu-monitor-command vmst --hmp "{line}"')

    def pmemsave(self, path: Path) -> bytes:
        # QMP form: the HMP one silently writes nothing when passed through virsh
        self.run(
            "qemu-monitor-command vmst "
            f'\'{{"execute":"pmemsave","arguments":{{"val":0,"size":{MEM},"filename":"{path}"}}}}\''
        )
        return path.read_bytes()

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(RuntimeError):
            self.run("destroy vmst", timeout=30)
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def domain_xml(disk: Path, name: str = "vmst") -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{MEM >> 20}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{disk}'/>
      <target dev='hda' bus='ide'/></disk>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


def counter(v: Virsh) -> int:
    return int(v.hmp(f"xp /1wx {COUNTER_ADDR:#x}").split(":")[1].split()[0], 16)


def registers(v: Virsh) -> dict[str, str]:
    regs = dict(re.findall(r"\b(E[A-Z]{2}|CR0)=([0-9a-f]+)", v.hmp("info registers")))
    assert {"EIP", "EBX"} <= set(regs)
    return regs


def test_libvirt_save_split_rebuild_replace_xml_restore(tmp_path: Path) -> None:
    disk = boot_disk(tmp_path / "boot.img")
    xml_file = tmp_path / "dom.xml"
    xml_file.write_text(domain_xml(disk))
    saved = tmp_path / "vmst.save"
    v = Virsh(tmp_path / "root")
    try:
        v.run(f"create {xml_file}")
        deadline = time.monotonic() + 60
        while counter(v) < 50:
            assert time.monotonic() < deadline, "boot sector did not start"
            time.sleep(0.2)
        v.run("suspend vmst")
        src_mem = v.pmemsave(tmp_path / "src.mem")
        src_regs = registers(v)
        src_counter = counter(v)
        v.run(f"save vmst {saved}")
    finally:
        v.close()

    parts = sf.split_save_image(saved, tmp_path / "ram")
    h = parts.header
    assert h.version == 2 and h.compressed == 0 and not h.was_running  # suspended before the save
    assert "<name>vmst</name>" in h.xml and h.cookie is not None and "<cpu" in h.cookie
    assert h.data_len >= 64 * 1024  # libvirt's padding
    flat = parts.ram["pc.ram"].read_bytes()
    assert flat[: HOLE[0]] == src_mem[: HOLE[0]] and flat[HOLE[1] :] == src_mem[HOLE[1] :]

    sf.store_parts(parts, tmp_path / "ram")  # what a node keeps: flat RAM files + small parts
    rebuilt = sf.rebuild_save_image(tmp_path / "ram", tmp_path / "rebuilt.save", was_running=True)
    new_xml = h.xml.replace(
        "<name>vmst</name>", "<name>vmst</name>\n  <description>via nephele</description>"
    )
    sf.replace_xml(rebuilt, new_xml)

    v = Virsh(tmp_path / "root")
    try:
        assert "via nephele" in v.run(f"save-image-dumpxml {rebuilt}")
        v.run(f"restore {rebuilt} --paused")
        assert v.pmemsave(tmp_path / "dst.mem") == src_mem
        assert registers(v) == src_regs
        v.run("resume vmst")
        time.sleep(0.5)
        assert "running" in v.run("domstate vmst")
        assert counter(v) > src_counter
    finally:
        v.close()
