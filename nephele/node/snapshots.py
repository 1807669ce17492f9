"""Snapshots: the disk and memory of a VM that was resumed from an image, customised and paused again,
stored as one flat delta stream (nephele.delta) against that image.

    <root>/snapshots/<content id>/delta.nvd   disk + flat RAM blocks, encoded against the image's disk
                                              and the image's flat RAM (nephele.vmstate split)
    <root>/snapshots/<content id>/state/      the save image's small parts (XML, cookie, stream prefix,
                                              device tail, vmstate.json) without the RAM files
    <root>/snapshots/<content id>/meta.json

The image's flat RAM is derived from its save image on first use and kept in `images/<id>/ram/` (not
part of the image's content id or its export). Running a snapshot decodes the delta into the instance's
directory and rebuilds a verified save image from the parts (vmstate.rebuild_save_image).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid as uuidlib
import zipfile
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, DeltaError, InvalidInput, NodeError, NotFound
from nephele.node import domain as dx
from nephele.node import images, space
from nephele.node.runtime import NodeContext
from nephele.node.store import (
    ImageRecord,
    Store,
    atomic_write_json,
    content_id,
    fsync_dir,
    hash_files,
    read_json,
    sha256_file,
)
from nephele.vmstate import load_parts, rebuild_save_image, replace_xml, split_save_image, store_parts

SNAPSHOT_FORMAT = "nephele.snapshot/v1"
DELTA = "delta.nvd"
STATE_DIR = "state"
RAM_DIR = "ram"
DISK_REF = "disk"


def _mem_ref(block: str) -> str:
    return f"mem:{block}"


def list_snapshots(store: Store) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    if store.snapshots.is_dir():
        for p in sorted(store.snapshots.iterdir()):
            if p.is_dir() and (p / "meta.json").is_file():
                out.append((p, dict(read_json(p / "meta.json"))))
    return sorted(out, key=lambda t: (str(t[1].get("created", "")), t[0].name))


def summary(path: Path, meta: dict[str, Any], store: Store) -> dict[str, Any]:
    image_name = meta["image"][:12]
    for rec in store.list_images():
        if rec.content_id == meta["image"]:
            image_name = rec.name
    return {
        "name": meta["name"],
        "id": meta["content_id"][:12],
        "content_id": meta["content_id"],
        "image": meta["image"],
        "image_name": image_name,
        "created": meta.get("created"),
        "delta_bytes": int(meta["files"][DELTA]["size"]),
        "disk_only": bool(meta.get("disk_only")),
        "path": str(path),
    }


def resolve(store: Store, ref: str) -> tuple[Path, dict[str, Any]]:
    """A snapshot by name, content id or ID prefix (4+ hex digits); a DEST path means its file name."""
    name = Path(ref).name
    found = [
        (p, m)
        for p, m in list_snapshots(store)
        if m["name"] in (ref, name)
        or m["content_id"] == ref
        or (len(ref) >= 4 and m["content_id"].startswith(ref))
    ]
    if not found:
        raise NotFound(f"no snapshot {ref!r} on this node (`snapshots` lists them)")
    if len(found) > 1:
        raise Conflict(f"snapshot {ref!r} is ambiguous: {', '.join(m['content_id'][:12] for _, m in found)}")
    return found[0]


def image_ram(ctx: NodeContext, rec: ImageRecord) -> dict[str, Path]:
    """The image's memory as flat RAM files per block, derived once from its save image."""
    ram_dir = rec.path / RAM_DIR
    if not (ram_dir / "vmstate.json").is_file():
        with ctx.store.staging("ram") as stage:
            ctx.progress(f"Indexing the memory of image {rec.short_id} (once)...")
            parts = split_save_image(rec.memory, stage)
            store_parts(parts, stage)
            with ctx.store.lock("image ram"):
                if not (ram_dir / "vmstate.json").is_file():
                    shutil.rmtree(ram_dir, ignore_errors=True)
                    os.rename(stage, ram_dir)
                    fsync_dir(rec.path)
    return dict(load_parts(ram_dir).ram)


