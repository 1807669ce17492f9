"""Test helpers: a small QEMU 7.2 launcher and QMP client (tests drive QEMU directly, never libvirt)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

QEMU = shutil.which("qemu-system-x86_64")

# A 512-byte boot sector (tests/vmstate/bootsector.S, assembled with `as --32` + objcopy): enters 32-bit
# protected mode and loops forever, storing a sweep counter at guest-physical 0x500 and one dword in every
# page of 16..24 MiB (at a position that moves with each sweep). SeaBIOS boots it from the IDE disk.
BOOT_SECTOR = (
    bytes.fromhex(
        "fa31c08ed88ed0bc007ce4920c0224fee692660f0116807c0f20c06683c8010f22c066ea2a7c0000080066b810008ed8"
        "8ec08ed0bc007c000031db43891d00050000bf0000000189d8c1e00225fc0f0000891c0781c70010000081ff00008001"
        "72e5ebd78d7426000000000000000000ffff0000009acf00ffff00000092cf001700687c0000"
    ).ljust(510, b"\0")
    + b"\x55\xaa"
)
COUNTER_ADDR = 0x500


class QmpError(RuntimeError):
    pass


class Qmp:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict[str, Any]] = []
        json.loads(self.file.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise QmpError(f"{name}: QMP connection closed")
            reply = json.loads(line)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(f"{name}: {reply['error']}")
            return reply["return"]

    def hmp(self, line: str) -> str:
        out: str = self.cmd("human-monitor-command", **{"command-line": line})
        return out

    def caps(self, **caps: bool) -> None:
        self.cmd(
            "migrate-set-capabilities",
            capabilities=[{"capability": k.replace("_", "-"), "state": v} for k, v in caps.items()],
        )

    def status(self) -> str:
        st: str = self.cmd("query-status")["status"]
        return st

    def wait_migration(
        self, timeout: float = 60.0, *, statuses: tuple[str, ...] = ("completed",)
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.cmd("query-migrate")
            st = info.get("status")
            if st in statuses:
                return info
            if st in ("failed", "cancelled"):
                raise QmpError(f"migration {st}: {info.get('error-desc', '')}")
            time.sleep(0.05)
        raise TimeoutError(f"migration did not reach {statuses}")

    def read_u32(self, addr: int) -> int:
        out = self.hmp(f"xp /1wx {addr:#x}")
        return int(out.split(":")[1].split()[0], 16)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Vm:
    """One small QEMU (pc-i440fx-7.2, TCG, no devices but an optional IDE disk). Killed on exit."""

    def __init__(
        self,
        workdir: Path,
        name: str,
        *,
        mem_mb: int = 64,
        disk: Path | None = None,
        incoming: str | None = None,
        paused: bool = False,
        extra: list[str] | None = None,
    ) -> None:
        assert QEMU is not None
        self.dir = workdir
        self.qmp_path = workdir / f"{name}.qmp"
        self.log = workdir / f"{name}.log"
        args = [
            QEMU,
            "-machine",
            "pc-i440fx-7.2,accel=tcg",
            "-m",
            str(mem_mb),
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-name",
            name,
        ]
        if disk is not None:
            args += ["-drive", f"file={disk},format=raw,if=ide,snapshot=on"]
        if incoming is not None:
            args += ["-incoming", incoming]
        if paused:
            args.append("-S")
        args += extra or []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self.qmp = Qmp(self.qmp_path)
        except Exception:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def pmem(self, path: Path, size: int) -> bytes:
        self.qmp.cmd("pmemsave", val=0, size=size, filename=str(path))
        return path.read_bytes()

    def __enter__(self) -> Vm:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.qmp.close()
        finally:
            self.kill()


def boot_disk(path: Path) -> Path:
    path.write_bytes(BOOT_SECTOR + bytes(512 * 127))
    os.chmod(path, 0o644)
    return path
