"""The test guest: reproducible build, cache keyed by the recipe, and a real TCG boot answering HTTP."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from nephele.cloudlet import guest as guest_mod
from nephele.cloudlet.guest import GuestFiles, build_guest, cmdline, ensure_guest, recipe_hash

pytestmark = pytest.mark.integration


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_build_is_reproducible(guest: GuestFiles, tmp_path: Path) -> None:
    again = build_guest(tmp_path / "again", debs=guest.directory.parent / "debs")
    for a, b in [(guest.kernel, again.kernel), (guest.initrd, again.initrd), (guest.disk, again.disk)]:
        assert _sha(a) == _sha(b), f"{a.name} differs between two builds"
    assert guest.disk.stat().st_size == 64 << 20


def test_cache_reused_and_keyed_by_recipe(guest: GuestFiles, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    before = guest.initrd.stat().st_mtime_ns
    assert ensure_guest(guest.directory.parent) == guest  # cached: no rebuild
    assert guest.initrd.stat().st_mtime_ns == before
    assert guest.directory.name == recipe_hash()
    # A changed recipe file changes the key, so ensure_guest would build into a fresh directory.
    recipe = tmp_path / "recipe"
    shutil.copytree(guest_mod.RECIPE_DIR, recipe)
    (recipe / "init").write_text((recipe / "init").read_text() + "# changed\n")
    monkeypatch.setattr(guest_mod, "RECIPE_DIR", recipe)
    assert recipe_hash() != guest.directory.name


def test_cmdline_rejects_unknown_fill_kind() -> None:
    with pytest.raises(Exception, match="fill kind"):
        cmdline(fill_kind="zeros")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def test_boots_under_tcg_and_serves_state(guest: GuestFiles, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    shutil.copyfile(guest.disk, disk)
    port = _free_port()
    log = tmp_path / "serial.log"
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-m",
        "192",
        "-nographic",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-serial",
        f"file:{log}",
        "-kernel",
        str(guest.kernel),
        "-initrd",
        str(guest.initrd),
        "-append",
        cmdline(fill_mib=2, fill_kind="text", dirty_mib=1, disk_kib=16),
        "-drive",
        f"file={disk},if=virtio,format=raw",
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:80",
        "-device",
        "virtio-net-pci,netdev=n0,romfile=",
    ]
    qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if log.exists() and "NEPHELE-READY" in log.read_text(errors="replace"):
                break
            assert qemu.poll() is None, f"qemu exited: {qemu.stderr.read().decode() if qemu.stderr else ''}"
            time.sleep(0.2)
        else:
            pytest.fail(f"no NEPHELE-READY in 90 s; serial log:\n{log.read_text(errors='replace')[-2000:]}")
        assert "fill=2 fillkind=text" in log.read_text()  # the knobs reached /init
        first = _get(f"http://127.0.0.1:{port}/cgi-bin/state")
        m = re.fullmatch(r"counter=(\d+) uptime=[\d.]+ disk_counter=(\d*)\n", first)
        assert m, first
        time.sleep(2.5)
        second = _get(f"http://127.0.0.1:{port}/cgi-bin/state")
        m2 = re.fullmatch(r"counter=(\d+) uptime=[\d.]+ disk_counter=(\d+)\n", second)
        assert m2, second
        assert int(m2.group(1)) > int(m.group(1)), (first, second)  # the workload runs
        md5 = _get(f"http://127.0.0.1:{port}/cgi-bin/md5")
        m3 = re.fullmatch(r"fill_md5=([0-9a-f]{32}) counter=(\d+)\n", md5)
        assert m3, md5
        assert m3.group(1) == re.fullmatch(
            r"fill_md5=([0-9a-f]{32}) counter=\d+\n", _get(f"http://127.0.0.1:{port}/cgi-bin/md5")
        ).group(1)  # type: ignore[union-attr]  # fill is stable
    finally:
        qemu.kill()
        qemu.wait()
