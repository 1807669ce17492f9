"""Images: a disk plus the memory state captured when the user paused the VM, and their metadata.

An image lives in `<root>/images/<content id>/`: disk.raw, memory.save (a libvirt save image),
kernel/initrd when the guest boots directly, meta.json. Its content id is the sha256 over its files'
hashes (store.content_id); the ID users see is its first 12 hex digits.

What `image build PATH` boots (decided here, documented in docs/agent-protocol.md):
  * a disk image (raw, qcow2, anything qemu-img reads) that boots by itself, or
  * a descriptor, `*.json` or `*.nvm`: {"disk": ..., "kernel": ..., "initrd": ..., "cmdline": ...,
    "cpus": 1, "memory_kib": 262144, "name": ...}, relative paths against the descriptor's directory;
  * or a disk with `kernel`/`initrd`/`cmdline` given as request args (client flags).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import time
import uuid as uuidlib
import zipfile
import zlib
from pathlib import Path
from typing import Any

from nephele.errors import Conflict, InvalidInput, NodeError, NotFound
from nephele.node import domain as dx
from nephele.node import space
from nephele.node.runtime import NodeContext
from nephele.node.store import IMAGE_FORMAT, ImageRecord, Store, content_id, fsync_dir, hash_files

DEFAULT_MEMORY_KIB = 256 * 1024
DEFAULT_CPUS = 1
EXPORT_META = "nephele-image.json"
DESCRIPTOR_SUFFIXES = (".json", ".nvm")
COPY_CHUNK = 1 << 20
# What reading a damaged zip raises: a bad header or CRC, a bad deflate/LZMA stream (bzip2's is an
# OSError), a member cut short, a compression method or version zipfile does not know, the encryption
# flag set (RuntimeError: "password required"), a truncated header field, a read error.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    lzma.LZMAError,
    struct.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    OSError,
)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summary(rec: ImageRecord) -> dict[str, Any]:
    return {
        "id": rec.short_id,
        "content_id": rec.content_id,
        "name": rec.name,
        "source": rec.source,
        "created": rec.meta.get("created"),
        "disk_bytes": rec.size_of("disk.raw"),
        "memory_bytes": rec.size_of("memory.save"),
        "path": str(rec.path),
    }


def resolve(store: Store, ref: str) -> ImageRecord:
    """An image by content id, ID prefix (at least 4 hex digits) or name."""
    if not ref:
        raise InvalidInput("no image given")
    images = store.list_images()
    exact = [r for r in images if r.content_id == ref]
    if exact:
        return exact[0]
    by_id = [r for r in images if len(ref) >= 4 and r.content_id.startswith(ref.lower())]
    by_name = [r for r in images if r.name == ref]
    found = by_id or by_name
    if not found:
        raise NotFound(f"no image {ref!r} on this node (`images` lists them)")
    if len(found) > 1:
        ids = ", ".join(r.short_id for r in found)
        raise Conflict(f"image {ref!r} is ambiguous: it matches {ids}; give more of the ID")
    return found[0]


# -------------------------------------------------------------------------------------------- ls


def ls(ctx: NodeContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    return [summary(r) for r in ctx.store.list_images()]


# ----------------------------------------------------------------------------------------- build


def _source_spec(args: dict[str, Any]) -> dict[str, Any]:
    raw = args.get("path")
    if not isinstance(raw, str) or not raw:
        raise InvalidInput("image build: no PATH given")
    path = Path(raw).expanduser()
    if not path.is_file():
        raise InvalidInput(f"image build: {raw}: no such file")
    spec: dict[str, Any] = {"source": str(path.resolve()), "disk": path}
    if path.suffix in DESCRIPTOR_SUFFIXES:
        try:
            desc = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"image build: {raw}: not a JSON descriptor ({exc})") from None
        if not isinstance(desc, dict) or not isinstance(desc.get("disk"), str):
            raise InvalidInput(f'image build: {raw}: a descriptor needs a "disk" path')
        base = path.resolve().parent
        for key in ("disk", "kernel", "initrd"):
            if isinstance(desc.get(key), str):
                spec[key] = base / desc[key]
        for key in ("cmdline", "cpus", "memory_kib", "name"):
            if key in desc:
                spec[key] = desc[key]
    for key in ("kernel", "initrd"):
        if args.get(key):
            spec[key] = Path(str(args[key])).expanduser()
    for key, arg in (
        ("cmdline", "cmdline"),
        ("cpus", "cpus"),
        ("memory_kib", "memory_kib"),
        ("name", "title"),
    ):
        if args.get(arg) is not None:
            spec[key] = args[arg]
    for key in ("disk", "kernel", "initrd"):
        if key in spec and not Path(spec[key]).is_file():
            raise InvalidInput(f"image build: {key} {spec[key]}: no such file")
    if "initrd" in spec and "kernel" not in spec:
        raise InvalidInput("image build: an initrd needs a kernel")
    try:
        spec["cpus"] = int(spec.get("cpus") or DEFAULT_CPUS)
        spec["memory_kib"] = int(spec.get("memory_kib") or DEFAULT_MEMORY_KIB)
    except (TypeError, ValueError):
        raise InvalidInput("image build: cpus and memory must be whole numbers") from None
    if spec["cpus"] < 1 or spec["memory_kib"] < 16 * 1024:
        raise InvalidInput("image build: need at least 1 CPU and 16 MiB (16384 KiB) of memory")
    return spec


def _convert_disk(src: Path, dest: Path) -> None:
    proc = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(src), str(dest)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise InvalidInput(f"image build: {src}: qemu-img cannot read it: {proc.stderr.strip()}")


def build(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    spec = _source_spec(args)
    timeout = args.get("timeout")
    name = str(spec.get("name") or Path(spec["source"]).stem)
    with ctx.store.staging("build") as stage:
        ctx.progress(f"Copying/converting source image into {ctx.store.images}...")
        _convert_disk(Path(spec["disk"]), stage / "disk.raw")
        files = ["disk.raw", "memory.save"]
        boot = dx.Boot(cmdline=str(spec.get("cmdline") or ""))
        if "kernel" in spec:
            shutil.copyfile(spec["kernel"], stage / "kernel")
            files.append("kernel")
            if "initrd" in spec:
                shutil.copyfile(spec["initrd"], stage / "initrd")
                files.append("initrd")
            boot = dx.Boot(
                str(stage / "kernel"), str(stage / "initrd") if "initrd" in spec else None, boot.cmdline
            )
        dom_type = ctx.hv.domain_type(ctx.store.root, kernel=boot.kernel, initrd=boot.initrd)
        dom_uuid = str(uuidlib.uuid4())
        dom_name = f"nephele-build-{dom_uuid[:8]}"
        xml = dx.build_xml(
            dx.DomainSpec(
                name=dom_name,
                uuid=dom_uuid,
                title=str(args.get("title") or name),
                disk=str(stage / "disk.raw"),
                disk_format="raw",
                serial_log=str(stage / "serial.log"),
                memory_kib=spec["memory_kib"],
                cpus=spec["cpus"],
                boot=boot,
                domain_type=dom_type,
                tags={"role": "build", "source": spec["source"], "name": name},
            )
        )
        t0 = time.monotonic()
        dom = ctx.hv.create(xml, f"the build VM for {spec['source']}")
        try:
            ctx.hv.wait_paused(
                dom,
                timeout=float(timeout) if timeout is not None else None,
                on_ready=lambda: ctx.progress(
                    f"Launched VM {dom_name} ({'TCG' if dom_type == 'qemu' else dom_type}); pause it when "
                    f"ready to capture (virt-manager, or: virsh -c {ctx.hv.uri} suspend {dom_name})"
                ),
            )
            paused_after = time.monotonic() - t0
            ctx.progress("VM entered paused state. Saving memory and disk...")
            t1 = time.monotonic()
            ctx.hv.save(dom, stage / "memory.save")
            save_s = time.monotonic() - t1
        finally:
            ctx.hv.destroy(dom)
        t2 = time.monotonic()
        hashes = hash_files(stage, files)
        cid = content_id({n: h["sha256"] for n, h in hashes.items()})
        meta = {
            "format": IMAGE_FORMAT,
            "content_id": cid,
            "name": name,
            "title": args.get("title"),
            "source": spec["source"],
            "created": now_iso(),
            "cpus": spec["cpus"],
            "memory_kib": spec["memory_kib"],
            "domain_type": dom_type,
            "boot": {
                "kernel": "kernel" if "kernel" in files else None,
                "initrd": "initrd" if "initrd" in files else None,
                "cmdline": boot.cmdline,
            },
            "files": hashes,
        }
        (stage / "serial.log").unlink(missing_ok=True)
        with ctx.store.lock("image build"):
            rec, created = ctx.store.commit_image(stage, meta)
        hash_s = time.monotonic() - t2
    ctx.log.info(
        "image build %s -> %s (%s)", spec["source"], rec.content_id, "new" if created else "existing"
    )
    return {
        **summary(rec),
        "created_new": created,
        "seconds": {
            "until_paused": round(paused_after, 2),
            "save": round(save_s, 2),
            "hash": round(hash_s, 2),
        },
    }


# ---------------------------------------------------------------------------------- export/import


def export(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    rec = resolve(ctx.store, str(args.get("id") or ""))
    dest_arg = args.get("dest")
    if not isinstance(dest_arg, str) or not dest_arg:
        raise InvalidInput("image export: no destination FILE given")
    dest = Path(dest_arg).expanduser()
    if dest.is_dir():
        dest = dest / f"{rec.name}-{rec.short_id}.zip"
    if not dest.parent.is_dir():
        raise InvalidInput(f"image export: {dest.parent}: no such directory")
    tmp = dest.parent / f".{dest.name}.{uuidlib.uuid4().hex[:8]}.tmp"
    try:
        # Deflate level 1: the disk is mostly zeros, the memory mostly incompressible; speed wins.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            zf.writestr(EXPORT_META, json.dumps(dict(rec.meta), indent=2, sort_keys=True))
            for name in sorted(rec.file_hashes()):
                zf.write(rec.path / name, name)
        atomic_rename(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    ctx.log.info("image export %s -> %s", rec.content_id, dest)
    return {**summary(rec), "file": str(dest), "file_bytes": dest.stat().st_size}


def atomic_rename(tmp: Path, dest: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    fsync_dir(dest.parent)


def open_export(args: dict[str, Any], what: str) -> tuple[zipfile.ZipFile, str, Path]:
    """The export zip named by the `path` argument of an `image import` / `snapshot import` request."""
    raw = args.get("path")
    if not isinstance(raw, str) or not raw:
        raise InvalidInput(f"{what} import: no FILE given")
    src = Path(raw).expanduser()
    if not src.is_file():
        raise InvalidInput(f"{what} import: {raw}: no such file")
    try:
        return zipfile.ZipFile(src), raw, src
    except (ValueError, *ZIP_ERRORS) as exc:  # a damaged directory: "zip file version 8.4", bad offsets
        raise InvalidInput(f"{what} import: {raw}: not a nephele {what} export ({exc})") from None


def discard_upload(ctx: NodeContext, args: dict[str, Any]) -> None:
    """Remove the export an import read when it is a copy uploaded into the node's tmp/ (the controller
    puts them at tmp/nephele-*.zip), whether the import worked or not: tmp/ is scratch, and a disk left
    full of spent uploads fails the next copy. A file anywhere else is the user's and stays."""
    raw = args.get("path")
    if not isinstance(raw, str) or not raw or "\0" in raw:
        return
    path = Path(raw).expanduser()
    try:
        in_tmp = path.parent.resolve() == ctx.store.tmp.resolve()
        if in_tmp and path.name.startswith("nephele-") and path.is_file() and not path.is_symlink():
            path.unlink()
            ctx.log.info("removed the uploaded export %s", path)
    except OSError as exc:
        ctx.log.warning("cannot remove the uploaded export %s: %s", path, exc)


