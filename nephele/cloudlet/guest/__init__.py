"""The nephele test guest: a tiny VM built reproducibly from Debian packages (kernel + busybox initramfs +
raw ext4 data disk) by `build.sh` beside this file, cached under a directory named by the hash of the
recipe files, so any change to the recipe builds a fresh guest and an unchanged one is reused.

The guest prints NEPHELE-READY on ttyS0, serves HTTP on :80 (`/cgi-bin/state` -> `counter=N uptime=..
disk_counter=N`, `/cgi-bin/md5` -> `fill_md5=.. counter=N`) and dirties RAM and disk at rates set on the
kernel command line (see `cmdline()` and the header of `init`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nephele.errors import CloudletError

RECIPE_DIR = Path(__file__).resolve().parent
# Every file that decides the bytes of the guest; their contents (and names) make the cache key.
RECIPE_FILES = ("build.sh", "init", "cgi-state", "cgi-md5")
DEFAULT_CACHE_DIR = Path("/var/cache/nephele/guest")
READY_MARKER = "NEPHELE-READY"


@dataclass(frozen=True)
class GuestFiles:
    kernel: Path
    initrd: Path
    disk: Path  # the pristine base disk: copy it (or put a qcow2 overlay on it) before booting

    @property
    def directory(self) -> Path:
        return self.kernel.parent


def recipe_hash() -> str:
    h = hashlib.sha256()
    for name in RECIPE_FILES:
        data = (RECIPE_DIR / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("NEPHELE_GUEST_CACHE", str(DEFAULT_CACHE_DIR)))


def _files(d: Path) -> GuestFiles:
    return GuestFiles(kernel=d / "vmlinuz", initrd=d / "initrd.img", disk=d / "disk.raw")


def ensure_guest(cache_dir: Path | str | None = None) -> GuestFiles:
    """Return the cached guest for the current recipe, building it first if needed (a few seconds, plus
    downloading two .debs once). Concurrent callers wait on a lock; a failed build leaves nothing behind."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = recipe_hash()
    final = cache / key
    done = final / "DONE"
    if done.exists():
        return _files(final)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / ".lock", "w")  # noqa: SIM115 - held for the whole build below
    except OSError as exc:
        raise CloudletError(f"guest cache {cache}: not writable: {exc}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same recipe
        if done.exists():
            return _files(final)
        build_guest(final, debs=cache / "debs")
        (final / "DONE").write_text(key + "\n")
    return _files(final)


def build_guest(out: Path, *, debs: Path | None = None) -> GuestFiles:
    """Build the guest into `out` (replaced atomically: built in a temp dir beside it, then renamed)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cmd = ["bash", str(RECIPE_DIR / "build.sh"), str(tmp)]
        if debs is not None:
            cmd.append(str(debs))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise CloudletError(
                f"guest build ({RECIPE_DIR / 'build.sh'}) failed with exit {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the files are read by QEMU and by other users' tools
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return _files(out)


def cmdline(
    *,
    fill_mib: int = 32,
    fill_kind: str = "random",
    dirty_mib: int = 4,
    disk_kib: int = 64,
    period_s: float = 1,
    ip: str | None = None,
    gw: str | None = None,
    extra: str = "",
) -> str:
    """Kernel command line for the test guest with the workload knobs of its /init."""
    if fill_kind not in ("random", "text"):
        raise CloudletError(f"guest fill kind {fill_kind!r}: expected 'random' or 'text'")
    parts = [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        f"nephele.fill={int(fill_mib)}",
        f"nephele.fillkind={fill_kind}",
        f"nephele.dirty={int(dirty_mib)}",
        f"nephele.diskw={int(disk_kib)}",
        f"nephele.period={period_s:g}",
    ]
    if ip:
        parts.append(f"nephele.ip={ip}")
    if gw:
        parts.append(f"nephele.gw={gw}")
    if extra:
        parts.append(extra)
    return " ".join(parts)
