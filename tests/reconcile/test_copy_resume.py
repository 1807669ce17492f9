"""Resumable copies (reconcile/transfer.py, issue 9): the resume decision through the transport seam,
and applies whose copies are cut off mid-transfer, retried, and completed by sending only the rest.

The nodes are real node stores (NodeContext) reached in-process through a FakeTransport that runs the
node's ops (copy.partial, image.export_delta, image.import ...) on them; a cut link is a transfer that
writes part of the file and then raises NodeUnreachable, as SSHTransport does when a transfer stalls.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import zipfile
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from nephele import manifest
from nephele.agent import protocol
from nephele.agent.transport import FakeTransport
from nephele.errors import AgentError, NepheleError, NodeUnreachable
from nephele.node import copies, images, ops
from nephele.node.runtime import NodeContext
from nephele.node.store import IMAGE_FORMAT, content_id
from nephele.reconcile import transfer
from nephele.reconcile.execute import ApplyOptions, apply
from nephele.reconcile.inventory import InventoryStore
from nephele.reconcile.observe import TransportPool, observe
from nephele.reconcile.plan import plan

MiB = 1 << 20


# ------------------------------------------------------------------------------------- the nodes


class Node(FakeTransport):
    """A node store reached in-process. `cut_after`: the next transfers (one entry each) write that
    many bytes and then fail as a cut link; `moved` counts every byte a transfer wrote."""

    def __init__(self, name: str, root: Path, *, old: bool = False) -> None:
        super().__init__(self.handle, name)
        self.root = root
        self.old = old  # an older nephele: no copy.partial
        self.cut_after: list[int] = []
        self.moved = 0
        self.caps: list[float | None] = []  # the rate cap of every offset transfer
        with closing(NodeContext(root)):
            pass

    def handle(self, req: protocol.Request) -> protocol.Response:
        op, args = req["op"], dict(req["args"])
        if op == "observe":
            with closing(NodeContext(self.root)) as ctx:
                imgs = {r.name: {"content_id": r.content_id} for r in ctx.store.list_images()}
            return protocol.ok_response(
                req["id"], {"reachable": True, "images": imgs, "snapshots": {}, "instances": {}}
            )
        fn = ops.OPS.get(op)
        if fn is None or (self.old and op == "copy.partial") or op == "handoff.warm":
            return protocol.error_response(req["id"], "unsupported", f"unknown op {op!r}")
        with closing(NodeContext(self.root)) as ctx:
            try:
                return protocol.ok_response(req["id"], fn(ctx, args))
            except NepheleError as exc:
                return protocol.error_response_for(req["id"], exc)

    def _at(self, src: str | Path, dst: str | Path, offset: int) -> int:
        if not self.cut_after:
            n = transfer_all(src, dst, offset)
            self.moved += n
            return n
        limit = self.cut_after.pop(0)
        with open(src, "rb") as fin, open(dst, "r+b" if offset else "wb") as fout:
            fin.seek(offset)
            fout.seek(offset)
            fout.truncate()
            fout.write(fin.read(limit))
            self.moved += min(limit, os.path.getsize(src) - offset)
        raise NodeUnreachable("copy broke off: timeout (link cut in the test)", node=self.node)

    def put_file_at(
        self, local: str | Path, remote: str, offset: int, *, rate_mbit: float | None = None
    ) -> int:
        self.caps.append(rate_mbit)
        return self._at(local, remote, offset)

    def get_file_at(
        self, remote: str, local: str | Path, offset: int, *, rate_mbit: float | None = None
    ) -> int:
        self.caps.append(rate_mbit)
        return self._at(remote, local, offset)

    def put_file(self, local: str | Path, remote: str) -> None:
        self.moved += os.path.getsize(local)
        super().put_file(local, remote)

    def get_file(self, remote: str, local: str | Path) -> None:
        self.moved += os.path.getsize(remote)
        super().get_file(remote, local)


def transfer_all(src: str | Path, dst: str | Path, offset: int) -> int:
    from nephele.agent.transport import copy_from_offset

    return copy_from_offset(src, dst, offset)


def image_zip(path: Path, *, size: int = 3 * MiB, seed: int = 1) -> str:
    """A valid image export (image.import verifies it) of incompressible bytes; returns its content id."""
    rnd = random.Random(seed)
    files = {"disk.raw": rnd.randbytes(size), "memory.save": rnd.randbytes(size // 3)}
    sums = {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}
    meta_files = {n: {"sha256": sums[n], "size": len(b)} for n, b in files.items()}
    cid = content_id(sums)
    meta = {"format": IMAGE_FORMAT, "name": "big", "content_id": cid, "files": meta_files, "created": "now"}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(images.EXPORT_META, json.dumps(meta))
        for n, b in files.items():
            zf.writestr(n, b)
    return cid


def ask_on(node: Node) -> transfer.Ask:
    def ask(args: dict[str, Any]) -> dict[str, Any] | None:
        resp = node.call(protocol.make_request("copy.partial", args))
        if not resp["ok"]:
            if resp["error"]["kind"] == "unsupported":
                return None
            raise AssertionError(resp)
        res: dict[str, Any] = resp["result"]
        return res

    return ask


# ------------------------------------------------------------------------- the resume decision


@pytest.fixture
def upload_case(tmp_path: Path) -> tuple[Node, Path, str, list[str]]:
    node = Node("edge-b", tmp_path / "b")
    local = tmp_path / "local.zip"
    local.write_bytes(random.Random(7).randbytes(2 * MiB + 123))
    remote = str(node.root / "tmp" / transfer.part_name("image", "big", "ab" * 32))
    return node, local, remote, []


@pytest.mark.parametrize(
    ("partial", "resumed"),
    [
        ("missing", False),
        ("prefix", True),  # the first 40 % arrived before the cut
        ("differs", False),  # same length, other bytes: sent whole
        ("longer", False),  # longer than the file: sent whole
        ("complete", True),  # all of it: nothing to send
    ],
)
def test_upload_resumes_only_from_a_matching_prefix(
    upload_case: tuple[Node, Path, str, list[str]], partial: str, resumed: bool
) -> None:
    node, local, remote, lines = upload_case
    data = local.read_bytes()
    cut = int(len(data) * 0.4)
    match partial:
        case "prefix":
            Path(remote).write_bytes(data[:cut])
        case "differs":
            Path(remote).write_bytes(bytes(cut))
        case "longer":
            Path(remote).write_bytes(data + b"junk")
        case "complete":
            Path(remote).write_bytes(data)
    moved = transfer.upload(node, ask_on(node), local, remote, lines.append)
    assert Path(remote).read_bytes() == data
    assert moved.size == len(data)
    expect_offset = {"prefix": cut, "complete": len(data)}.get(partial, 0) if resumed else 0
    assert (moved.resumed_at, moved.sent) == (expect_offset, len(data) - expect_offset)
    assert node.moved == len(data) - expect_offset
    text = "\n".join(lines)
    if partial == "prefix":
        assert f"resuming at {cut / MiB:.1f} MiB of {len(data) / MiB:.1f} MiB" in text
    if partial == "differs":
        assert "does not match the file: sending it whole" in text
    if partial == "longer":
        assert "is longer than the file: sending it whole" in text


def test_a_node_without_copy_partial_gets_the_whole_file(tmp_path: Path) -> None:
    node = Node("old", tmp_path / "o", old=True)
    local = tmp_path / "l.zip"
    local.write_bytes(b"x" * 5000)
    remote = str(node.root / "tmp" / "nephele-part-image-x-00.zip")
    Path(remote).write_bytes(b"x" * 4000)  # a partial it cannot tell us about
    moved = transfer.upload(node, ask_on(node), local, remote, lambda s: None)
    assert (moved.resumed_at, moved.sent, node.moved) == (0, 5000, 5000)
    assert Path(remote).read_bytes() == local.read_bytes()


@pytest.mark.parametrize("partial", ["missing", "prefix", "differs", "longer"])
def test_fetch_resumes_from_a_matching_local_prefix(tmp_path: Path, partial: str) -> None:
    node = Node("edge-a", tmp_path / "a")
    data = random.Random(3).randbytes(MiB + 77)
    remote = node.root / "tmp" / "nephele-export-image-big-00.zip"
    remote.write_bytes(data)
    local = tmp_path / "c" / "x.part"
    local.parent.mkdir()
    cut = len(data) // 2
    contents = {"prefix": data[:cut], "differs": b"\1" * cut, "longer": data + b"more"}
    if partial in contents:
        local.write_bytes(contents[partial])
    lines: list[str] = []
    moved = transfer.fetch(
        node, ask_on(node), str(remote), local, len(data), hashlib.sha256(data).hexdigest(), lines.append
    )
    assert local.read_bytes() == data
    offset = cut if partial == "prefix" else 0
    assert (moved.resumed_at, moved.sent, node.moved) == (offset, len(data) - offset, len(data) - offset)
    if partial == "prefix":
        assert "fetching from edge-a: resuming at 0.5 MiB of 1.0 MiB" in lines


def test_a_fetch_that_does_not_verify_is_refused_and_leaves_no_partial(tmp_path: Path) -> None:
    node = Node("edge-a", tmp_path / "a")
    remote = node.root / "tmp" / "nephele-export-image-big-00.zip"
    remote.write_bytes(b"y" * 10000)
    local = tmp_path / "x.part"
    local.write_bytes(b"y" * 4000)  # a matching prefix: resumed, then the whole is not what was asked
    lines: list[str] = []
    with pytest.raises(AgentError, match="changed while it was fetched"):
        transfer.fetch(node, ask_on(node), str(remote), local, 10000, "00" * 32, lines.append)
    assert "the resumed fetch from edge-a does not verify: fetching it whole" in lines
    assert not local.exists()
    assert node.moved == 6000 + 10000


# ------------------------------------------------------------------------------- copy.partial op


def test_copy_partial_reports_size_and_prefix_digest_and_sweeps_stale_partials(tmp_path: Path) -> None:
    with closing(NodeContext(tmp_path / "n")) as ctx:
        f = ctx.store.tmp / "nephele-part-image-big-aa.zip"
        f.write_bytes(b"0123456789")
        res = copies.partial(ctx, {"path": str(f)})
        assert res["size"] == 10 and res["sha256"] == hashlib.sha256(b"0123456789").hexdigest()
        assert (
            copies.partial(ctx, {"path": str(f), "upto": 4})["sha256"] == hashlib.sha256(b"0123").hexdigest()
        )
        gone = copies.partial(ctx, {"path": str(ctx.store.tmp / "nephele-part-none.zip")})
        assert gone["size"] == -1 and gone["sha256"] == hashlib.sha256(b"").hexdigest()
        stale = ctx.store.tmp / "nephele-export-image-old-bb.zip"
        stale.write_bytes(b"old")
        old = stale.stat().st_mtime - copies.PARTIAL_MAX_AGE - 60
        os.utime(stale, (old, old))
        other = ctx.store.tmp / "nephele-image-x-1234.zip"  # not a partial: not swept
        other.write_bytes(b"x")
        os.utime(other, (old, old))
        copies.partial(ctx, {"path": str(f)})
        assert not stale.exists() and other.exists() and f.exists()


def test_copy_partial_refuses_paths_outside_tmp_and_a_rest_that_does_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nephele.errors import InvalidInput, NoSpace
    from nephele.node import space

    with closing(NodeContext(tmp_path / "n")) as ctx:
        for bad in (str(tmp_path / "nephele-x"), str(ctx.store.tmp / "meta.json"), ""):
            with pytest.raises(InvalidInput):
                copies.partial(ctx, {"path": bad})
        f = ctx.store.tmp / "nephele-part-image-big-aa.zip"
        with pytest.raises(InvalidInput, match="upto"):
            copies.partial(ctx, {"path": str(f), "upto": -1})
        f.write_bytes(b"z" * 1000)
        monkeypatch.setattr(space, "free_bytes", lambda path: 50 << 20)
        copies.partial(ctx, {"path": str(f), "expect": 30 << 20})  # 30 MiB - 1000 bytes + margin fits
        with pytest.raises(NoSpace, match=r"to complete the 100\.0 MiB file"):
            copies.partial(ctx, {"path": str(f), "expect": 100 << 20})


# ------------------------------------------------------------------------------ applies, cut off


MANIFEST = """\
apiVersion: nephele.dev/v1
kind: Cloudlet
metadata: {name: rc}
nodes:
  edge-a: {address: 10.0.0.1, root: ROOT_A}
  edge-b: {address: 10.0.0.2, root: ROOT_B}
