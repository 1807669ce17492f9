"""Fuzz the node's import of export files (image.import, snapshot.import): what a node reads from a
file another node (or anyone) produced. Mutations: the export's JSON metadata edited field by field
(keys dropped, values of the wrong type, paths), members added or renamed, and the zip's bytes flipped or
truncated.

What must hold: the import works or raises a NodeError (invalid_input, not_found, conflict, no_space)
with a message; afterwards tmp/ holds no staging directory and no upload, a refused import changed
nothing in the store, and nothing was written outside the node root.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from hypothesis import event, given
from hypothesis import strategies as st

from nephele.errors import NodeError
from nephele.node import images, snapshots
from nephele.node.runtime import NodeContext
from tests.fuzz.budget import fuzz, no_hang
from tests.node.test_space import image_export, snapshot_export

DISK, MEMORY, DELTA = b"D" * 8192, b"M" * 4096, b"delta bytes" * 100

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.text(max_size=10)
    | st.sampled_from(["", "../x", "/etc/passwd", ".hidden", "a/b", "0" * 64, "disk.raw", "delta.nvd"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _edit_json(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """One edit somewhere in a JSON tree: drop a key, replace a value, or descend."""
    if isinstance(value, dict) and value and depth < 3:
        key = draw(st.sampled_from(sorted(value)))
        op = draw(st.sampled_from(["drop", "replace", "descend", "descend", "add"]))
        out = dict(value)
        if op == "drop":
            del out[key]
        elif op == "replace":
            out[key] = draw(json_values)
        elif op == "add":
            out[draw(st.text(max_size=8) | st.sampled_from(["size", "sha256", "name", "../x"]))] = draw(
                json_values
            )
        else:
            out[key] = _edit_json(draw, value[key], depth + 1)
        return out
    return draw(json_values)


def _rewrite(src: Path, dst: Path, draw: st.DrawFn, meta_name: str) -> None:
    """Copy an export with its metadata edited and members renamed, dropped or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            name = item.filename
            if name == meta_name and draw(st.integers(0, 3)) < 3:
                meta = json.loads(data)
                for _ in range(draw(st.integers(1, 3))):
                    meta = _edit_json(draw, meta)
                data = json.dumps(meta).encode()
            elif draw(st.integers(0, 9)) == 9:
                op = draw(st.sampled_from(["drop", "rename", "truncate"]))
                if op == "drop":
                    continue
                if op == "rename":
                    name = draw(
                        st.sampled_from(["../evil", "state/../x", "/abs", "state/", "x", "state/a/b"])
                    )
                else:
                    data = data[: len(data) // 2]
            zout.writestr(name, data)
        if draw(st.integers(0, 9)) == 9:
            zout.writestr(draw(st.sampled_from(["extra", "state/extra", "../up"])), b"x")


def _bytes_mutation(path: Path, draw: st.DrawFn) -> None:
    buf = bytearray(path.read_bytes())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(buf) - 1))
        if draw(st.booleans()):
            buf[i] ^= 1 << draw(st.integers(0, 7))
        else:
            del buf[i:]
            break
    path.write_bytes(bytes(buf))


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def _check(ctx: NodeContext, sandbox: Path, op: Any, upload: Path, store_dir: Path) -> None:
    before_store = _tree(store_dir)
    before = _tree(sandbox) - {str(upload.relative_to(sandbox))}
    try:
        with no_hang():
            op(ctx, {"path": str(upload)})
        event("imported")
    except NodeError as exc:
        event(f"refused: {exc.kind}")
        assert str(exc) and exc.kind in ("invalid_input", "not_found", "conflict", "no_space"), exc
        assert _tree(store_dir) == before_store, "a refused import changed the store"
    after = _tree(sandbox)
    new = {p for p in after - before if not p.startswith(("root/images/", "root/snapshots/"))}
    assert new <= {"root/nephele.log", "root/.lock"}, new
    assert list(ctx.store.tmp.iterdir()) == [], "staging or the upload left in tmp/"


