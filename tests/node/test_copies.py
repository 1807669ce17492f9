"""image.export_delta / image.import_delta (nephele/node/copies.py) between two node stores, without a
hypervisor: images made of a disk and a hand-built libvirt save image, so the memory split, the delta
against a sibling image the receiver holds and the exact rebuild are checked byte for byte."""

from __future__ import annotations

import hashlib
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest

from nephele.errors import InvalidInput, NotFound
from nephele.node import copies, images
from nephele.node.runtime import NodeContext
from nephele.node.store import IMAGE_FORMAT, ImageRecord, content_id, hash_files
from nephele.vmstate import stream as s
from tests.vmstate import streams as b
from tests.vmstate.test_savefile import image_bytes

PAGE = s.PAGE_SIZE
NPAGES = 256  # 1 MiB of guest RAM


def save_image(pages: list[bytes | None]) -> bytes:
    """A libvirt save image whose RAM block pc.ram holds `pages` (None: a zero page record)."""
    sid = 2
    out = s.FILE_HEADER + b.config(page_bits=True) + b.start(sid, [("pc.ram", len(pages) * PAGE)])
    recs = []
    for i, data in enumerate(pages):
        cont = None if i else "pc.ram"
        recs.append(b.zero(cont, i * PAGE) if data is None else b.page(cont, i * PAGE, data))
    # Two sections, like QEMU's bulk stage split by its time limit.
    half = len(recs) // 2
    out += b.section(s.SEC_PART, sid, recs[:half]) + b.section(s.SEC_PART, sid, [])
    out += b.section(s.SEC_END, sid, recs[half:])
    return image_bytes(out + b.tail())