images:
  big: SPEC
"""


def cloudlet(tmp_path: Path, spec: str, *, old: bool = False) -> tuple[Any, dict[str, Node]]:
    nodes = {n: Node(n, tmp_path / n, old=old) for n in ("edge-a", "edge-b")}
    path = tmp_path / "cloudlet.yaml"
    path.write_text(
        MANIFEST.replace("ROOT_A", str(nodes["edge-a"].root))
        .replace("ROOT_B", str(nodes["edge-b"].root))
        .replace("SPEC", spec)
    )
    return manifest.load(path), nodes


def do_apply(d: Any, nodes: dict[str, Node], tmp_path: Path, **opts: Any) -> tuple[Any, list[str]]:
    factory: Callable[[Any], Node] = lambda spec: nodes[spec.name]  # noqa: E731
    obs = observe(d, TransportPool(d, factory), timeout=5)
    lines: list[str] = []
    result = apply(
        plan(d, obs, None),
        d,
        TransportPool(d, factory),
        ApplyOptions(**opts),
        inventory=InventoryStore(tmp_path / "state", d.name),
        say=lines.append,
        sleep=lambda s: None,
    )
    return result, lines


def leftovers(tmp_path: Path, nodes: dict[str, Node]) -> list[str]:
    found = [p.name for n in nodes.values() for p in (n.root / "tmp").glob("nephele-*")]
    copies_dir = tmp_path / "state" / "copies"
    return found + ([p.name for p in copies_dir.iterdir()] if copies_dir.is_dir() else [])


def test_a_source_upload_cut_mid_way_resumes_on_the_retry(tmp_path: Path) -> None:
    src = tmp_path / "big.zip"
    cid = image_zip(src)
    d, nodes = cloudlet(tmp_path, f"{{source: {src}, nodes: [edge-b]}}")
    size = src.stat().st_size
    nodes["edge-b"].cut_after = [size // 2]
    result, lines = do_apply(d, nodes, tmp_path)
    assert result.ok, lines
    text = "\n".join(lines)
    assert "temporary error, retrying" in text
    assert f"uploading to edge-b: resuming at {size // 2 / MiB:.1f} MiB of {size / MiB:.1f} MiB" in text
    assert nodes["edge-b"].moved == size  # half before the cut, the other half after: nothing twice
    [r] = result.results
    assert r.attempts == 2 and "resumed at" in r.detail
    with closing(NodeContext(nodes["edge-b"].root)) as ctx:
        assert [i.content_id for i in ctx.store.list_images()] == [cid]  # verified by image.import
    assert leftovers(tmp_path, nodes) == []


def test_without_resume_the_retry_sends_the_file_again(tmp_path: Path) -> None:
    """The baseline (resume_copies=False): the same cut, and the retry starts from byte 0."""
    src = tmp_path / "big.zip"
    cid = image_zip(src)
    d, nodes = cloudlet(tmp_path, f"{{source: {src}, nodes: [edge-b]}}")
    size = src.stat().st_size
    nodes["edge-b"].cut_after = [size // 2]
    result, lines = do_apply(d, nodes, tmp_path, resume_copies=False)
    assert result.ok, lines
    assert "resuming" not in "\n".join(lines)
    assert nodes["edge-b"].moved == size // 2 + size
    with closing(NodeContext(nodes["edge-b"].root)) as ctx:
        assert [i.content_id for i in ctx.store.list_images()] == [cid]


def test_a_node_copy_cut_on_both_hops_reuses_the_export_and_resumes_both(tmp_path: Path) -> None:
    src = tmp_path / "big.zip"
    cid = image_zip(src, size=2 * MiB)
    d, nodes = cloudlet(tmp_path, "{nodes: [edge-a, edge-b]}")
    with closing(NodeContext(nodes["edge-a"].root)) as ctx:
        shutil_copy = nodes["edge-a"].root / "tmp" / "in.zip"
        shutil_copy.write_bytes(src.read_bytes())
        images.import_(ctx, {"path": str(shutil_copy), "name": "big"})
    # The fetch from edge-a breaks at 100 KiB, then the upload to edge-b at 200 KiB.
    nodes["edge-a"].cut_after = [100 << 10]
    nodes["edge-b"].cut_after = [200 << 10]
    exports: list[str] = []
    real = nodes["edge-a"].handle

    def counting(req: protocol.Request) -> protocol.Response:
        if req["op"] in ("image.export_delta", "image.export"):
            exports.append(req["op"])
        return real(req)

    nodes["edge-a"].handler = counting
    result, lines = do_apply(d, nodes, tmp_path)
    assert result.ok, lines
    text = "\n".join(lines)
    assert exports == ["image.export_delta"], text  # made once, reused by both retries
    assert "reusing the export of the last attempt on edge-a" in text
    assert "fetching from edge-a: resuming at 0.1 MiB" in text
    assert "the export of the last attempt is here already" in text
    assert "uploading to edge-b: resuming at 0.2 MiB" in text
    [r] = result.results
    assert r.attempts == 3, text
    with closing(NodeContext(nodes["edge-b"].root)) as ctx:
        assert [i.content_id for i in ctx.store.list_images()] == [cid]
    # Each hop moved the export once in total: what arrived before a cut was not sent again.
    assert nodes["edge-a"].moved == nodes["edge-b"].moved
    assert leftovers(tmp_path, nodes) == []


def test_an_import_that_refuses_a_resumed_upload_gets_the_file_whole_once(tmp_path: Path) -> None:
    """A partial whose bytes went bad while its digest was reported right (a node that lies, a disk
    that rots): the import's own check catches it, the partial is discarded, the file crosses whole."""
    src = tmp_path / "big.zip"
    cid = image_zip(src)
    d, nodes = cloudlet(tmp_path, f"{{source: {src}, nodes: [edge-b]}}")
    data = src.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    part = nodes["edge-b"].root / "tmp" / transfer.part_name("image", "big", digest)
    part.write_bytes(bytes(len(data) // 2))  # zeros where the zip's first half should be
    real = nodes["edge-b"].handle

    def lying(req: protocol.Request) -> protocol.Response:
        if req["op"] == "copy.partial" and part.is_file() and part.read_bytes() == bytes(len(data) // 2):
            resp = real(req)
            resp["result"]["sha256"] = hashlib.sha256(data[: len(data) // 2]).hexdigest()
            return resp
        return real(req)

    nodes["edge-b"].handler = lying
    result, lines = do_apply(d, nodes, tmp_path)
    text = "\n".join(lines)
    assert result.ok, text
    assert "resuming at" in text and "the resumed upload did not verify" in text
    assert nodes["edge-b"].moved == len(data) - len(data) // 2 + len(data)
    with closing(NodeContext(nodes["edge-b"].root)) as ctx:
        assert [i.content_id for i in ctx.store.list_images()] == [cid]
    assert leftovers(tmp_path, nodes) == []


def test_a_target_without_room_for_the_rest_fails_clearly_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nephele.node import space

    src = tmp_path / "big.zip"
    image_zip(src, size=2 * MiB)
    d, nodes = cloudlet(tmp_path, "{nodes: [edge-a, edge-b]}")
    with closing(NodeContext(nodes["edge-a"].root)) as ctx:
        copy = nodes["edge-a"].root / "tmp" / "in.zip"
        copy.write_bytes(src.read_bytes())
        images.import_(ctx, {"path": str(copy), "name": "big"})
    real_free = space.free_bytes
    monkeypatch.setattr(
        space,
        "free_bytes",
        lambda p: 1 << 20 if str(p).startswith(str(nodes["edge-b"].root)) else real_free(p),
    )
    result, _ = do_apply(d, nodes, tmp_path)
    assert not result.ok
    [r] = result.results
    assert r.attempts == 1 and r.error and "not enough disk space on node" in r.error, r.error
    assert "nothing was written" in r.error
    assert (
        leftovers(tmp_path, nodes) == []
    )  # the export went after the fetch, the local copy after the refusal


def test_copies_are_held_to_the_manifests_bandwidth_cap_on_both_hops(tmp_path: Path) -> None:
    src = tmp_path / "big.zip"
    image_zip(src, size=2 * MiB)
    d, nodes = cloudlet(tmp_path, "{nodes: [edge-a, edge-b]}")
    path = tmp_path / "cloudlet.yaml"
    path.write_text(
        path.read_text().replace(
            "edge-b: {address: 10.0.0.2,", "edge-b: {address: 10.0.0.2, maxBandwidthMbit: 8,"
        )
        + "policy: {maxBandwidthMbit: 30}\n"
    )
    d = manifest.load(path)
    with closing(NodeContext(nodes["edge-a"].root)) as ctx:
        staged = nodes["edge-a"].root / "tmp" / "in.zip"
        staged.write_bytes(src.read_bytes())
        images.import_(ctx, {"path": str(staged), "name": "big"})
    result, lines = do_apply(d, nodes, tmp_path)
    assert result.ok, lines
    # edge-a -> controller (fetch) and controller -> edge-b (upload): the lowest cap of the two ends
    assert nodes["edge-a"].caps == [8.0] and nodes["edge-b"].caps == [8.0]