@fuzz(120)
@given(data=st.data())
def test_image_import(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-import-") as d:
        sandbox = Path(d)
        ctx = NodeContext(sandbox / "root")
        try:
            good = sandbox / "good.zip"
            image_export(good, DISK, MEMORY)
            upload = ctx.store.tmp / "nephele-image-tiny-1.zip"
            _rewrite(good, upload, data.draw, images.EXPORT_META)
            if data.draw(st.integers(0, 3)) == 3:
                _bytes_mutation(upload, data.draw)
            good.unlink()
            _check(ctx, sandbox, images.import_, upload, ctx.store.images)
        finally:
            ctx.close()


@fuzz(120)
@given(data=st.data())
def test_snapshot_import(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory(prefix="nephele-fuzz-import-") as d:
        sandbox = Path(d)
        ctx = NodeContext(sandbox / "root")
        try:
            img = ctx.store.tmp / "nephele-image-tiny-1.zip"
            cid = image_export(img, DISK, MEMORY)
            images.import_(ctx, {"path": str(img)})
            good = sandbox / "good.zip"
            snapshot_export(good, cid, DELTA)
            upload = ctx.store.tmp / "nephele-snapshot-web-1.zip"
            _rewrite(good, upload, data.draw, snapshots.EXPORT_META)
            if data.draw(st.integers(0, 3)) == 3:
                _bytes_mutation(upload, data.draw)
            good.unlink()
            _check(ctx, sandbox, snapshots.import_, upload, ctx.store.snapshots)
            for _path, meta in snapshots.list_snapshots(ctx.store):
                # what was accepted can be listed (its summary reads the fields the import checked)
                snapshots.summary(_path, meta, ctx.store)
        finally:
            ctx.close()


def test_snapshot_member_named_like_the_state_directory(tmp_path: Path) -> None:
    """Found by `make fuzz`: an export with a member "state/" (written as a file named state) and then
    "state/domain.xml" escaped snapshot import as FileExistsError (an `internal` answer)."""
    ctx = NodeContext(tmp_path / "root")
    try:
        img = ctx.store.tmp / "nephele-image-tiny-1.zip"
        cid = image_export(img, DISK, MEMORY)
        images.import_(ctx, {"path": str(img)})
        good, bad = tmp_path / "good.zip", tmp_path / "bad.zip"
        snapshot_export(good, cid, DELTA)
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
            for item in zin.infolist():
                name = "state/" if item.filename == snapshots.DELTA else item.filename
                zout.writestr(name, zin.read(item.filename))
        try:
            snapshots.import_(ctx, {"path": str(bad)})
        except NodeError as exc:
            assert exc.kind == "invalid_input" and "unexpected member 'state/'" in str(exc), exc
        else:
            raise AssertionError("accepted")
        assert list(ctx.store.tmp.iterdir()) == [] and snapshots.ls(ctx, {}) == []
    finally:
        ctx.close()


def test_zip_needing_an_unknown_version_is_invalid_input(tmp_path: Path) -> None:
    """Found by `make fuzz`: a flipped "version needed to extract" in the zip's central directory made
    zipfile raise NotImplementedError ("zip file version 8.4") out of the import."""
    ctx = NodeContext(tmp_path / "root")
    try:
        path = tmp_path / "x.zip"
        image_export(path, DISK, MEMORY)
        raw = bytearray(path.read_bytes())
        raw[raw.find(b"PK\x01\x02") + 6] = 84
        path.write_bytes(bytes(raw))
        try:
            images.import_(ctx, {"path": str(path)})
        except NodeError as exc:
            assert exc.kind == "invalid_input" and "zip file version" in str(exc), exc
        else:
            raise AssertionError("accepted")
    finally:
        ctx.close()


def test_zip_member_flagged_encrypted_is_invalid_input(tmp_path: Path) -> None:
    """Found by `make fuzz`: the encryption bit set on a member made zipfile raise RuntimeError
    ("password required for extraction") out of the import."""
    ctx = NodeContext(tmp_path / "root")
    try:
        path = tmp_path / "x.zip"
        image_export(path, DISK, MEMORY)
        raw = bytearray(path.read_bytes())
        central = raw.find(b"PK\x01\x02")  # the first member's directory entry: nephele-image.json
        raw[central + 8] |= 1
        path.write_bytes(bytes(raw))
        try:
            images.import_(ctx, {"path": str(path)})
        except NodeError as exc:
            assert exc.kind == "invalid_input" and "password" in str(exc), exc
        else:
            raise AssertionError("accepted")
        assert list(ctx.store.tmp.iterdir()) == []
    finally:
        ctx.close()
