"""What a destination already holds, as delta-engine reference images.

For the instance's base image: its disk (``disk``), and the flat RAM of each RAM block of the memory
state it was captured with (``mem:<block>``, extracted from the libvirt save image). Both nodes derive
them from the same image files, so the reference digests match; the block indexes (``.nxi``) are built
once and cached. Kept in ``<root>/cache/handoff/<image content id>/`` (the image directory stays as the
image store wrote it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from nephele.delta import BlockIndex
from nephele.errors import NepheleError
from nephele.handoff.memory import mem_ref_id
from nephele.node.store import ImageRecord, Store
from nephele.vmstate import extract_ram

DONE = "refs.json"


def cache_dir(store: Store, image: ImageRecord) -> Path:
    return store.root / "cache" / "handoff" / image.content_id


def prepare(store: Store, image: ImageRecord) -> dict[str, Path]:
    """Reference id -> path, building what is missing (RAM extraction, block indexes)."""
    d = cache_dir(store, image)
    done = d / DONE
    if done.is_file():
        with contextlib.suppress(ValueError, OSError, KeyError):
            cached = {k: Path(v) for k, v in json.loads(done.read_text())["refs"].items()}
            if all(p.exists() for p in cached.values()):
                return cached
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)
    refs: dict[str, Path] = {}
    if image.disk.is_file():
        link = d / "disk.raw"
        os.symlink(image.disk, link)  # the index goes beside the link, in this cache
        refs["disk"] = link
    if image.memory.is_file():
        ram_dir = d / "ram"
        try:
            ram = extract_ram(image.memory, ram_dir)
        except NepheleError:
            ram = {}  # an unreadable memory state: hand off without memory references
        for block, path in ram.items():
            refs[mem_ref_id(block)] = path
    for path in refs.values():
        BlockIndex.load_or_build(path)
    tmp = d / (DONE + ".tmp")
    tmp.write_text(json.dumps({"refs": {k: str(v) for k, v in refs.items()}}))
    os.replace(tmp, done)
    return refs
