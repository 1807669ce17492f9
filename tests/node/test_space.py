"""Disk-space checks before an import, on a real small file system (a tmpfs mounted by the fixture),
and the uploaded export removed from the node's tmp/ after an import, whether it worked or not."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nephele.errors import InvalidInput, NoSpace
from nephele.node import images, snapshots, space
from nephele.node.runtime import NodeContext
from nephele.node.store import IMAGE_FORMAT, content_id

MIB = 1 << 20
FS_SIZE = 24 * MIB


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """A 24 MiB tmpfs, mounted for the test and removed after it (needs root, as `make test` runs)."""
    if os.geteuid() != 0:
        pytest.fail("mounting a tmpfs needs root (make test runs as root)")
    mnt = Path(tempfile.mkdtemp(prefix="nephele-space-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "nephele-space", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        mnt.rmdir()


@pytest.fixture
def ctx(small_fs: Path) -> Iterator[NodeContext]:
    c = NodeContext(small_fs / "root")
    yield c
    c.close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_export(path: Path, disk: bytes, memory: bytes) -> str:
    """A nephele image export (what image.export writes), built by hand: no VM needed for the check."""
    files = {"disk.raw": disk, "memory.save": memory}
    cid = content_id({n: _sha(d) for n, d in files.items()})
    meta = {
        "format": IMAGE_FORMAT,
        "content_id": cid,
        "name": "tiny",
        "files": {n: {"sha256": _sha(d), "size": len(d)} for n, d in files.items()},
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(images.EXPORT_META, json.dumps(meta))
        for name, data in files.items():
            zf.writestr(name, data)
    return cid


def snapshot_export(path: Path, image_cid: str, delta: bytes, **meta_over: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "format": snapshots.SNAPSHOT_FORMAT,
        "content_id": _sha(delta + image_cid.encode()),
        "name": "web",
        "image": image_cid,
        "ram_files": {},
        "targets": {},
        "refs": {},
        "files": {snapshots.DELTA: {"sha256": _sha(delta), "size": len(delta)}},
        **meta_over,
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(snapshots.EXPORT_META, json.dumps(meta))
        zf.writestr(snapshots.DELTA, delta)
        zf.writestr(f"{snapshots.STATE_DIR}/domain.xml", "<domain/>")
    return meta


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_image_import_larger_than_the_disk_is_refused_up_front(ctx: NodeContext, small_fs: Path) -> None:
    # 32 MiB of zeros deflate to a few KiB: the upload fits in tmp/, its content does not fit the disk.
    upload = ctx.store.tmp / "nephele-image-tiny-0001.zip"
    image_export(upload, bytes(32 * MIB), b"M" * MIB)
    before = tree(ctx.store.root) - {str(upload.relative_to(ctx.store.root))}
    free = space.free_bytes(small_fs)
    with pytest.raises(NoSpace) as ei:
        images.import_(ctx, {"path": str(upload)})
    err = ei.value
    needed = 33 * MIB + space.margin(33 * MIB)
    assert err.kind == "no_space" and err.needed == needed and err.free <= free
    msg = str(err)
    assert f"on node {socket.gethostname()}" in msg and str(ctx.store.tmp) in msg, msg
    assert f"({needed} bytes) needed" in msg and f"({err.free} bytes) free" in msg, msg
    assert "33.0 MiB for 2 files" in msg and "nothing was written" in msg, msg
    # Nothing left behind: no staging dir, no image, and the spent upload is gone from tmp/.
    assert tree(ctx.store.root) == before
    assert list(ctx.store.tmp.iterdir()) == [] and images.ls(ctx, {}) == []
    assert space.free_bytes(small_fs) >= free


def test_image_import_that_fits_works_and_removes_its_upload(ctx: NodeContext) -> None:
    upload = ctx.store.tmp / "nephele-image-tiny-0002.zip"
    cid = image_export(upload, os.urandom(3 * MIB), os.urandom(MIB))
    out = images.import_(ctx, {"path": str(upload)})
    assert out["content_id"] == cid and out["created_new"]
    assert list(ctx.store.tmp.iterdir()) == []


def test_the_margin_is_part_of_the_need(ctx: NodeContext, small_fs: Path) -> None:
    """Content that would just fit, but not with the margin, is refused: a disk filled to the last block
    fails the next write of anything (logs, meta.json)."""
    free = space.free_bytes(small_fs)
    content = free - space.MARGIN_BYTES // 2
    src = Path(tempfile.mkdtemp()) / "big.zip"  # outside the node: a user's file, kept
    try:
        image_export(src, bytes(content - MIB), bytes(MIB))
        with pytest.raises(NoSpace, match="margin"):
            images.import_(ctx, {"path": str(src)})
        assert src.is_file()
    finally:
        src.unlink()
        src.parent.rmdir()
    assert list(ctx.store.tmp.iterdir()) == []


def test_failed_import_removes_its_upload_but_never_a_users_file(ctx: NodeContext, small_fs: Path) -> None:
    upload = ctx.store.tmp / "nephele-image-x-0003.zip"
    upload.write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="not a nephele image export"):
        images.import_(ctx, {"path": str(upload)})
    assert not upload.exists()
    mine = small_fs / "mine.zip"
    mine.write_bytes(b"not a zip")
    other = ctx.store.tmp / "other.zip"  # in tmp/ but not a copy's name: not ours to remove
    other.write_bytes(b"not a zip")
    for path in (mine, other):
        with pytest.raises(InvalidInput):
            images.import_(ctx, {"path": str(path)})
        assert path.is_file()


def test_snapshot_import_checks_space_and_removes_its_upload(ctx: NodeContext) -> None:
    img = ctx.store.tmp / "nephele-image-tiny-0004.zip"
    cid = image_export(img, os.urandom(MIB), os.urandom(MIB))
    images.import_(ctx, {"path": str(img)})

    big = ctx.store.tmp / "nephele-snapshot-web-0005.zip"
    snapshot_export(big, cid, bytes(40 * MIB))
    with pytest.raises(NoSpace, match=r"snapshot import .*not enough disk space.*for 2 files"):
        snapshots.import_(ctx, {"path": str(big)})
    assert list(ctx.store.tmp.iterdir()) == [] and snapshots.ls(ctx, {}) == []

    small = ctx.store.tmp / "nephele-snapshot-web-0006.zip"
    meta = snapshot_export(small, cid, os.urandom(MIB))
    out = snapshots.import_(ctx, {"path": str(small)})
    assert out["content_id"] == meta["content_id"] and out["delta_bytes"] == MIB
    assert list(ctx.store.tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"content_id": "../../../escape"}, "content_id"),
        ({"content_id": "A" * 64}, "content_id"),
        ({"name": "../web"}, "name"),
        ({"name": ".hidden"}, "name"),
        ({"ram_files": {"pc.ram": "../../etc/x"}}, "ram_files"),
        ({"files": {snapshots.DELTA: {"size": 1}}}, "sha256"),
        ({"files": []}, "sha256"),
        ({"image": 5}, "image"),
        ({"refs": []}, "refs"),
    ],
)
def test_crafted_snapshot_meta_is_refused(
    ctx: NodeContext, small_fs: Path, override: dict[str, object], message: str
) -> None:
    src = small_fs / "crafted.zip"
    snapshot_export(src, "0" * 64, b"delta", **override)
    before = tree(small_fs)
    with pytest.raises(InvalidInput, match=message):
        snapshots.import_(ctx, {"path": str(src)})
    assert tree(small_fs) == before
