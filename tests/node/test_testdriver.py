"""The hypervisor layer and the image flows on libvirt's test:///default driver (fast, in-process).

test:/// fakes the hypervisor (its save image is a stub), so these tests cover nephele's own logic:
domain tagging, event-driven wait for a pause, the build -> store -> export -> import -> rm path and
its error handling. Real QEMU runs in tests/node/test_integration.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nephele.errors import Conflict, InvalidInput, NepheleError, NodeError, NotFound
from nephele.node import domain as dx
from nephele.node import images, instances
from nephele.node.hypervisor import Hypervisor
from nephele.node.observe import observe
from nephele.node.runtime import NodeContext


@pytest.fixture(scope="module")
def hv() -> Iterator[Hypervisor]:
    h = Hypervisor("test:///default")
    yield h
    h.close()


def test_domain(hv: Hypervisor, **tags: str) -> Any:
    u = str(uuid.uuid4())
    xml = dx.build_xml(
        dx.DomainSpec(
            name=f"nt-{u[:8]}", uuid=u, title="t", disk="/tmp/x.raw", disk_format="raw",
            serial_log="/tmp/s.log", memory_kib=65536, cpus=1, boot=dx.Boot(), domain_type="test",
            tags={"role": "instance", "title": "t", **tags},
        )
    )  # fmt: skip
    return hv.create(xml, "test domain")


test_domain.__test__ = False  # type: ignore[attr-defined]


def test_tags_are_found_and_updated(hv: Hypervisor) -> None:
    dom = test_domain(hv, ports="8080:80")
    try:
        found = {d.uuid: d for d in hv.nephele_domains(role="instance")}
        info = found[dom.UUIDString()]
        assert info.tags["ports"] == "8080:80" and info.state == "running"
        hv.set_tags(dom, {**info.tags, "handoff_url": "tcp://b:8022"})
        assert hv.info(dom).tags["handoff_url"] == "tcp://b:8022"
        assert "test" not in {d.name for d in hv.nephele_domains()}  # the driver's own domain is not ours
    finally:
        hv.destroy(dom)


def test_wait_paused_is_woken_by_the_event(hv: Hypervisor) -> None:
    dom = test_domain(hv)
    try:
        threading.Timer(0.3, dom.suspend).start()
        t0 = time.monotonic()
        hv.wait_paused(dom, timeout=10)
        assert 0.25 < time.monotonic() - t0 < 2
    finally:
        hv.destroy(dom)


def test_wait_paused_reports_a_stop_and_a_timeout(hv: Hypervisor) -> None:
    dom = test_domain(hv)
    threading.Timer(0.2, dom.destroy).start()
    with pytest.raises(NodeError, match="stopped before it was paused"):
        hv.wait_paused(dom, timeout=10)
    dom = test_domain(hv)
    try:
        with pytest.raises(InvalidInput, match=r"not paused within 0\.3 s"):
            hv.wait_paused(dom, timeout=0.3)
    finally:
        hv.destroy(dom)


def test_destroy_and_undefine_tolerate_a_vanished_domain(hv: Hypervisor) -> None:
    dom = test_domain(hv)
    hv.destroy(dom)
    hv.destroy(dom)
    hv.undefine(dom)


# ------------------------------------------------------------------------------- image flows


@pytest.fixture
def ctx(tmp_path: Path, hv: Hypervisor) -> Iterator[NodeContext]:
    c = NodeContext(tmp_path / "root", hypervisor=hv)
    yield c
    c.close()


def _descriptor(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / "disk.raw").write_bytes(b"\1" * 65536)
    (src / "vmlinuz").write_bytes(b"kernel")
    (src / "initrd.img").write_bytes(b"initrd")
    desc = src / "tiny.json"
    desc.write_text(
        json.dumps({"disk": "disk.raw", "kernel": "vmlinuz", "initrd": "initrd.img", "name": "tiny"})
    )
    return desc


def _pause_build_domain(hv: Hypervisor) -> None:
    def pauser() -> None:
        for _ in range(200):
            for d in hv.nephele_domains(role="build"):
                if d.state == "running":
                    hv.suspend(hv.lookup(d.uuid))
                    return
            time.sleep(0.02)

    threading.Thread(target=pauser, daemon=True).start()


def build(ctx: NodeContext, tmp_path: Path) -> dict[str, Any]:
    _pause_build_domain(ctx.hv)
    lines: list[str] = []
    ctx._progress = lines.append
    r = images.build(ctx, {"path": str(_descriptor(tmp_path)), "timeout": 20})
    assert any("pause it when ready" in line for line in lines)
    return r


def test_build_ls_export_import_rm(ctx: NodeContext, tmp_path: Path, hv: Hypervisor) -> None:
    r = build(ctx, tmp_path)
    assert r["name"] == "tiny" and r["created_new"] and len(r["id"]) == 12
    assert sorted(p.name for p in Path(r["path"]).iterdir()) == [
        "disk.raw", "initrd", "kernel", "memory.save", "meta.json",
    ]  # fmt: skip
    assert list(ctx.store.tmp.iterdir()) == []
    assert not [d for d in hv.nephele_domains(role="build") if d.state != "stopped"]
    assert [i["content_id"] for i in images.ls(ctx, {})] == [r["content_id"]]
    obs = observe(ctx, {"node": "n"})
    assert obs["images"]["tiny"]["content_id"] == r["content_id"]

    export = images.export(ctx, {"id": r["id"], "dest": str(tmp_path / "tiny.zip")})
    assert export["file"] == str(tmp_path / "tiny.zip")
    other = NodeContext(tmp_path / "other", hypervisor=hv)
    try:
        imp = images.import_(other, {"path": export["file"]})
        assert imp["content_id"] == r["content_id"] and imp["created_new"]
        again = images.import_(other, {"path": export["file"]})
        assert not again["created_new"]
    finally:
        other.close()

    with pytest.raises(NotFound, match="no image 'ffff0000'"):
        images.rm(ctx, {"id": "ffff0000"})
    images.rm(ctx, {"id": r["id"][:6]})
    assert images.ls(ctx, {}) == []


def test_build_of_missing_or_bad_input_changes_nothing(ctx: NodeContext, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        images.build(ctx, {"path": str(tmp_path / "nope.raw")})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidInput, match="not a JSON descriptor"):
        images.build(ctx, {"path": str(bad)})
    bad.write_text(json.dumps({"disk": "missing.raw"}))
    with pytest.raises(InvalidInput, match=r"missing\.raw: no such file"):
        images.build(ctx, {"path": str(bad)})
    assert images.ls(ctx, {}) == [] and list(ctx.store.tmp.iterdir()) == []


def _corrupt(src: Path, dst: Path, member: str) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == member:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            zout.writestr(item, data)


def test_corrupt_or_foreign_import_is_refused_and_leaves_nothing(
    ctx: NodeContext, tmp_path: Path, hv: Hypervisor
) -> None:
    r = build(ctx, tmp_path)
    good = Path(images.export(ctx, {"id": r["id"], "dest": str(tmp_path)})["file"])
    assert good.name == f"tiny-{r['id']}.zip"
    target = NodeContext(tmp_path / "target", hypervisor=hv)
    try:
        bad = tmp_path / "bad.zip"
        _corrupt(good, bad, "disk.raw")
        with pytest.raises(InvalidInput, match=r"disk.raw is corrupt \(sha256"):
            images.import_(target, {"path": str(bad)})
        truncated = tmp_path / "trunc.zip"
        truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        with pytest.raises(InvalidInput, match=r"not a nephele image export|corrupt"):
            images.import_(target, {"path": str(truncated)})
        notzip = tmp_path / "x.zip"
        notzip.write_text("hello")
        with pytest.raises(InvalidInput, match="not a nephele image export"):
            images.import_(target, {"path": str(notzip)})
        with pytest.raises(InvalidInput, match="no such file"):
            images.import_(target, {"path": str(tmp_path / "missing.zip")})
        assert images.ls(target, {}) == []
        assert list(target.store.tmp.iterdir()) == []
    finally:
        target.close()


def test_export_to_missing_dir_and_rm_with_dependent_snapshot(ctx: NodeContext, tmp_path: Path) -> None:
    r = build(ctx, tmp_path)
    with pytest.raises(InvalidInput, match="no such directory"):
        images.export(ctx, {"id": r["id"], "dest": str(tmp_path / "no" / "x.zip")})
    snap = ctx.store.snapshots / "s1"
    snap.mkdir(parents=True)
    (snap / "meta.json").write_text(json.dumps({"name": "web", "image": r["content_id"]}))
    with pytest.raises(Conflict, match=r"snapshots depending on image .* web .*use -f"):
        images.rm(ctx, {"id": r["id"]})
    assert len(images.ls(ctx, {})) == 1
    out = images.rm(ctx, {"id": r["id"], "force": True})
    assert out["warnings"] and images.ls(ctx, {}) == []


def test_failed_run_leaves_no_instance_behind(ctx: NodeContext, tmp_path: Path, hv: Hypervisor) -> None:
    r = build(ctx, tmp_path)
    # The test driver's save image is a stub libvirt cannot hand to QEMU: run must fail cleanly.
    with pytest.raises(NepheleError):
        instances.run(ctx, {"snapshot": r["id"], "title": "web", "ports": "18999:80"})
    assert instances.ps(ctx, {}) == [] or all(i["title"] != "web" for i in instances.ps(ctx, {}))
    assert list(ctx.store.instances.iterdir()) == []
    with pytest.raises(NotFound, match="no image 'nope'"):
        instances.run(ctx, {"snapshot": "nope", "title": "web"})
    with pytest.raises(InvalidInput, match="no TITLE"):
        instances.run(ctx, {"snapshot": r["id"], "title": ""})


def test_instance_lifecycle_cold_boot_on_the_test_driver(ctx: NodeContext, tmp_path: Path) -> None:
    """run -d (cold boot of the image's disk), ps, selection, port conflicts, pause/resume/stop/start/rm."""
    r = build(ctx, tmp_path)
    a = instances.run(ctx, {"snapshot": r["id"], "title": "web", "ports": "18901:80", "disk_only": True})
    assert a["state"] == "running" and a["ports"] == ["18901:80"] and a["snapshot"] == r["id"]
    assert (ctx.store.instances / a["uuid"] / "disk.qcow2").is_file()
    with pytest.raises(Conflict, match="18901 is already forwarded to instance 'web'"):
        instances.run(ctx, {"snapshot": r["id"], "title": "web2", "ports": "18901:80", "disk_only": True})
    b = instances.run(ctx, {"snapshot": "tiny", "title": "web", "ports": "18902:80", "disk_only": True})
    try:
        assert {i["uuid"] for i in instances.ps(ctx, {})} >= {a["uuid"], b["uuid"]}
        with pytest.raises(
            Conflict, match=f"title 'web' is ambiguous: instances .*{b['uuid']}.*give the UUID"
        ):
            instances.pause(ctx, {"instance": "web"})
        assert instances.pause(ctx, {"instance": a["uuid"]})["state"] == "paused"
        assert instances.resume(ctx, {"instance": a["uuid"][:8]})["state"] == "running"
        assert instances.stop(ctx, {"instance": a["uuid"]})["state"] == "stopped"
        with pytest.raises(Conflict, match="is stopped"):
            instances.pause(ctx, {"instance": a["uuid"]})
        # A stopped instance no longer holds its port...
        c = instances.run(ctx, {"snapshot": "tiny", "title": "c", "ports": "18901:80", "disk_only": True})
        # ...so starting the stopped one again is refused while another holds it.
        with pytest.raises(Conflict, match="18901 is already forwarded to instance 'c'"):
            instances.start(ctx, {"instance": a["uuid"]})
        instances.rm(ctx, {"instance": c["uuid"]})
        assert instances.start(ctx, {"instance": a["uuid"]})["state"] == "running"
        obs = observe(ctx, {"node": "n"})
        assert {obs["instances"][k]["uuid"] for k in obs["instances"]} >= {a["uuid"], b["uuid"]}
        marked = instances.set_handoff_url(ctx, {"instance": a["uuid"], "url": "tcp://10.0.0.2:8022"})
        assert marked["handoff_url"] == "tcp://10.0.0.2:8022"
        with pytest.raises(Conflict, match="in use by instances"):
            images.rm(ctx, {"id": r["id"], "force": True})
    finally:
        for i in (a, b):
            instances.rm(ctx, {"instance": i["uuid"]})
    assert not [i for i in instances.ps(ctx, {}) if i["uuid"] in (a["uuid"], b["uuid"])]
    assert list(ctx.store.instances.iterdir()) == []


def test_interrupted_build_cleans_up(tmp_path: Path) -> None:
    """SIGTERM (what an SSH disconnect turns into) while the node waits for the pause: the agent answers
    `interrupted`, and neither an image nor staging files are left."""
    import os
    import signal
    import subprocess
    import sys

    from nephele.agent import protocol

    desc = _descriptor(tmp_path)
    root = tmp_path / "root"
    env = {**os.environ, "NEPHELE_ROOT": str(root), "NEPHELE_LIBVIRT_URI": "test:///default"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "nephele", "agent", "call"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin and proc.stderr and proc.stdout
    proc.stdin.write(protocol.encode(protocol.make_request("image.build", {"path": str(desc)})))
    proc.stdin.close()
    while b"pause it when ready" not in proc.stderr.readline():
        pass
    assert list((root / "tmp").iterdir())  # the staging dir exists while it waits
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(20) == 0
    resp = json.loads(out)
    assert resp["ok"] is False and resp["error"]["kind"] == "interrupted"
    assert list((root / "tmp").iterdir()) == [] and list((root / "images").iterdir()) == []


def test_set_ports_of_a_stopped_instance_and_conflicts(ctx: NodeContext, tmp_path: Path) -> None:
    r = build(ctx, tmp_path)
    a = instances.run(ctx, {"snapshot": r["id"], "title": "a", "ports": "18911:80", "disk_only": True})
    b = instances.run(ctx, {"snapshot": r["id"], "title": "b", "ports": "18912:80", "disk_only": True})
    try:
        instances.stop(ctx, {"instance": a["uuid"]})
        with pytest.raises(Conflict, match="18912 is already forwarded to instance 'b'"):
            instances.set_ports(ctx, {"instance": a["uuid"], "ports": ["18912:80"]})
        out = instances.set_ports(ctx, {"instance": a["uuid"], "ports": ["18913:80", "18914:22"]})
        assert out["ports"] == ["18913:80", "18914:22"]
        # (test:/// drops <qemu:commandline>; the live forward change is tested on QEMU, in test_integration)
        assert ctx.hv.info(ctx.hv.lookup(a["uuid"])).tags["ports"] == "18913:80,18914:22"
        assert instances.start(ctx, {"instance": a["uuid"]})["ports"] == ["18913:80", "18914:22"]
    finally:
        for i in (a, b):
            instances.rm(ctx, {"instance": i["uuid"]})
