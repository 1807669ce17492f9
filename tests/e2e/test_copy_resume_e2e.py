"""Resumable copies on a real cloudlet node (issue 9): `apply` uploads an image export over SSH through a
20 Mbit/s link, the link is cut when half of it has arrived, SSHTransport notices the stall, the apply
retries after the link is back, and the upload resumes where it stopped. The bytes on the node's link
(its veth, host side) are counted, with resume and without (the baseline that restarts from zero).
No VMs: the image is a synthetic export of incompressible bytes, which image.import verifies in full.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from nephele.agent import Agent
from nephele.agent.nodes import transport_for_node
from nephele.cloudlet import Cloudlet

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("copy_resume", ROOT / "bench" / "copy_resume.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["copy_resume"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_an_image_upload_cut_mid_way_resumes_and_resends_little(
    cloudlet_factory: Callable[..., Cloudlet], tmp_path: Path
) -> None:
    b = bench()
    c = cloudlet_factory(1, rate_mbit=20, delay_ms=0)
    image = tmp_path / "big.zip"
    cid = b.synthetic_image(image, 24)
    size = image.stat().st_size
    agent = Agent(transport_for_node(c.node_specs()[0], timeout=120))
    try:
        runs = {}
        for resume in (True, False):
            r = b.cut_copy(c, image, tmp_path / ("on" if resume else "off"), resume=resume, cut=0.5)
            text = "\n".join(r.lines)
            assert r.ok, text
            assert r.cut_at >= size // 2, (r.cut_at, size)  # the cut landed mid-upload
            assert r.attempts >= 2 and "temporary error, retrying" in text, text
            # image.import checked every file's sha256 and the content id.
            assert agent.call("observe")["images"]["big"]["content_id"] == cid
            # Nothing is left behind: the node's partial went with the import, the controller's too.
            node_tmp = c.nodes[0].host_root / "tmp"
            assert not list(node_tmp.glob("nephele-*")), list(node_tmp.iterdir())
            copies = tmp_path / ("on" if resume else "off") / "state" / "copies"
            assert not copies.is_dir() or not list(copies.iterdir())
            runs[resume] = r
            agent.call("image.rm", {"id": "big"})
        on, off = runs[True], runs[False]
        assert "uploading to edge-a: resuming at" in "\n".join(on.lines)
        print("\n".join(b.table([on, off])))
        # With resume, what crossed before the cut is not sent again: far less than the file re-sent
        # (SSH framing and the agent's calls are the rest). Without it, the half before the cut was.
        assert on.resent < size // 8, (on.resent, size)
        assert off.resent > on.cut_at * 0.9, (off.resent, off.cut_at)
        assert on.wire < off.wire
    finally:
        agent.close()


def test_ssh_transfers_at_an_offset_write_only_the_rest(cloudlet: Cloudlet, tmp_path: Path) -> None:
    """SSHTransport.put_file_at / get_file_at against a node's sshd: the destination keeps its first
    `offset` bytes, gets the rest, and ends exactly as long as the source (a longer one is cut)."""
    import random

    node = cloudlet.nodes[0]
    remote_host = node.host_root / "tmp" / "nephele-part-test-offset.bin"
    remote_host.parent.mkdir(parents=True, exist_ok=True)
    t = transport_for_node(cloudlet.node_specs()[0], timeout=60)
    try:
        data = random.Random(5).randbytes(3 * MiB + 17)
        local = tmp_path / "l.bin"
        local.write_bytes(data)
        remote = f"{node.root}/tmp/{remote_host.name}"
        remote_host.write_bytes(data[: MiB + 5] + b"stale tail beyond the prefix")
        assert t.put_file_at(local, remote, MiB + 5) == len(data) - MiB - 5  # type: ignore[attr-defined]
        assert remote_host.read_bytes() == data
        back = tmp_path / "b.bin"
        back.write_bytes(data[: 2 * MiB] + b"x" * 100)
        assert t.get_file_at(remote, back, 2 * MiB) == len(data) - 2 * MiB  # type: ignore[attr-defined]
        assert back.read_bytes() == data
        assert t.get_file_at(remote, back, 0) == len(data)  # type: ignore[attr-defined]
        assert back.read_bytes() == data
    finally:
        remote_host.unlink(missing_ok=True)
        t.close()


def test_a_node_to_node_image_copy_cut_mid_upload_resumes(
    cloudlet_factory: Callable[..., Cloudlet], tmp_path: Path
) -> None:
    """edge-a holds the image, the manifest wants it on edge-b too and names no file: apply exports it
    on edge-a (image.export_delta), fetches it to the controller and uploads it to edge-b, whose link is
    cut half way. The retry neither exports nor fetches again (the controller kept the verified export)
    and resumes the upload."""
    b = bench()
    c = cloudlet_factory(2, rate_mbit=20, delay_ms=0)
    image = tmp_path / "big.zip"
    cid = b.synthetic_image(image, 16)
    a_spec, b_spec = c.node_specs()
    src = Agent(transport_for_node(a_spec, timeout=300))
    dst = Agent(transport_for_node(b_spec, timeout=120))
    try:
        src.call("ping")  # makes the node's store (tmp/)
        src.transport.put_file(image, f"{c.nodes[0].root}/tmp/nephele-in.zip")
        src.call("image.import", {"path": f"{c.nodes[0].root}/tmp/nephele-in.zip", "name": "big"})
        r = b.cut_copy(c, image, tmp_path / "node", resume=True, target=1, source=0)
        text = "\n".join(r.lines)
        assert r.ok, text
        assert r.cut_at >= r.size // 2 and r.attempts >= 2, text
        assert "the export of the last attempt is here already" in text
        assert "uploading to edge-b: resuming at" in text
        assert text.count("Encoding image") == 1, text  # exported once (image.export_delta's progress)
        assert dst.call("observe")["images"]["big"]["content_id"] == cid
        print("\n".join(b.table([r])))
        assert r.resent < r.size // 8, (r.resent, r.size)
        for n in c.nodes:
            assert not list((n.host_root / "tmp").glob("nephele-*")), n.name
    finally:
        src.close()
        dst.close()
