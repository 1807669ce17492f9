"""Copying an image to a node that lacks it, sending only what that node lacks (issue 6).

    image.export_delta {id, dest, refs: [content ids of images the receiving node holds]}
    image.import_delta {path, name}

`image.export` ships an image whole (disk, memory, kernel, initrd, deflated). A node that already holds
a sibling image (the same guest built again, an older revision of it) holds most of those blocks
already. `image.export_delta` encodes the image with the delta engine against the images both nodes
hold (the controller passes the receiver's content ids; the sender uses those it has too), the way a
handoff encodes against the base image: per 4 KiB block nothing, ZERO, a reference to a block the
receiver has, or the bytes (zstd). The receiver's `image.import_delta` rebuilds every file, checks it
against the image's recorded sha256, and commits the image exactly as `image.import` would (same
content id, same meta). A file that is not an image export is refused with nothing written.

The memory state (a libvirt save image) is not block aligned: each RAM page follows an 8-byte record
header, so the same page sits at a different offset in every save image. The sender therefore splits
it, exactly and reversibly, into the page payloads (4 KiB each, aligned, in stream order: these go
through the delta engine and dedup against the reference images' flat RAM) and a skeleton (everything
else: libvirt header and XML, QEMU's records and device state) with the offsets where the payloads go
back. The receiver interleaves them again, and the sha256 of the result must be the recorded one. A save
image the stream parser does not understand is sent as one plain target instead (still deduplicated,
just less).

References on each node: the disk, kernel and initrd of a shared image and the flat RAM of its memory
(snapshots.image_ram), reached through symlinks in `<root>/cache/copy/<content id>/` so the block
indexes the delta engine keeps beside its references land in that cache, not in the image store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from nephele.errors import DeltaError, InvalidInput, NepheleError, NodeError, NotFound, VmStateError
from nephele.node import images, snapshots, space
from nephele.node.runtime import NodeContext
from nephele.node.store import IMAGE_FORMAT, ImageRecord, content_id, hash_files

COPY_FORMAT = "nephele.image-copy/v1"
COPY_META = "nephele-image-copy.json"
DELTA = "delta.nvd"
SKELETON = "memory.skeleton"
OFFSETS = "memory.offsets"
MEMORY = "memory.save"
PAGES = "memory.pages"  # the target name of the page payloads in the delta stream
PAGE = 4096
MAX_REFS = 4  # shared images used as references (the most similar first); bounds the sender's table
CODEC = "zstd"
_OFFSET = struct.Struct("<Q")


# ------------------------------------------------------------------------------------- references


def _ref_prefix(cid: str) -> str:
    return cid[:16]


def image_refs(ctx: NodeContext, rec: ImageRecord) -> dict[str, Path]:
    """Reference id -> path for one image on this node: `<cid16>:disk.raw` (and kernel, initrd) and
    `<cid16>:mem:<block>` per flat RAM block. Both nodes derive the same files from the same image,
    so the digests the delta engine checks agree."""
    cache = ctx.store.root / "cache" / "copy" / rec.content_id
    cache.mkdir(parents=True, exist_ok=True)
    prefix = _ref_prefix(rec.content_id)
    files: dict[str, Path] = {}
    for name in sorted(rec.file_hashes()):
        if name != MEMORY and (rec.path / name).is_file():
            files[name] = rec.path / name
    try:
        ram = snapshots.image_ram(ctx, rec)
    except NepheleError as exc:  # an unreadable memory state: that image lends its files only
        ctx.log.warning("image %s: no RAM references (%s)", rec.short_id, exc)
        ram = {}
    for block, path in ram.items():
        files[f"mem:{block}"] = path
    refs: dict[str, Path] = {}
    for key, target in files.items():
        link = cache / key.replace("/", "_").replace(":", "_")
        if not (link.is_symlink() and os.readlink(link) == str(target)):
            tmp = link.with_name(f".{link.name}.{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, link)  # atomic: a concurrent op sees the old link or the new one
        refs[f"{prefix}:{key}"] = link
    return refs


def _shared(ctx: NodeContext, rec: ImageRecord, held: list[str]) -> list[ImageRecord]:
    """The images the receiver holds (`held`) that this node has too, most similar first: same name,
    then the same disk size, then the newest."""
    want = set(held) - {rec.content_id}
    mine = [r for r in ctx.store.list_images() if r.content_id in want]
    size = rec.size_of("disk.raw")
    mine.sort(key=lambda r: str(r.meta.get("created", "")), reverse=True)  # newest first ...
    mine.sort(key=lambda r: (r.name != rec.name, r.size_of("disk.raw") != size))  # ... within a group
    ordered = mine
    return ordered[:MAX_REFS]


# ------------------------------------------------------------------------------- memory transform


def split_pages(save: Path, skeleton: Path, pages: Path, offsets: Path) -> int:
    """Split a libvirt save image into page payloads (aligned, stream order), the skeleton and the
    skeleton offsets where the payloads go back (little-endian u64 each). Returns the page count.
    Raises VmStateError when the stream cannot be parsed."""
    from nephele.vmstate import read_save_header
    from nephele.vmstate.stream import RAM_PAGE, Page, event_bytes, iter_events, page_header

    hdr = read_save_header(save)
    count = 0
    with (
        open(save, "rb") as f,
        open(skeleton, "wb") as sk,
        open(pages, "wb") as pg,
        open(offsets, "wb") as off,
    ):
        head = f.read(hdr.stream_offset)
        sk.write(head)
        pos = len(head)
        for ev in iter_events(f):
            if type(ev) is Page and len(ev.data) == PAGE:
                h = page_header(ev.block, ev.offset, RAM_PAGE, ev.cont)
                sk.write(h)
                pos += len(h)
                off.write(_OFFSET.pack(pos))
                pg.write(ev.data)
                count += 1
            else:
                data = event_bytes(ev)
                sk.write(data)
                pos += len(data)
    return count


def _joined(skeleton: Path, offsets: Path, pages: Path) -> Iterator[bytes]:
    """The save image's bytes again, in order, from what split_pages wrote."""
    raw = offsets.read_bytes()
    if len(raw) % _OFFSET.size:
        raise InvalidInput(f"{offsets.name}: not a list of offsets")
    with open(skeleton, "rb") as sk, open(pages, "rb") as pg:
        pos = 0
        for (at,) in _OFFSET.iter_unpack(raw):
            if at < pos:
                raise InvalidInput(f"{offsets.name}: offsets go backwards")
            if at > pos:
                chunk = sk.read(at - pos)
                if len(chunk) != at - pos:
                    raise InvalidInput(f"{skeleton.name}: shorter than its offsets")
                yield chunk
                pos = at
            payload = pg.read(PAGE)
            if len(payload) != PAGE:
                raise InvalidInput(f"{pages.name}: fewer pages than offsets")
            yield payload
        while chunk := sk.read(1 << 20):
            yield chunk
        if pg.read(1):
            raise InvalidInput(f"{pages.name}: more pages than offsets")