def _name_of(dest: str) -> str:
    name = Path(dest).name
    for suffix in (".zip", ".nvd"):
        name = name.removesuffix(suffix)
    if not name or name.startswith("."):
        raise InvalidInput(f"snapshot build: {dest!r} is not a usable snapshot name")
    return name


def build(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    rec = images.resolve(ctx.store, str(args.get("image") or ""))
    dest = args.get("dest")
    if not isinstance(dest, str) or not dest:
        raise InvalidInput("snapshot build: no DEST (snapshot name) given")
    name = _name_of(dest)
    if any(m["name"] == name for _, m in list_snapshots(ctx.store)):
        raise Conflict(f"a snapshot named {name!r} already exists on this node (snapshot rm it first)")
    disk_only = bool(args.get("disk_only"))
    timeout = args.get("timeout")
    with ctx.store.staging("snapshot") as stage:
        dom_uuid = str(uuidlib.uuid4())
        dom_name = f"nephele-snap-{dom_uuid[:8]}"
        overlay = stage / "disk.qcow2"
        qemu_img(["create", "-q", "-f", "qcow2", "-b", str(rec.disk), "-F", "raw", str(overlay)])
        boot = rec.meta.get("boot") or {}
        xml = dx.rewrite_for_instance(
            ctx.hv.saved_xml(rec.memory),
            name=dom_name,
            uuid=dom_uuid,
            title=str(args.get("title") or name),
            disk=str(overlay),
            disk_format="qcow2",
            serial_log=str(stage / "serial.log"),
            ports=(),
            forward_address="",
            tags={"role": "snapshot-build", "image": rec.content_id, "name": name},
            kernel=str(rec.path / "kernel") if boot.get("kernel") else None,
            initrd=str(rec.path / "initrd") if boot.get("initrd") else None,
        )
        restore = stage / "memory.restore"
        replace_xml(rec.memory, xml, out=restore)
        t0 = time.monotonic()
        ctx.hv.restore(restore, None, running=True)
        restore.unlink()
        dom = ctx.hv.lookup(dom_uuid)
        try:
            ctx.hv.wait_paused(
                dom,
                timeout=float(timeout) if timeout is not None else None,
                on_ready=lambda: ctx.progress(
                    f"Launched VM {dom_name} from image {rec.short_id}; pause it when finished modifying "
                    f"(virt-manager, or: virsh -c {ctx.hv.uri} suspend {dom_name})"
                ),
            )
            paused_after = time.monotonic() - t0
            ctx.progress("VM entered paused state. Generating snapshot of disk and memory...")
            ctx.hv.save(dom, stage / "memory.save")
        finally:
            ctx.hv.destroy(dom)
        t1 = time.monotonic()
        qemu_img(["convert", "-O", "raw", str(overlay), str(stage / "disk.raw")])
        overlay.unlink()
        (stage / "serial.log").unlink(missing_ok=True)
        target_dir, meta = store_capture(ctx, rec, stage, name, args.get("title"), disk_only)
        encode_s = time.monotonic() - t1
    ctx.log.info("snapshot build %s from image %s -> %s", name, rec.content_id, meta["content_id"])
    out_summary = summary(target_dir, meta, ctx.store)
    return {**out_summary, "seconds": {"until_paused": round(paused_after, 2), "encode": round(encode_s, 2)}}


def store_capture(
    ctx: NodeContext, rec: ImageRecord, stage: Path, name: str, title: Any, disk_only: bool
) -> tuple[Path, dict[str, Any]]:
    """Turn `stage/disk.raw` + `stage/memory.save` (a captured VM) into a stored snapshot: one delta
    against the image `rec`, plus the save image's small parts. `stage` is renamed into the store."""
    ram = {} if disk_only else image_ram(ctx, rec)
    from nephele.delta import Target, encode_files  # numba: only paid by the ops that encode

    targets = [Target("disk", "disk", stage / "disk.raw", DISK_REF)]
    refs: dict[str, Path] = {DISK_REF: rec.disk}
    state_dir = stage / STATE_DIR
    state_dir.mkdir()
    ram_files: dict[str, str] = {}
    if not disk_only:
        parts = split_save_image(stage / "memory.save", state_dir)
        store_parts(parts, state_dir)
        for block, path in parts.ram.items():
            base = _mem_ref(block) if block in ram else None
            if base:
                refs[base] = ram[block]
            targets.append(Target(_mem_ref(block), "memory", path, base))
            ram_files[block] = path.name
    target_hashes = hash_files(stage, ["disk.raw"])
    for t in targets[1:]:
        target_hashes[t.name] = hash_files(t.path.parent, [t.path.name])[t.path.name]
    with open(stage / DELTA, "wb") as out:
        stats = encode_files(refs, targets, out)
        out.flush()
        os.fsync(out.fileno())
    # Only the delta and the small state parts stay; the full images are rebuilt on run.
    (stage / "disk.raw").unlink()
    (stage / "memory.save").unlink(missing_ok=True)
    for f in ram_files.values():
        (state_dir / f).unlink()
    cid = content_id({"image": rec.content_id, **{n: str(h["sha256"]) for n, h in target_hashes.items()}})
    meta = {
        "format": SNAPSHOT_FORMAT,
        "content_id": cid,
        "name": name,
        "title": title,
        "image": rec.content_id,
        "created": images.now_iso(),
        "disk_only": disk_only,
        "ram_files": ram_files,
        "targets": target_hashes,
        # What the delta was made against, so a node whose reference differs says so instead of
        # failing deep in the decoder (the image's disk is covered by its content id already).
        "refs": {rid: sha256_file(Path(path)) for rid, path in refs.items() if rid != DISK_REF},
        "files": hash_files(stage, [DELTA]),
        "stats": _stats(stats),
    }
    atomic_write_json(stage / "meta.json", meta)
    with ctx.store.lock("snapshot store"):
        target_dir = ctx.store.snapshots / cid
        if target_dir.exists():
            raise Conflict(f"an identical snapshot is already stored ({cid[:12]})")
        if any(m["name"] == name for _, m in list_snapshots(ctx.store)):
            raise Conflict(f"a snapshot named {name!r} already exists on this node")
        os.chmod(stage, 0o755)
        os.rename(stage, target_dir)
        fsync_dir(ctx.store.snapshots)
    return target_dir, meta


def next_name(store: Store, base: str) -> str:
    """NAME_1, NAME_2, ...: the first not taken (the original's increment_filename)."""
    taken = {m["name"] for _, m in list_snapshots(store)}
    n = 1
    while f"{base}_{n}" in taken:
        n += 1
    return f"{base}_{n}"


def _stats(stats: Any) -> dict[str, Any]:
    for attr in ("to_dict", "as_dict"):
        fn = getattr(stats, attr, None)
        if callable(fn):
            value = fn()
            if isinstance(value, dict):
                return value
    return {"repr": repr(stats)[:500]}


def qemu_img(argv: list[str]) -> None:
    proc = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise InvalidInput(f"qemu-img {argv[0]} failed: {proc.stderr.strip()}")


def _checked_image_ram(ctx: NodeContext, rec: ImageRecord, meta: dict[str, Any]) -> dict[str, Path]:
    """The image's flat RAM, checked against the hashes the snapshot recorded; a derived copy that
    differs is derived again once (it is a cache), then reported."""
    want = {k: v for k, v in (meta.get("refs") or {}).items() if k.startswith("mem:")}
    for attempt in (1, 2):
        ram = image_ram(ctx, rec)
        bad = [rid for rid, h in want.items() if rid[4:] not in ram or sha256_file(ram[rid[4:]]) != h]
        if not bad:
            return ram
        ctx.log.warning("image %s: derived RAM %s differs from snapshot %s's (attempt %d)",
                        rec.short_id, bad, meta["name"], attempt)  # fmt: skip
        if attempt == 1:
            with ctx.store.lock("image ram"):
                shutil.rmtree(rec.path / RAM_DIR, ignore_errors=True)
    raise NodeError(
        f"snapshot {meta['name']} was made against different memory ({', '.join(bad)}) than image "
        f"{rec.short_id} yields on this node; rebuild or re-import the snapshot"
    )


def materialise(ctx: NodeContext, snap_dir: Path, meta: dict[str, Any], out_dir: Path, xml_for: Any) -> Path:
    """Rebuild a snapshot into `out_dir`: disk.raw and, unless disk-only, a save image whose domain XML is
    `xml_for(saved_xml)`. Returns the save image path (or the disk for disk-only snapshots)."""
    rec = images.resolve(ctx.store, meta["image"])
    refs: dict[str, Path] = {DISK_REF: rec.disk}
    outputs: dict[str, Path] = {"disk": out_dir / "disk.raw"}
    ram_dir = out_dir / "ram"
    if not meta.get("disk_only"):
        for block, path in _checked_image_ram(ctx, rec, meta).items():
            refs[_mem_ref(block)] = path
        shutil.copytree(snap_dir / STATE_DIR, ram_dir)
        for block, fname in meta["ram_files"].items():
            outputs[_mem_ref(block)] = ram_dir / fname
    try:
        with open(snap_dir / DELTA, "rb") as inp:
            from nephele.delta import decode_files  # numba: only paid by the ops that decode

            decode_files(inp, refs, outputs)
    except DeltaError as exc:
        raise NodeError(
            f"snapshot {meta['name']} does not rebuild against image {rec.short_id} on this node: {exc}"
        ) from None
    if meta.get("disk_only"):
        return out_dir / "disk.raw"
    parts = load_parts(ram_dir)
    save = out_dir / "memory.restore"
    rebuild_save_image(ram_dir, save, xml=xml_for(parts.header.xml))
    shutil.rmtree(ram_dir)
    return save


EXPORT_META = "nephele-snapshot.json"


def export(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    """One zip: the snapshot's meta, its delta and its state parts (the delta is compressed already)."""
    path, meta = resolve(ctx.store, str(args.get("name") or args.get("path") or ""))
    dest_arg = args.get("dest")
    if not isinstance(dest_arg, str) or not dest_arg:
        raise InvalidInput("snapshot export: no destination FILE given")
    dest = Path(dest_arg).expanduser()
    if dest.is_dir():
        dest = dest / f"{meta['name']}.zip"
    if not dest.parent.is_dir():
        raise InvalidInput(f"snapshot export: {dest.parent}: no such directory")
    tmp = dest.parent / f".{dest.name}.{uuidlib.uuid4().hex[:8]}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(EXPORT_META, json.dumps(meta, indent=2, sort_keys=True))
            zf.write(path / DELTA, DELTA)
            for f in sorted((path / STATE_DIR).iterdir()):
                zf.write(f, f"{STATE_DIR}/{f.name}")
        images.atomic_rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {**summary(path, meta, ctx.store), "file": str(dest), "file_bytes": dest.stat().st_size}


def import_(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return _import(ctx, args)
    finally:
        images.discard_upload(ctx, args)


def _import(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    zf, raw, src = images.open_export(args, "snapshot")
    with zf, ctx.store.staging("snapimport") as stage:
        try:
            meta = json.loads(zf.read(EXPORT_META))
            names = zf.namelist()
        except (KeyError, ValueError, *images.ZIP_ERRORS) as exc:
            raise InvalidInput(f"snapshot import: {raw}: not a nephele snapshot export ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
            raise InvalidInput(f"snapshot import: {raw}: unsupported snapshot format")
        _check_meta(meta, raw)
        try:
            images.resolve(ctx.store, str(meta["image"]))
        except NotFound:
            raise NotFound(
                f"snapshot import: {raw}: its image {str(meta['image'])[:12]} is not on this node; "
                "import the image first"
            ) from None
        members = [n for n in names if n != EXPORT_META]
        for name in members:
            # delta.nvd, or a plain file name under state/ ("state/", "state/..": refused, not written)
            if name != DELTA and not (
                name.startswith(f"{STATE_DIR}/") and _plain_name(name[len(STATE_DIR) + 1 :])
            ):
                raise InvalidInput(f"snapshot import: {raw}: unexpected member {name!r}")
        space.require(
            stage,
            images.member_bytes(zf, members),
            what=f"snapshot import {raw}",
            node=ctx.hostname,
            detail=f"for {len(members)} files",
        )
        for name in members:
            try:
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as fin, open(stage / name, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 1 << 20)
            except images.ZIP_ERRORS as exc:
                raise InvalidInput(f"snapshot import: {raw}: {name} is corrupt ({exc})") from None
        want = str(meta["files"][DELTA]["sha256"])
        got = hash_files(stage, [DELTA])[DELTA]["sha256"] if (stage / DELTA).is_file() else "missing"
        if got != want:
            raise InvalidInput(
                f"snapshot import: {raw}: {DELTA} is corrupt "
                f"(sha256 {str(got)[:12]}..., expected {want[:12]}...)"
            )
        if args.get("name"):
            meta["name"] = str(args["name"])  # the manifest's name for it on this node
        atomic_write_json(stage / "meta.json", meta)
        with ctx.store.lock("snapshot import"):
            if any(m["name"] == meta["name"] for _, m in list_snapshots(ctx.store)):
                raise Conflict(f"a snapshot named {meta['name']!r} already exists on this node")
            target = ctx.store.snapshots / str(meta["content_id"])
            os.chmod(stage, 0o755)
            os.rename(stage, target)
            fsync_dir(ctx.store.snapshots)
    ctx.log.info("snapshot import %s -> %s", src, meta["content_id"])
    return summary(target, meta, ctx.store)


def _plain_name(value: Any) -> bool:
    return (
        isinstance(value, str) and bool(value) and "/" not in value and "\0" not in value and value[0] != "."
    )


def _check_meta(meta: dict[str, Any], raw: str) -> None:
    """An imported snapshot's meta.json is used as paths and numbers later (its content id names its
    directory, ram_files name files under an instance's directory): check every field that is, so a
    crafted export is refused here instead of writing outside the store or failing on the first run."""

    def bad(what: str) -> InvalidInput:
        return InvalidInput(f"snapshot import: {raw}: {EXPORT_META}: {what}")

    cid = meta.get("content_id")
    if not isinstance(cid, str) or len(cid) != 64 or any(c not in "0123456789abcdef" for c in cid):
        raise bad(f"content_id {cid!r} is not a sha256 hex digest")
    if not isinstance(meta.get("image"), str) or not meta["image"]:
        raise bad("no image content id")
    if not _plain_name(meta.get("name")):
        raise bad(f"name {meta.get('name')!r} is not a usable snapshot name")
    delta = (meta.get("files") or {}).get(DELTA) if isinstance(meta.get("files"), dict) else None
    if not isinstance(delta, dict) or not isinstance(delta.get("sha256"), str):
        raise bad(f"no sha256 of {DELTA}")
    if not isinstance(delta.get("size"), int) or isinstance(delta.get("size"), bool) or delta["size"] < 0:
        raise bad(f"no size of {DELTA}")
    ram = meta.get("ram_files", {})
    if not isinstance(ram, dict) or not all(isinstance(k, str) and _plain_name(v) for k, v in ram.items()):
        raise bad("ram_files must map RAM blocks to plain file names")
    for key in ("targets", "refs"):
        if not isinstance(meta.get(key, {}), dict):
            raise bad(f"{key} is not a mapping")


def ls(ctx: NodeContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [summary(p, m, ctx.store) for p, m in list_snapshots(ctx.store)]


def rm(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    with ctx.store.lock("snapshot rm"):
        path, meta = resolve(ctx.store, str(args.get("path") or args.get("name") or ""))
        out = summary(path, meta, ctx.store)
        doomed = ctx.store.tmp / f"rm-{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.rename(path, doomed)
        fsync_dir(ctx.store.snapshots)
        shutil.rmtree(doomed, ignore_errors=True)
    ctx.log.info("snapshot rm %s (%s)", meta["name"], meta["content_id"])
    return {**out, "removed": True}
