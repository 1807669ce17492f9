"""The node's state directory (default /var/nephele), safe against crashes.

    <root>/images/<content id>/     one image: disk.raw, memory.save, [kernel, initrd], meta.json
    <root>/snapshots/<content id>/  one snapshot (delta against an image), meta.json
    <root>/instances/<uuid>/        one instance: disk.qcow2 (overlay on its image), serial.log, instance.json
    <root>/logs/                    handoff logs and stats
    <root>/tmp/                     staging; an image or import is built here, then renamed into place
    <root>/nephele.log              the node's log

Crash safety: a file is written to a temp name in the same directory, fsynced, renamed over the
target, and the directory fsynced; a multi-file object (an image) is staged in tmp/ and its directory
renamed into place in one step, so a reader sees all of it or none of it. Leftover staging dirs are
swept by `Store.sweep_tmp()`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import uuid as _uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, InvalidInput

DEFAULT_ROOT = "/var/nephele"
ROOT_ENV = "NEPHELE_ROOT"
IMAGE_FORMAT = "nephele.image/v1"
META = "meta.json"
HASH_CHUNK = 1 << 20


def default_root() -> Path:
    return Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_id(files: Mapping[str, str]) -> str:
    """The id of an object made of files: sha256 over its (name, sha256) pairs in name order, so it
    depends on every byte of every file and on nothing else (not paths, times or metadata)."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def hash_files(directory: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    return {n: {"sha256": sha256_file(directory / n), "size": (directory / n).stat().st_size} for n in names}


@dataclass(frozen=True)
class ImageRecord:
    """An image in the store: its directory and what meta.json says about it."""

    path: Path
    meta: Mapping[str, Any]

    @property
    def content_id(self) -> str:
        return str(self.meta["content_id"])

    @property
    def short_id(self) -> str:
        return self.content_id[:12]

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.short_id)

    @property
    def source(self) -> str:
        return str(self.meta.get("source") or "")

    @property
    def disk(self) -> Path:
        return self.path / "disk.raw"

    @property
    def memory(self) -> Path:
        return self.path / "memory.save"

    def size_of(self, name: str) -> int:
        files = self.meta.get("files", {})
        return int(files.get(name, {}).get("size", 0))

    def file_hashes(self) -> dict[str, str]:
        return {n: str(v["sha256"]) for n, v in self.meta.get("files", {}).items()}


class Store:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.images = self.root / "images"
        self.snapshots = self.root / "snapshots"
        self.instances = self.root / "instances"
        self.logs = self.root / "logs"
        self.tmp = self.root / "tmp"
        self.log_file = self.root / "nephele.log"
        self._lock_depth = 0

    def ensure(self) -> Store:
        for d in (self.images, self.snapshots, self.instances, self.logs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------ locking + staging

    @contextlib.contextmanager
    def lock(self, what: str = "node", *, wait: bool = True) -> Iterator[None]:
        """An exclusive lock on the node's store (one mutating op at a time; readers need none).
        Re-entrant within this Store: a second flock on a new descriptor would wait for ourselves."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.ensure()
        with open(self.root / ".lock", "a+") as f:
            flags = fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)
            try:
                fcntl.flock(f.fileno(), flags)
            except BlockingIOError:
                raise Conflict(f"{self.root} is locked by another nephele operation ({what})") from None
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A scratch dir on the store's file system; removed unless the caller renamed it away."""
        self.ensure()
        path = Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=self.tmp))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def sweep_tmp(self) -> list[str]:
        """Remove staging dirs left by a crashed operation (call with the lock held)."""
        removed = []
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    # ---------------------------------------------------------------------------------------- images

    def commit_image(self, staged: Path, meta: Mapping[str, Any]) -> tuple[ImageRecord, bool]:
        """Move a fully written staging dir into images/<content id>. Returns (record, created);
        an image with the same content id already there is kept as it is."""
        cid = str(meta["content_id"])
        for name in meta.get("files", {}):
            fsync_file(staged / name)
        atomic_write_json(staged / META, dict(meta))
        target = self.images / cid
        os.chmod(staged, 0o755)  # mkdtemp made it private; QEMU and other tools read it
        if target.exists():
            return self.image_at(target), False
        self.images.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)
        fsync_dir(self.images)
        return self.image_at(target), True

    def image_at(self, path: Path) -> ImageRecord:
        return ImageRecord(path, read_json(path / META))

    def list_images(self) -> list[ImageRecord]:
        if not self.images.is_dir():
            return []
        out = []
        for p in sorted(self.images.iterdir()):
            if p.is_dir() and (p / META).is_file():
                out.append(self.image_at(p))
        return sorted(out, key=lambda r: (str(r.meta.get("created", "")), r.content_id))

    def remove_image(self, record: ImageRecord) -> None:
        # Rename first: a crash mid-delete leaves a tmp/ leftover, never a half image in images/.
        self.ensure()
        doomed = self.tmp / f"rm-{record.content_id}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(record.path, doomed)
        fsync_dir(self.images)
        shutil.rmtree(doomed, ignore_errors=True)

    # ------------------------------------------------------------------------------------- instances

    def instance_dir(self, uuid: str) -> Path:
        """The directory of instance uuid; anything but a canonical UUID is refused, since callers remove
        this path (a fuzzer found `handoff.cleanup {"uuid": "../images"}` removing the node's images)."""
        try:
            ok = str(_uuid.UUID(uuid)) == uuid
        except (ValueError, TypeError, AttributeError):
            ok = False
        if not ok:
            raise InvalidInput(f"{str(uuid)[:80]!r} is not an instance UUID")
        return self.instances / uuid

    def remove_instance_dir(self, uuid: str) -> None:
        path = self.instance_dir(uuid)
        if path.exists():
            self.ensure()
            doomed = self.tmp / f"rm-{uuid}"
            shutil.rmtree(doomed, ignore_errors=True)
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