def _sha_of(chunks: Iterator[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def join_pages(skeleton: Path, offsets: Path, pages: Path, out: Path) -> str:
    """Write the save image split_pages took apart; returns its sha256."""
    h = hashlib.sha256()
    with open(out, "wb") as f:
        for c in _joined(skeleton, offsets, pages):
            h.update(c)
            f.write(c)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ export


def export_delta(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """One zip: the copy's meta (the image's meta, the references used), the delta stream, and the
    memory skeleton and offsets. Result: image.export's, plus `refs` (content ids encoded against),
    `whole_bytes` (what the image's files add up to) and the delta stream's stats."""
    from nephele.delta import Target, encode_files  # numba: only paid by the ops that encode

    rec = images.resolve(ctx.store, str(args.get("id") or ""))
    dest_arg = args.get("dest")
    if not isinstance(dest_arg, str) or not dest_arg:
        raise InvalidInput("image export_delta: no destination FILE given")
    dest = Path(dest_arg).expanduser()
    if dest.is_dir():
        dest = dest / f"{rec.name}-{rec.short_id}.copy.zip"
    if not dest.parent.is_dir():
        raise InvalidInput(f"image export_delta: {dest.parent}: no such directory")
    held_arg = args.get("refs") or []
    if not isinstance(held_arg, list) or not all(isinstance(x, str) for x in held_arg):
        raise InvalidInput("image export_delta: refs must be a list of image content ids")
    shared = _shared(ctx, rec, held_arg)
    refs: dict[str, Path] = {}
    if shared:
        ctx.progress(
            "Encoding against image(s) the receiver holds: "
            + ", ".join(f"{r.name} ({r.short_id})" for r in shared)
        )
    for r in shared:
        refs.update(image_refs(ctx, r))
    files = rec.file_hashes()
    tmp = dest.parent / f".{dest.name}.{os.getpid()}.tmp"
    with ctx.store.staging("copyexport") as work:
        memory_mode = None
        targets: list[Any] = []
        for name in sorted(files):
            path = rec.path / name
            if name == MEMORY:
                try:
                    n = split_pages(path, work / SKELETON, work / PAGES, work / OFFSETS)
                    # Never ship a split that would not rebuild the very file (checked here, once).
                    if _sha_of(_joined(work / SKELETON, work / OFFSETS, work / PAGES)) != files[name]:
                        raise VmStateError("the split does not rebuild the save image")
                    targets.append(Target(PAGES, "memory", work / PAGES, None))
                    memory_mode = {"mode": "pages", "pages": n}
                    continue
                except VmStateError as exc:
                    ctx.log.warning("image %s: memory sent whole: %s", rec.short_id, exc)
                    for f in (SKELETON, PAGES, OFFSETS):
                        (work / f).unlink(missing_ok=True)
                    memory_mode = {"mode": "whole"}
            base = f"{_ref_prefix(shared[0].content_id)}:{name}" if shared else None
            targets.append(Target(name, "disk", path, base if base in refs else None))
        ctx.progress(
            f"Encoding image {rec.short_id} ({len(targets)} file(s)) against {len(refs)} reference(s)..."
        )
        with open(work / DELTA, "wb") as out:
            stats = encode_files(refs, targets, out, codec=CODEC)
        doc = {
            "format": COPY_FORMAT,
            "image": dict(rec.meta),
            "refs": [r.content_id for r in shared],
            "ref_ids": sorted(refs),
            "memory": memory_mode,
        }
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                zf.writestr(COPY_META, json.dumps(doc, indent=2, sort_keys=True))
                zf.write(work / DELTA, DELTA)
                if memory_mode and memory_mode["mode"] == "pages":
                    for f in (SKELETON, OFFSETS):
                        zf.write(work / f, f, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
            images.atomic_rename(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    whole = sum(int(v.get("size", 0)) for v in rec.meta.get("files", {}).values())
    size = dest.stat().st_size
    ctx.log.info(
        "image export_delta %s -> %s (%d bytes, against %s)",
        rec.content_id,
        dest,
        size,
        [r.short_id for r in shared],
    )
    return {
        **images.summary(rec),
        "file": str(dest),
        "file_bytes": size,
        "whole_bytes": whole,
        "refs": doc["refs"],
        "memory": memory_mode,
        "stats": snapshots._stats(stats),
    }


# ------------------------------------------------------------------------------------------ import


def _read_doc(zf: zipfile.ZipFile, raw: str) -> dict[str, Any]:
    what = f"image import_delta: {raw}"
    try:
        doc = json.loads(zf.read(COPY_META))
    except KeyError:
        raise InvalidInput(f"{what}: no {COPY_META} inside; not a nephele image copy") from None
    except (ValueError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{what}: unreadable {COPY_META} ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != COPY_FORMAT:
        raise InvalidInput(
            f"{what}: unsupported copy format {doc.get('format') if isinstance(doc, dict) else doc!r}"
        )
    meta = doc.get("image")
    if not isinstance(meta, dict) or meta.get("format") != IMAGE_FORMAT:
        raise InvalidInput(f"{what}: no image meta of format {IMAGE_FORMAT}")
    files = meta.get("files")
    if not isinstance(files, dict) or not {"disk.raw", MEMORY} <= set(files):
        raise InvalidInput(f"{what}: the image lists no disk.raw and memory.save")
    for name, info in files.items():
        if "/" in name or name.startswith(".") or not isinstance(info, dict) or "sha256" not in info:
            raise InvalidInput(f"{what}: bad file entry {name!r}")
    if not isinstance(meta.get("content_id"), str):
        raise InvalidInput(f"{what}: no content id")
    if content_id({n: str(v["sha256"]) for n, v in files.items()}) != meta["content_id"]:
        raise InvalidInput(f"{what}: the content id does not match the listed files")
    for key in ("refs", "ref_ids"):
        if not isinstance(doc.get(key), list) or not all(isinstance(x, str) for x in doc[key]):
            raise InvalidInput(f"{what}: bad {key} list")
    mem = doc.get("memory")
    if not isinstance(mem, dict) or mem.get("mode") not in ("pages", "whole"):
        raise InvalidInput(f"{what}: bad memory entry {mem!r}")
    return doc


def _size(info: dict[str, Any]) -> int:
    size = info.get("size")
    return size if isinstance(size, int) and size >= 0 else 0


def _extract(zf: zipfile.ZipFile, name: str, dest: Path, raw: str) -> None:
    try:
        with zf.open(name) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise InvalidInput(f"image import_delta: {raw}: {name} is missing") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise InvalidInput(f"image import_delta: {raw}: {name} is corrupt ({exc})") from None


def _decode(inp: BinaryIO, refs: dict[str, Path], outputs: dict[str, Path], raw: str) -> None:
    from nephele.delta import decode_files  # numba: only paid by the ops that decode

    try:
        decode_files(inp, refs, outputs)
    except DeltaError as exc:
        raise InvalidInput(
            f"image import_delta: {raw}: the delta does not rebuild the image here: {exc}"
        ) from None


def import_delta(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return _import_delta(ctx, args)
    finally:
        images.discard_upload(ctx, args)  # a spent upload in tmp/ goes, as after image.import


def _import_delta(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    zf, raw, src = images.open_export(args, "image")
    with zf, ctx.store.staging("copyimport") as stage, ctx.store.staging("copywork") as work:
        doc = _read_doc(zf, raw)
        meta: dict[str, Any] = doc["image"]
        files: dict[str, Any] = meta["files"]
        have = {r.content_id: r for r in ctx.store.list_images()}
        refs: dict[str, Path] = {}
        for cid in doc["refs"]:
            rec = have.get(cid)
            if rec is None:
                raise NotFound(
                    f"image import_delta: {raw}: it was encoded against image {cid[:12]}, which this node "
                    "does not hold (any more); copy the image whole (image import)"
                )
            refs.update(image_refs(ctx, rec))
        missing = [r for r in doc["ref_ids"] if r not in refs]
        if missing:
            raise NodeError(
                f"image import_delta: {raw}: this node cannot derive reference(s) {', '.join(missing)} "
                "from the images it holds"
            )
        pages = doc["memory"]["mode"] == "pages"
        # The image's files, plus the delta, skeleton and page payloads while it is rebuilt.
        scratch = images.member_bytes(zf, [DELTA, SKELETON, OFFSETS])
        if pages:
            scratch += _size(files[MEMORY])
        space.require(
            stage,
            sum(_size(v) for v in files.values()) + scratch,
            what=f"image import_delta {raw}",
            node=ctx.hostname,
            detail=f"for {len(files)} files and the delta",
        )
        _extract(zf, DELTA, work / DELTA, raw)
        outputs: dict[str, Path] = {}
        for name in sorted(files):
            if name == MEMORY and pages:
                outputs[PAGES] = work / PAGES
            else:
                outputs[name] = stage / name
        ctx.progress(f"Rebuilding image {str(meta['content_id'])[:12]} from the delta...")
        with open(work / DELTA, "rb") as inp:
            _decode(inp, {k: refs[k] for k in doc["ref_ids"]}, outputs, raw)
        if pages:
            _extract(zf, SKELETON, work / SKELETON, raw)
            _extract(zf, OFFSETS, work / OFFSETS, raw)
            join_pages(work / SKELETON, work / OFFSETS, work / PAGES, stage / MEMORY)
        got = hash_files(stage, sorted(files))
        for name, info in sorted(files.items()):
            if got[name]["sha256"] != info["sha256"]:
                raise InvalidInput(
                    f"image import_delta: {raw}: {name} rebuilt with sha256 {got[name]['sha256'][:12]}..., "
                    f"expected {str(info['sha256'])[:12]}...; nothing was imported"
                )
        new_meta = dict(meta)
        new_meta["files"] = got
        if args.get("name"):
            new_meta["name"] = str(args["name"])
        new_meta["imported"] = {
            "from": str(src.resolve()),
            "at": images.now_iso(),
            "delta_against": list(doc["refs"]),
        }
        with ctx.store.lock("image import"):
            rec, created = ctx.store.commit_image(stage, new_meta)
    ctx.log.info("image import_delta %s -> %s (%s)", src, rec.content_id, "new" if created else "existing")
    return {**images.summary(rec), "created_new": created}


# ----------------------------------------------------------------------------------------- discard


def discard(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """Remove a file a copy left in `<root>/tmp/` (an export fetched, an upload imported). Only plain
    files directly in tmp/ named `nephele-*` are removed; anything else is refused."""
    raw = args.get("path")
    path = _tmp_file(ctx, raw, "copy discard")
    existed = path.exists()
    path.unlink(missing_ok=True)
    return {"path": raw, "removed": existed}


# ---------------------------------------------------------------------------------------- partials

PART_PREFIX = "nephele-part-"  # an upload named by its content, kept across retries to resume
EXPORT_PREFIX = "nephele-export-"  # a copy's export on the sending node, kept until it is fetched
PARTIAL_MAX_AGE = 24 * 3600.0  # a partial not touched for this long is swept: its copy was given up


def _tmp_file(ctx: NodeContext, raw: Any, what: str) -> Path:
    """A plain `nephele-*` file directly in `<root>/tmp/` (what the copy ops may read or remove)."""
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise InvalidInput(f"{what}: no usable path given")
    path = Path(raw)
    tmp = ctx.store.tmp.resolve()
    if path.parent.resolve() != tmp or not path.name.startswith("nephele-") or path.is_symlink():
        raise InvalidInput(f"{what}: {raw} is not a copy's file in {tmp}")
    if path.is_dir():
        raise InvalidInput(f"{what}: {raw} is a directory")
    return path


def sweep_partials(ctx: NodeContext, *, keep: Path | None = None, max_age: float = PARTIAL_MAX_AGE) -> int:
    """Remove partial uploads and kept exports in tmp/ untouched for `max_age` seconds (their copy was
    given up: a resumed one appends and so renews the time). Returns the bytes freed."""
    freed = 0
    now = time.time()
    for prefix in (PART_PREFIX, EXPORT_PREFIX):
        for path in ctx.store.tmp.glob(f"{prefix}*"):
            if path == keep or path.is_symlink() or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                st = path.stat()
                if now - st.st_mtime > max_age:
                    path.unlink()
                    freed += st.st_size
                    ctx.log.info("swept the stale partial %s (%d bytes)", path, st.st_size)
    return freed


def partial(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """What this node holds of a copy's file in tmp/, so the controller sends only the rest:

        copy.partial {path, upto?, expect?} -> {path, size, sha256, free}

    `size` is the file's length (-1: no such file), `sha256` the digest of its first min(size, upto)
    bytes (the whole file without `upto`), which the controller compares with the same prefix of its
    own copy. `expect`: the whole file's size the controller is about to complete; NoSpace when tmp/
    cannot hold the rest (the partial itself is already counted as used). Stale partials are swept
    first (PARTIAL_MAX_AGE)."""
    path = _tmp_file(ctx, args.get("path"), "copy partial")
    upto = args.get("upto")
    if upto is not None and (not isinstance(upto, int) or isinstance(upto, bool) or upto < 0):
        raise InvalidInput(f"copy partial: upto must be a byte count, not {upto!r}")
    expect = args.get("expect")
    if expect is not None and (not isinstance(expect, int) or isinstance(expect, bool) or expect < 0):
        raise InvalidInput(f"copy partial: expect must be a byte count, not {expect!r}")
    sweep_partials(ctx, keep=path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            left = size if upto is None else min(size, upto)
            while left > 0 and (chunk := f.read(min(left, 1 << 20))):
                h.update(chunk)
                left -= len(chunk)
    except FileNotFoundError:
        size = -1
    have = max(size, 0)
    if expect is not None and expect > have:
        space.require(
            ctx.store.tmp,
            expect - have,
            what=f"copy to {path}",
            node=ctx.hostname,
            detail=f"to complete the {space.human(expect)} file",
        )
    return {"path": str(path), "size": size, "sha256": h.hexdigest(), "free": space.free_bytes(ctx.store.tmp)}