def guest(seed: int, *, changed: int = 0) -> tuple[bytes, list[bytes | None]]:
    """A 2 MiB disk and the RAM of a guest; `changed` blocks of each differ from seed's guest, and the
    zero pages move (so the same page sits at another offset of the save image)."""
    rng = random.Random(seed)
    disk = bytearray(rng.randbytes(2 << 20))
    disk[1 << 20 :] = bytes(1 << 20)  # half the disk unused
    pages: list[bytes | None] = [rng.randbytes(PAGE) if i % 4 else None for i in range(NPAGES)]
    other = random.Random(seed * 1000 + changed)
    for _ in range(changed):
        at = other.randrange(0, (1 << 20) // PAGE) * PAGE
        disk[at : at + PAGE] = other.randbytes(PAGE)
        pages[other.randrange(NPAGES)] = other.randbytes(PAGE)
    if changed:
        pages[1], pages[3] = None, other.randbytes(PAGE)  # zero pages elsewhere: offsets shift
    return bytes(disk), pages


def add_image(
    ctx: NodeContext, name: str, disk: bytes, pages: list[bytes | None], created: str
) -> ImageRecord:
    with ctx.store.staging("t") as stage:
        pass
    stage.mkdir()
    (stage / "disk.raw").write_bytes(disk)
    (stage / "memory.save").write_bytes(save_image(pages))
    (stage / "kernel").write_bytes(b"vmlinuz " * 5000)
    files = hash_files(stage, ["disk.raw", "kernel", "memory.save"])
    meta: dict[str, Any] = {"format": IMAGE_FORMAT, "name": name, "files": files, "created": created}
    meta["content_id"] = content_id({n: str(h["sha256"]) for n, h in files.items()})
    rec, _ = ctx.store.commit_image(stage, meta)
    return rec


@pytest.fixture
def nodes(tmp_path: Path) -> tuple[NodeContext, NodeContext, ImageRecord, ImageRecord]:
    a, bnode = NodeContext(tmp_path / "a"), NodeContext(tmp_path / "b")
    disk1, pages1 = guest(1)
    disk2, pages2 = guest(1, changed=8)
    old = add_image(a, "tiny", disk1, pages1, "2026-01-01T00:00:00Z")
    new = add_image(a, "tiny", disk2, pages2, "2026-02-01T00:00:00Z")
    add_image(bnode, "tiny", disk1, pages1, "2026-01-01T00:00:00Z")
    return a, bnode, old, new


def files_of(rec: ImageRecord) -> dict[str, str]:
    return {n: hashlib.sha256((rec.path / n).read_bytes()).hexdigest() for n in rec.file_hashes()}


def test_split_and_join_rebuild_the_save_image_exactly(tmp_path: Path) -> None:
    _, pages = guest(3, changed=2)
    save = tmp_path / "memory.save"
    save.write_bytes(save_image(pages))
    n = copies.split_pages(save, tmp_path / "sk", tmp_path / "pg", tmp_path / "off")
    assert n == sum(p is not None for p in pages)
    assert (tmp_path / "pg").stat().st_size == n * PAGE
    sha = copies.join_pages(tmp_path / "sk", tmp_path / "off", tmp_path / "pg", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == save.read_bytes()
    assert sha == hashlib.sha256(save.read_bytes()).hexdigest()


def test_delta_copy_sends_only_what_the_receiver_lacks(nodes: Any, tmp_path: Path) -> None:
    a, bnode, old, new = nodes
    whole = images.export(a, {"id": new.content_id, "dest": str(tmp_path / "whole.zip")})
    res = copies.export_delta(
        a, {"id": new.content_id, "dest": str(tmp_path / "d.zip"), "refs": [old.content_id]}
    )
    assert res["refs"] == [old.content_id] and res["memory"]["mode"] == "pages"
    # 8 changed disk blocks and ~10 changed pages of ~3 MiB: a few dozen KiB instead of megabytes.
    assert res["file_bytes"] * 20 < whole["file_bytes"], (res["file_bytes"], whole["file_bytes"])
    got = copies.import_delta(bnode, {"path": res["file"], "name": "tiny-2"})
    assert got["created_new"] and got["content_id"] == new.content_id and got["name"] == "tiny-2"
    rec = images.resolve(bnode.store, new.content_id)
    assert files_of(rec) == files_of(new)
    assert rec.meta["imported"]["delta_against"] == [old.content_id]
    # Again, uploaded into tmp/ as the controller does: the image is there already, nothing changes,
    # and the spent upload is removed.
    upload = bnode.store.tmp / "nephele-image-tiny-2-0123abcd.zip"
    upload.write_bytes(Path(res["file"]).read_bytes())
    again = copies.import_delta(bnode, {"path": str(upload)})
    assert not again["created_new"]
    assert list(bnode.store.tmp.iterdir()) == []


def test_without_shared_images_the_copy_is_whole_but_still_exact(nodes: Any, tmp_path: Path) -> None:
    a, _, _, new = nodes
    c = NodeContext(tmp_path / "c")
    res = copies.export_delta(a, {"id": new.content_id, "dest": str(tmp_path / "d.zip"), "refs": ["ff" * 32]})
    assert res["refs"] == []
    copies.import_delta(c, {"path": res["file"]})
    assert files_of(images.resolve(c.store, new.content_id)) == files_of(new)


def test_an_unparsable_memory_state_is_sent_whole(tmp_path: Path) -> None:
    a, c = NodeContext(tmp_path / "a"), NodeContext(tmp_path / "c")
    with a.store.staging("t") as stage:
        pass
    stage.mkdir()
    (stage / "disk.raw").write_bytes(bytes(8192))
    (stage / "memory.save").write_bytes(b"not a save image")
    files = hash_files(stage, ["disk.raw", "memory.save"])
    meta: dict[str, Any] = {"format": IMAGE_FORMAT, "name": "odd", "files": files}
    meta["content_id"] = content_id({n: str(h["sha256"]) for n, h in files.items()})
    rec, _ = a.store.commit_image(stage, meta)
    res = copies.export_delta(a, {"id": "odd", "dest": str(tmp_path / "d.zip")})
    assert res["memory"] == {"mode": "whole"}
    copies.import_delta(c, {"path": res["file"]})
    assert files_of(images.resolve(c.store, rec.content_id)) == files_of(rec)


def test_a_receiver_without_the_reference_image_is_told_and_keeps_nothing(nodes: Any, tmp_path: Path) -> None:
    a, _, old, new = nodes
    c = NodeContext(tmp_path / "c")
    res = copies.export_delta(
        a, {"id": new.content_id, "dest": str(tmp_path / "d.zip"), "refs": [old.content_id]}
    )
    with pytest.raises(NotFound, match=f"encoded against image {old.content_id[:12]}"):
        copies.import_delta(c, {"path": res["file"]})
    assert c.store.list_images() == [] and list(c.store.tmp.iterdir()) == []


def test_a_damaged_copy_is_refused_and_leaves_nothing(nodes: Any, tmp_path: Path) -> None:
    a, bnode, old, new = nodes
    res = copies.export_delta(
        a, {"id": new.content_id, "dest": str(tmp_path / "d.zip"), "refs": [old.content_id]}
    )
    # The skeleton is what no checksum of the delta engine covers: flip a byte of it.
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(res["file"]) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == copies.SKELETON:
                data = data[:200] + bytes([data[200] ^ 1]) + data[201:]
            zout.writestr(item, data)
    before = [r.content_id for r in bnode.store.list_images()]
    with pytest.raises(InvalidInput, match=r"memory\.save rebuilt with sha256"):
        copies.import_delta(bnode, {"path": str(bad)})
    assert [r.content_id for r in bnode.store.list_images()] == before
    assert list(bnode.store.tmp.iterdir()) == []
    (tmp_path / "junk.zip").write_bytes(b"PK junk")
    with pytest.raises(InvalidInput, match="not a nephele image export"):
        copies.import_delta(bnode, {"path": str(tmp_path / "junk.zip")})
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as zf:
        zf.writestr("x", "y")
    with pytest.raises(InvalidInput, match="not a nephele image copy"):
        copies.import_delta(bnode, {"path": str(tmp_path / "plain.zip")})


def test_bad_arguments(nodes: Any, tmp_path: Path) -> None:
    a = nodes[0]
    with pytest.raises(InvalidInput, match="no destination"):
        copies.export_delta(a, {"id": nodes[3].content_id})
    with pytest.raises(InvalidInput, match="refs must be a list"):
        copies.export_delta(a, {"id": nodes[3].content_id, "dest": str(tmp_path / "x.zip"), "refs": "abc"})
    with pytest.raises(InvalidInput, match="no such directory"):
        copies.export_delta(a, {"id": nodes[3].content_id, "dest": str(tmp_path / "no" / "x.zip")})


def test_discard_removes_only_a_copys_file_in_tmp(tmp_path: Path) -> None:
    ctx = NodeContext(tmp_path / "n")
    f = ctx.store.tmp / "nephele-image-tiny-1234.zip"
    f.write_bytes(b"x")
    assert copies.discard(ctx, {"path": str(f)}) == {"path": str(f), "removed": True}
    assert not f.exists()
    assert copies.discard(ctx, {"path": str(f)})["removed"] is False
    other = tmp_path / "nephele-precious"
    other.write_bytes(b"x")
    for bad in (
        str(other),
        str(ctx.store.tmp / "meta.json"),
        str(ctx.store.tmp / ".." / "nephele.log"),
        "",
        str(ctx.store.tmp / "nephele-\0x"),
    ):
        with pytest.raises(InvalidInput):
            copies.discard(ctx, {"path": bad})
    assert other.exists()


def test_no_room_for_the_rebuilt_image_is_refused_up_front(
    nodes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nephele.errors import NoSpace
    from nephele.node import space

    a, bnode, old, new = nodes
    res = copies.export_delta(
        a, {"id": new.content_id, "dest": str(tmp_path / "d.zip"), "refs": [old.content_id]}
    )
    monkeypatch.setattr(space, "free_bytes", lambda path: 1 << 20)
    with pytest.raises(NoSpace, match=r"image import_delta .* not enough disk space"):
        copies.import_delta(bnode, {"path": res["file"]})
    assert new.content_id not in [r.content_id for r in bnode.store.list_images()]
    assert list(bnode.store.tmp.iterdir()) == []