def member_bytes(zf: zipfile.ZipFile, names: list[str]) -> int:
    """What extracting `names` writes: the sizes the zip records (zipfile never extracts more than a
    member's recorded size, so a lying archive fails its check instead of filling the disk)."""
    total = 0
    for name in names:
        with contextlib.suppress(KeyError):  # a missing member is reported by the extraction
            total += zf.getinfo(name).file_size
    return total


def import_(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return _import(ctx, args)
    finally:
        discard_upload(ctx, args)


def _import(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    zf, raw, src = open_export(args, "image")
    with zf, ctx.store.staging("import") as stage:
        meta = _read_export_meta(zf, raw)
        expected = {n: str(v["sha256"]) for n, v in meta["files"].items()}
        space.require(
            stage,
            member_bytes(zf, sorted(expected)),
            what=f"image import {raw}",
            node=ctx.hostname,
            detail=f"for {len(expected)} files",
        )
        ctx.progress(f"Decompressing image to {ctx.store.images}...")
        for name, want in sorted(expected.items()):
            got = _extract_checked(zf, name, stage / name, raw)
            if got != want:
                raise InvalidInput(
                    f"image import: {raw}: {name} is corrupt (sha256 {got[:12]}..., expected {want[:12]}...)"
                )
        cid = content_id(expected)
        if cid != meta["content_id"]:
            raise InvalidInput(
                f"image import: {raw}: content id {meta['content_id'][:12]} "
                f"does not match its files ({cid[:12]})"
            )
        new_meta = dict(meta)
        new_meta["files"] = hash_files(stage, sorted(expected))
        if args.get("name"):
            new_meta["name"] = str(args["name"])
        new_meta["imported"] = {"from": str(src.resolve()), "at": now_iso()}
        with ctx.store.lock("image import"):
            rec, created = ctx.store.commit_image(stage, new_meta)
    ctx.log.info("image import %s -> %s (%s)", src, rec.content_id, "new" if created else "existing")
    return {**summary(rec), "created_new": created}


def _read_export_meta(zf: zipfile.ZipFile, raw: str) -> dict[str, Any]:
    try:
        meta = json.loads(zf.read(EXPORT_META))
    except KeyError:
        raise InvalidInput(
            f"image import: {raw}: no {EXPORT_META} inside; not a nephele image export"
        ) from None
    except (ValueError, *ZIP_ERRORS) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise InvalidInput(f"image import: {raw}: unreadable {EXPORT_META} ({exc})") from None
    if not isinstance(meta, dict):
        raise InvalidInput(f"image import: {raw}: {EXPORT_META} is not a JSON object")
    if meta.get("format") != IMAGE_FORMAT:
        raise InvalidInput(f"image import: {raw}: unsupported image format {meta.get('format')!r}")
    files = meta.get("files")
    if not isinstance(files, dict) or not {"disk.raw", "memory.save"} <= set(files):
        raise InvalidInput(f"image import: {raw}: the export lists no disk.raw and memory.save")
    for name, info in files.items():
        if "/" in name or name.startswith(".") or not isinstance(info, dict) or "sha256" not in info:
            raise InvalidInput(f"image import: {raw}: bad file entry {name!r}")
    if not isinstance(meta.get("content_id"), str):
        raise InvalidInput(f"image import: {raw}: no content id")
    return meta


def _extract_checked(zf: zipfile.ZipFile, name: str, dest: Path, raw: str) -> str:
    h = hashlib.sha256()
    try:
        with zf.open(name) as src, open(dest, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except KeyError:
        raise InvalidInput(f"image import: {raw}: {name} is missing from the export") from None
    except ZIP_ERRORS as exc:
        raise InvalidInput(f"image import: {raw}: {name} is corrupt ({exc})") from None
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- rm


def rm(ctx: NodeContext, args: dict[str, Any]) -> dict[str, Any]:
    with ctx.store.lock("image rm"):
        rec = resolve(ctx.store, str(args.get("id") or ""))
        users = [d for d in ctx.hv.nephele_domains(role="instance") if d.tags.get("image") == rec.content_id]
        if users:
            names = ", ".join(f"{d.tags.get('title')} ({d.uuid})" for d in users)
            raise Conflict(f"image {rec.short_id} is in use by instances {names}; remove them first")
        deps = snapshot_dependents(ctx.store, rec.content_id)
        warnings = []
        if deps:
            msg = f"snapshots depending on image {rec.short_id} become unusable: {', '.join(deps)}"
            if not args.get("force"):
                raise Conflict(msg + " (use -f to remove it anyway)")
            warnings.append(msg)
        ctx.store.remove_image(rec)
    ctx.log.info("image rm %s", rec.content_id)
    return {**summary(rec), "removed": True, "warnings": warnings}


def snapshot_dependents(store: Store, image_cid: str) -> list[str]:
    out = []
    if store.snapshots.is_dir():
        for p in sorted(store.snapshots.iterdir()):
            with contextlib.suppress(OSError, ValueError, NodeError):
                meta = json.loads((p / "meta.json").read_text())
                if meta.get("image") == image_cid:
                    out.append(str(meta.get("name") or p.name))
    return out
